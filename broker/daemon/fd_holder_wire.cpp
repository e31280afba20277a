// The fd holder's wire (daemon/fd_holder_wire.hpp).
#include "daemon/fd_holder_wire.hpp"

#include "os/systemd_notify.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace brokerd::fdholder {

std::string errno_text(int e)
{
	return std::strerror(e);
}

std::string uid_text(uid_t uid)
{
	return "uid " + std::to_string(uid);
}

bool allowed(uid_t uid)
{
	return uid == 0 || uid == ::geteuid();
}

std::string allowed_text()
{
	return ::geteuid() == 0 ? "root" : "root or " + uid_text(::geteuid());
}

bool valid_name(std::string_view name)
{
	if (name.empty() || name.size() > 255)
		return false;
	return std::all_of(name.begin(), name.end(), [](char c) { return c >= ' ' && c <= '~' && c != ':'; });
}

std::optional<std::string_view> field(std::string_view message, std::string_view key)
{
	while (!message.empty()) {
		std::size_t end = message.find('\n');
		std::string_view line = message.substr(0, end);
		if (line.size() > key.size() && line.starts_with(key) && line[key.size()] == '=')
			return line.substr(key.size() + 1);
		if (end == std::string_view::npos)
			break;
		message.remove_prefix(end + 1);
	}
	return std::nullopt;
}

bool make_address(const std::string &path, sockaddr_un &addr, socklen_t &len)
{
	if (path.empty() || path.size() >= sizeof(addr.sun_path))
		return false;
	addr = {};
	addr.sun_family = AF_UNIX;
	std::memcpy(addr.sun_path, path.data(), path.size());
	if (path[0] == '@')
		addr.sun_path[0] = '\0';
	len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (path[0] == '@' ? 0 : 1));
	return true;
}

bool send_message(int sock, std::string_view text, int fd, int deadline_ms)
{
	auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(deadline_ms);
	for (;;) {
		if (send_message_with_fd(sock, nullptr, 0, text, fd))
			return true;
		if (errno != EAGAIN && errno != EINTR)
			return false;
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
		pollfd p{sock, POLLOUT, 0};
		if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) == 0) {
			errno = ETIMEDOUT;
			return false;
		}
	}
}

int receive(int sock, Received &out, int flags)
{
	char buf[kMaxMessage];
	iovec iov{buf, sizeof buf};
	alignas(cmsghdr) char control[CMSG_SPACE(kMaxFdsPerMessage * sizeof(int)) + CMSG_SPACE(sizeof(ucred))];
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control;
	msg.msg_controllen = sizeof control;
	ssize_t n;
	while ((n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | flags)) < 0 && errno == EINTR) {
	}
	if (n < 0)
		return -1;
	out = {};
	for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET)
			continue;
		if (c->cmsg_type == SCM_RIGHTS) {
			std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (std::size_t i = 0; i < count; ++i) {
				int fd;
				std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				out.fds.emplace_back(fd);
			}
		} else if (c->cmsg_type == SCM_CREDENTIALS && c->cmsg_len >= CMSG_LEN(sizeof(ucred))) {
			ucred cred;
			std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
			out.cred = cred;
		}
	}
	out.truncated = (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0;
	if (n == 0 && out.fds.empty() && !out.cred)
		return 0;
	out.text.assign(buf, static_cast<std::size_t>(n));
	return 1;
}

} // namespace brokerd::fdholder
