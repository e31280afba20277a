// NotifySocket: READY=1, STATUS=, STOPPING=1 from workers, checked against their credentials.
#include "os/notify.hpp"

#include "proto/limits.hpp"
#include "os/closer.hpp"
#include "os/log.hpp"
#include "os/peer.hpp"
#include "supervisor/supervisor.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <stdexcept>
#include <string_view>

namespace brokerd {

#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76
#endif
#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

namespace {

// A whole decimal number in pid_t's range, above 0; anything else (a sign, a suffix, "123xyz",
// 4294967297) is 0.
pid_t parse_pid(std::string_view text)
{
	pid_t pid = 0;
	auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), pid);
	if (ec != std::errc() || end != text.data() + text.size() || pid <= 0)
		return 0;
	return pid;
}

} // namespace

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

NotifySocket::NotifySocket(sd_event *event, Supervisor &supervisor, proto::UniqueFd kept) : supervisor_(supervisor)
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
	// Built apart and moved in, not `"@" + std::string` nor assigned "@" then appended: GCC 12 at
	// -O3 warns falsely (-Wrestrict) on both.
	std::string address(1, '@');
	address.append(sa.sun_path + 1, name_len > 0 ? name_len - 1 : 0);
	address_ = std::move(address);

	int one = 1;
	if (::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
		throw std::runtime_error(std::string("notify socket: SO_PASSCRED: ") + std::strerror(errno));
	// Workers have no fd store here: a datagram with fds fails in the sender with EPERM.
	closer::pass_rights(fd_.get(), false);
	// The sender's pidfd with each datagram (Linux 6.5+): a pid reused since is told apart.
	(void)::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSPIDFD, &one, sizeof(one));

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

namespace {

// What came beside a notify message: the sender's credentials, its pidfd (invalid when it has
// gone), and whether it sent fds, which are closed off the loop.
struct Ancillary {
	const ucred *cred = nullptr;
	proto::UniqueFd sender;
	bool had_fds = false;
};

Ancillary read_ancillary(msghdr &msg)
{
	Ancillary a;
	for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET)
			continue;
		if (c->cmsg_type == SCM_CREDENTIALS && c->cmsg_len == CMSG_LEN(sizeof(ucred))) {
			a.cred = reinterpret_cast<const ucred *>(CMSG_DATA(c));
		} else if (c->cmsg_type == SCM_PIDFD && c->cmsg_len == CMSG_LEN(sizeof(int))) {
			int fd;
			std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
			a.sender.reset(fd);
		} else if (c->cmsg_type == SCM_RIGHTS) {
			// Received fds are ours (a kernel without SO_PASSRIGHTS): closed off the loop.
			std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (std::size_t i = 0; i < count; i++) {
				int fd;
				std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				proto::UniqueFd::from_peer(fd).reset();
			}
			a.had_fds = true;
		}
	}
	return a;
}

} // namespace

void NotifySocket::receive()
{
	// Bounded per wakeup; the rest waits for the next turn of the loop.
	for (int round = 0; round < 64; round++) {
		char buf[proto::limits::kMaxNotifyMessage + 1];
		alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred)) + CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(int) * 16)];
		iovec iov{buf, sizeof(buf)};
		msghdr msg{};
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = control;
		msg.msg_controllen = sizeof(control);
		// Peeked, and taken off the queue only once handled and what it changed is in the crash
		// state: a brokerd killed in between finds it again in the socket the fd store kept
		// (each line means the same when read twice).
		ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC | MSG_TRUNC | MSG_PEEK);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				log::client(log::Level::Warning, std::string("notify socket: ") + std::strerror(errno) + ", ignoring");
			return;
		}
		handle(msg, buf, n);
		char discard;
		while (::recv(fd_.get(), &discard, 1, MSG_DONTWAIT | MSG_TRUNC) < 0 && errno == EINTR) {
		}
	}
}

// One message, peeked: checked, then applied.
void NotifySocket::handle(msghdr &msg, const char *buf, ssize_t n)
{
	Ancillary anc = read_ancillary(msg);
	const ucred *cred = anc.cred;
	if (!cred) {
		log::client(log::Level::Warning, "notify socket: message without credentials, ignoring");
		return;
	}
	std::string who = "pid " + std::to_string(cred->pid);
	if (static_cast<std::size_t>(n) > proto::limits::kMaxNotifyMessage || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
		log::client(log::Level::Warning, "notify socket: oversized message from " + who + ", ignoring");
		return;
	}
	Instance *inst = supervisor_.find_by_pid(cred->pid);
	if (!inst) {
		log::client(log::Level::Warning, "notify socket: message from " + who + ", which is no instance, ignoring");
		return;
	}
	if (int own = supervisor_.pidfd_of(*inst, cred->pid); anc.sender && own >= 0 && !peer::same_process(anc.sender.get(), own)) {
		log::client(log::Level::Warning, "instance " + inst->id + ": notify message from " + who +
		                                     ", another process than its own by that pid, ignoring");
		return;
	}
	if (anc.had_fds)
		log::client(log::Level::Warning, "instance " + inst->id + ": notify message carried fds, closed them");

	if (apply(*inst, cred->pid, std::string_view(buf, static_cast<std::size_t>(n))) && persist)
		persist();
}

bool NotifySocket::apply(Instance &inst, pid_t pid, std::string_view text)
{
	bool lasting = false;
	while (!text.empty()) {
		NotifyLine line = take_notify_line(text);
		lasting |= line.kind == NotifyLine::Kind::Ready || line.kind == NotifyLine::Kind::Stopping ||
		           line.kind == NotifyLine::Kind::MainPid;
		if (line.kind == NotifyLine::Kind::Ready)
			supervisor_.instance_ready(inst, "READY=1");
		else if (line.kind == NotifyLine::Kind::Status) {
			if (auto why = supervisor_.instance_status(inst, std::string(line.value)))
				log::client(log::Level::Warning, "instance " + inst.id + ": STATUS= " + *why + ", ignoring");
		} else if (line.kind == NotifyLine::Kind::Stopping) {
			supervisor_.instance_stopping(inst);
		} else if (line.kind == NotifyLine::Kind::MainPid) {
			if (pid_t main = parse_pid(line.value); main > 0)
				supervisor_.instance_main_pid(inst, main);
			else
				log::client(log::Level::Warning, "instance " + inst.id + ": MAINPID= is not a process id, ignoring");
		}
		// A line may end the instance (its pid gone from it): the rest is no longer its.
		if (!supervisor_.find_by_pid(pid))
			break;
	}
	return lasting;
}

} // namespace brokerd
