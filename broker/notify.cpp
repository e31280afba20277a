// NotifySocket: READY=1, STATUS=, STOPPING=1 from workers, checked against their credentials.
#include "notify.hpp"

#include "broker/internal/limits.hpp"
#include "log.hpp"
#include "supervisor.hpp"

#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string_view>

namespace broker {

NotifyLine take_notify_line(std::string_view &text)
{
	std::size_t nl = text.find('\n');
	std::string_view line = text.substr(0, nl);
	text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
	if (line == "READY=1")
		return {NotifyLine::Kind::Ready, {}};
	if (line.starts_with("STATUS="))
		return {NotifyLine::Kind::Status, line.substr(7)};
	if (line == "STOPPING=1")
		return {NotifyLine::Kind::Stopping, {}};
	if (line.starts_with("MAINPID="))
		return {NotifyLine::Kind::MainPid, line.substr(8)};
	// Other assignments (WATCHDOG=1, ERRNO=, ...) are not for us.
	return {};
}

NotifySocket::NotifySocket(sd_event *event, Supervisor &supervisor, UniqueFd kept) : supervisor_(supervisor)
{
	sockaddr_un sa{};
	if (kept) {
		// The one a previous brokerd bound: its workers' NOTIFY_SOCKET names it.
		fd_ = std::move(kept);
	} else {
		fd_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
		if (!fd_)
			throw std::runtime_error(std::string("notify socket: ") + std::strerror(errno));
		// Binding only the family autobinds a unique abstract name.
		sa.sun_family = AF_UNIX;
		if (::bind(fd_.get(), reinterpret_cast<sockaddr *>(&sa), sizeof(sa_family_t)) < 0)
			throw std::runtime_error(std::string("notify socket: bind: ") + std::strerror(errno));
	}
	socklen_t len = sizeof(sa);
	if (::getsockname(fd_.get(), reinterpret_cast<sockaddr *>(&sa), &len) < 0)
		throw std::runtime_error(std::string("notify socket: getsockname: ") + std::strerror(errno));
	std::size_t name_len = len - offsetof(sockaddr_un, sun_path);
	address_ = "@" + std::string(sa.sun_path + 1, name_len > 0 ? name_len - 1 : 0);

	int one = 1;
	if (::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
		throw std::runtime_error(std::string("notify socket: SO_PASSCRED: ") + std::strerror(errno));

	sd_event_source *s = nullptr;
	int r = sd_event_add_io(event, &s, fd_.get(), EPOLLIN, handler, this);
	if (r < 0)
		throw std::runtime_error(std::string("notify socket: ") + std::strerror(-r));
	source_.reset(s);
}

int NotifySocket::handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("handler", [&]() -> int {
		static_cast<NotifySocket *>(userdata)->receive();
		return 0;
	});
}

void NotifySocket::receive()
{
	// Bounded per wakeup; the rest waits for the next turn of the loop.
	for (int round = 0; round < 64; round++) {
		char buf[limits::kMaxNotifyMessage + 1];
		alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred)) + CMSG_SPACE(sizeof(int) * 16)];
		iovec iov{buf, sizeof(buf)};
		msghdr msg{};
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = control;
		msg.msg_controllen = sizeof(control);
		ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC | MSG_TRUNC);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				log::warning(std::string("notify socket: ") + std::strerror(errno) + ", ignoring");
			return;
		}

		const ucred *cred = nullptr;
		bool had_fds = false;
		for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
			if (c->cmsg_level != SOL_SOCKET)
				continue;
			if (c->cmsg_type == SCM_CREDENTIALS && c->cmsg_len == CMSG_LEN(sizeof(ucred))) {
				cred = reinterpret_cast<const ucred *>(CMSG_DATA(c));
			} else if (c->cmsg_type == SCM_RIGHTS) {
				// Received fds are ours: close them (the fd store is not offered to workers).
				std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (std::size_t i = 0; i < count; i++) {
					int fd;
					std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					UniqueFd drop(fd);
				}
				had_fds = true;
			}
		}
		if (!cred) {
			log::warning("notify socket: message without credentials, ignoring");
			continue;
		}
		std::string who = "pid " + std::to_string(cred->pid);
		if (static_cast<std::size_t>(n) > limits::kMaxNotifyMessage || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
			log::warning("notify socket: oversized message from " + who + ", ignoring");
			continue;
		}
		Instance *inst = supervisor_.find_by_pid(cred->pid);
		if (!inst) {
			log::warning("notify socket: message from " + who + ", which is no instance, ignoring");
			continue;
		}
		if (had_fds)
			log::warning("instance " + inst->id + ": notify message carried fds, closed them");

		std::string_view text(buf, static_cast<std::size_t>(n));
		while (!text.empty()) {
			NotifyLine line = take_notify_line(text);
			if (line.kind == NotifyLine::Kind::Ready)
				supervisor_.instance_ready(*inst, "READY=1");
			else if (line.kind == NotifyLine::Kind::Status)
				supervisor_.instance_status(*inst, std::string(line.value));
			else if (line.kind == NotifyLine::Kind::Stopping)
				supervisor_.instance_stopping(*inst);
			else if (line.kind == NotifyLine::Kind::MainPid)
				supervisor_.instance_main_pid(*inst, static_cast<pid_t>(std::atoi(std::string(line.value).c_str())));
			if (!supervisor_.find_by_pid(cred->pid))
				break;
		}
	}
}

} // namespace broker
