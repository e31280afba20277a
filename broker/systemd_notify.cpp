// SystemdNotifier: READY=1, STATUS=, RELOADING=1, STOPPING=1 to NOTIFY_SOCKET without blocking.
#include "systemd_notify.hpp"

#include "log.hpp"

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

namespace broker {

SystemdNotifier::SystemdNotifier()
{
	const char *path = std::getenv("NOTIFY_SOCKET");
	if (!path || !*path)
		return;
	std::size_t len = std::strlen(path);
	if ((path[0] != '/' && path[0] != '@') || len >= sizeof(addr_.sun_path)) {
		log::warning(std::string("NOTIFY_SOCKET=") + path + " is not a unix socket path, ignoring");
		return;
	}
	addr_.sun_family = AF_UNIX;
	std::memcpy(addr_.sun_path, path, len);
	if (path[0] == '@')
		addr_.sun_path[0] = '\0';
	addr_len_ = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len + (path[0] == '@' ? 0 : 1));
	fd_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd_)
		log::warning(std::string("notify socket: ") + std::strerror(errno) + ", ignoring");
}

void SystemdNotifier::send(std::string_view message)
{
	if (!fd_)
		return;
	ssize_t n = ::sendto(fd_.get(), message.data(), message.size(), MSG_NOSIGNAL | MSG_DONTWAIT,
	                     reinterpret_cast<const sockaddr *>(&addr_), addr_len_);
	if (n >= 0) {
		warned_ = false;
		return;
	}
	if (!warned_)
		log::warning(std::string("cannot notify the service manager: ") + std::strerror(errno) + ", ignoring");
	warned_ = true;
}

} // namespace broker
