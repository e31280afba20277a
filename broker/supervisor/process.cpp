// Process helpers the supervisor's parts share: pidfds, instance tokens, errno text.
#include "supervisor/process.hpp"

#include "os/peer.hpp"
#include "proto/limits.hpp"

#include <signal.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace brokerd::process {

std::string errno_text(int e)
{
	return std::strerror(e);
}

int pidfd_open(pid_t pid)
{
	return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

int pidfd_send_signal(int pidfd, int sig)
{
	return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

std::uint64_t start_time(pid_t pid)
{
	auto id = peer::identity(pid);
	return id ? id->start_ticks : 0;
}

void kill_session(pid_t session)
{
	if (session <= 1)
		return;
	for (pid_t pid : peer::session_members(session)) {
		int fd = pidfd_open(pid);
		if (fd < 0)
			continue;
		if (::getsid(pid) == session)
			pidfd_send_signal(fd, SIGKILL);
		::close(fd);
	}
}

std::string random_token()
{
	unsigned char bytes[proto::limits::kTokenBytes];
	std::size_t got = 0;
	while (got < sizeof(bytes)) {
		ssize_t n = ::getrandom(bytes + got, sizeof(bytes) - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			throw std::runtime_error("getrandom: " + errno_text(errno));
		got += static_cast<std::size_t>(n);
	}
	static const char hex[] = "0123456789abcdef";
	std::string t;
	for (unsigned char b : bytes) {
		t.push_back(hex[b >> 4]);
		t.push_back(hex[b & 15]);
	}
	return t;
}

} // namespace brokerd::process
