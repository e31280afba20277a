// SystemdNotifier: READY=1, STATUS=, RELOADING=1, STOPPING=1 to NOTIFY_SOCKET without blocking.
#include "os/systemd_notify.hpp"

#include "os/log.hpp"

#include <sys/uio.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

namespace brokerd {

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
	send_with_fd(message, -1);
}

bool SystemdNotifier::send_with_fd(std::string_view message, int fd)
{
	if (!fd_)
		return false;
	iovec iov{const_cast<char *>(message.data()), message.size()};
	msghdr msg{};
	msg.msg_name = &addr_;
	msg.msg_namelen = addr_len_;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
	if (fd >= 0) {
		msg.msg_control = control;
		msg.msg_controllen = sizeof(control);
		cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	if (::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0) {
		warned_ = false;
		return true;
	}
	if (!warned_)
		log::warning(std::string("cannot notify the service manager: ") + std::strerror(errno) + ", ignoring");
	warned_ = true;
	return false;
}

} // namespace brokerd
