// The fd holder: `brokerd --fd-holder`, and brokerd's side of it (daemon/fd_holder.hpp).
#include "daemon/fd_holder.hpp"

#include "daemon/helper.hpp"
#include "os/log.hpp"
#include "os/systemd_notify.hpp"
#include "supervisor/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <stdexcept>
#include <string_view>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

namespace brokerd {

namespace {

// SCM_MAX_FD: the most fds one message carries.
constexpr std::size_t kMaxFdsPerMessage = 253;
constexpr std::size_t kMaxMessage = 4096;
// How long a reply to FDGET may take to be taken, and a clean stop waits for the holder.
constexpr int kReplyMs = 5000;
constexpr int kStopWaitMs = 1000;

std::string errno_text(int e = errno)
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

// Who allowed() lets in, for messages.
std::string allowed_text()
{
	return ::geteuid() == 0 ? "root" : "root or " + uid_text(::geteuid());
}

// systemd's fdname_is_valid(): printable ASCII but ':', 1 to 255 bytes.
bool valid_name(std::string_view name)
{
	if (name.empty() || name.size() > 255)
		return false;
	return std::all_of(name.begin(), name.end(), [](char c) { return c >= ' ' && c <= '~' && c != ':'; });
}

// The value of `key=` among a message's lines.
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

// One message with at most one fd; false with errno when it could not go within `deadline_ms`.
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

// One message received: its text, its fds (CLOEXEC, ours from now on) and its sender's
// credentials when the socket passes them.
struct Received {
	std::string text;
	std::vector<proto::UniqueFd> fds;
	std::optional<ucred> cred;
	bool truncated = false;
};

// 1: a message; 0: end of stream; -1: errno (EAGAIN when none waits).
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

// The holder process: its fds, its owner and its loop.
class Holder {
public:
	explicit Holder(std::string path) : path_(std::move(path)) {}
	int run();

private:
	enum : std::uint64_t { kListenId = 0, kOwnerId = 1, kSignalId = 2, kFirstStoredId = 16 };
	struct Stored {
		std::string name;
		proto::UniqueFd fd;
		bool poll = true;
		dev_t dev = 0;
		ino_t ino = 0;
	};

	void accept_one();
	bool read_owner(); // false: the owner is gone
	void take_owner(proto::UniqueFd conn);
	void drop_owner(const char *why);
	bool owner_alive();
	void handle(Received &m);
	void store(const std::string &name, proto::UniqueFd fd, bool poll);
	void remove(const std::string &name);
	void reply_all();
	[[noreturn]] void finish(const std::string &why);

	std::string path_;
	dev_t path_dev_ = 0;
	ino_t path_ino_ = 0;
	proto::UniqueFd epoll_, signals_;
	proto::UniqueFd owner_, owner_pidfd_;
	pid_t owner_pid_ = 0;
	std::map<std::uint64_t, Stored> stored_; // by id: the order they came in
	std::uint64_t next_id_ = kFirstStoredId;
	std::size_t max_ = kFdHolderMax; // clipped to RLIMIT_NOFILE
	bool full_told_ = false;
};

int Holder::run()
{
	struct stat st {};
	if (path_[0] != '@' && ::stat(path_.c_str(), &st) == 0) {
		path_dev_ = st.st_dev;
		path_ino_ = st.st_ino;
	}
	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	sigprocmask(SIG_SETMASK, &stop, nullptr);
	// A hangup of brokerd's terminal, or a peer gone mid-reply, is nothing to the holder.
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	::close_range(kHolderOwnerFd + 1, ~0U, 0);
	// As many as it may open, but for room for its own few.
	constexpr rlim_t kOwnFds = 16;
	rlimit lim{};
	if (::getrlimit(RLIMIT_NOFILE, &lim) == 0) {
		lim.rlim_cur = lim.rlim_max;
		::setrlimit(RLIMIT_NOFILE, &lim);
		::getrlimit(RLIMIT_NOFILE, &lim);
		max_ = std::min<std::size_t>(kFdHolderMax, lim.rlim_cur > kOwnFds ? lim.rlim_cur - kOwnFds : 0);
	}
	epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
	signals_.reset(::signalfd(-1, &stop, SFD_CLOEXEC | SFD_NONBLOCK));
	if (!epoll_ || !signals_) {
		log::error("fd holder: " + errno_text());
		return 1;
	}
	::fcntl(kHolderListenFd, F_SETFL, ::fcntl(kHolderListenFd, F_GETFL) | O_NONBLOCK);
	epoll_event ev{EPOLLIN, {.u64 = kListenId}};
	::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, kHolderListenFd, &ev);
	ev = {EPOLLIN, {.u64 = kSignalId}};
	::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, signals_.get(), &ev);
	::fcntl(kHolderOwnerFd, F_SETFD, FD_CLOEXEC);
	::fcntl(kHolderOwnerFd, F_SETFL, ::fcntl(kHolderOwnerFd, F_GETFL) | O_NONBLOCK);
	take_owner(proto::UniqueFd(kHolderOwnerFd));

	for (;;) {
		epoll_event events[64];
		int n = ::epoll_wait(epoll_.get(), events, 64, -1);
		if (n < 0 && errno != EINTR)
			finish("epoll_wait: " + errno_text());
		for (int i = 0; i < n; ++i) {
			std::uint64_t id = events[i].data.u64;
			if (id == kListenId) {
				accept_one();
			} else if (id == kOwnerId) {
				if (owner_ && !read_owner())
					drop_owner("closed its connection");
			} else if (id == kSignalId) {
				signalfd_siginfo si{};
				if (::read(signals_.get(), &si, sizeof si) == sizeof si)
					finish(std::string("SIG") + sigabbrev_np(static_cast<int>(si.ssi_signo)));
			} else if (auto it = stored_.find(id); it != stored_.end()) {
				// As systemd: a kept fd that hangs up (a pipe whose writers are gone) goes.
				::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.fd.get(), nullptr);
				stored_.erase(it);
			}
		}
	}
}

void Holder::take_owner(proto::UniqueFd conn)
{
	ucred cred{};
	socklen_t len = sizeof cred;
	::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len);
	int pidfd = -1;
	len = sizeof pidfd;
	if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) < 0)
		pidfd = process::pidfd_open(cred.pid);
	owner_pidfd_.reset(pidfd);
	owner_pid_ = cred.pid;
	owner_ = std::move(conn);
	epoll_event ev{EPOLLIN, {.u64 = kOwnerId}};
	::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, owner_.get(), &ev);
}

void Holder::drop_owner(const char *why)
{
	::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, owner_.get(), nullptr);
	owner_.reset();
	owner_pidfd_.reset();
	log::notice("fd holder: brokerd pid " + std::to_string(owner_pid_) + " " + why + "; keeping " +
	            std::to_string(stored_.size()) + " fd(s) for the next brokerd");
	owner_pid_ = 0;
}

// Whether the owner's process still runs: a child of it between fork and exec may hold its end
// of the connection a moment after it died.
bool Holder::owner_alive()
{
	if (!owner_pidfd_)
		return true;
	pollfd p{owner_pidfd_.get(), POLLIN, 0};
	return ::poll(&p, 1, 0) == 0;
}

void Holder::accept_one()
{
	proto::UniqueFd conn(::accept4(kHolderListenFd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
	if (!conn)
		return;
	ucred cred{};
	socklen_t len = sizeof cred;
	if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || !allowed(cred.uid)) {
		log::client(log::Level::Warning, "fd holder: turned away pid " + std::to_string(cred.pid) + " of " +
		                                     uid_text(cred.uid) + ": only " + allowed_text() +
		                                     " may store or fetch");
		send_message(conn.get(), "DENIED=1", -1, 0);
		return;
	}
	// What the owner sent before it died comes first: the next brokerd must see it applied.
	if (owner_ && (!read_owner() || !owner_alive()))
		drop_owner("is gone");
	if (owner_) {
		log::client(log::Level::Notice, "fd holder: brokerd pid " + std::to_string(owner_pid_) +
		                                    " uses this holder; turned away pid " + std::to_string(cred.pid));
		send_message(conn.get(), "BUSY=1\nPID=" + std::to_string(owner_pid_), -1, 0);
		return;
	}
	take_owner(std::move(conn));
}

bool Holder::read_owner()
{
	for (;;) {
		Received m;
		int r = receive(owner_.get(), m, MSG_DONTWAIT);
		if (r < 0)
			return errno == EAGAIN;
		if (r == 0)
			return false;
		handle(m);
		if (!owner_)
			return true; // a failed reply dropped it already
	}
}

void Holder::handle(Received &m)
{
	if (m.truncated) {
		log::warning("fd holder: a message from brokerd was truncated; ignoring it and its fds");
		return;
	}
	std::string_view text = m.text;
	if (field(text, "STOP") == "1")
		finish("brokerd pid " + std::to_string(owner_pid_) + " stopped cleanly");
	if (field(text, "FDGET") == "1")
		return reply_all();
	if (field(text, "FDSTOREREMOVE") == "1") {
		auto name = field(text, "FDNAME");
		if (!name || !valid_name(*name))
			log::warning("fd holder: FDSTOREREMOVE=1 without a valid FDNAME; ignoring it");
		else
			remove(std::string(*name));
	}
	if (field(text, "FDSTORE") != "1")
		return; // READY=1, STATUS= and the like are the service manager's; fds without FDSTORE=1 are closed
	std::string name(field(text, "FDNAME").value_or("stored"));
	if (!valid_name(name)) {
		log::warning("fd holder: FDSTORE=1 with an invalid FDNAME; closing its fds");
		return;
	}
	bool poll = field(text, "FDPOLL") != "0";
	for (auto &fd : m.fds)
		store(name, std::move(fd), poll);
}

void Holder::store(const std::string &name, proto::UniqueFd fd, bool poll)
{
	struct stat st {};
	if (::fstat(fd.get(), &st) < 0)
		return;
	for (const auto &[id, s] : stored_)
		if (s.dev == st.st_dev && s.ino == st.st_ino)
			return; // the same file as one kept: a duplicate, as systemd drops it
	if (stored_.size() >= max_) {
		if (!full_told_)
			log::error("fd holder: full, it keeps " + std::to_string(max_) + " fds already; not keeping " +
			           name + " (nor any more until some go)");
		full_told_ = true;
		return;
	}
	full_told_ = false;
	std::uint64_t id = next_id_++;
	if (poll) {
		epoll_event ev{0, {.u64 = id}}; // POLLHUP and POLLERR are always reported
		if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd.get(), &ev) < 0) {
			log::warning("fd holder: cannot watch " + name + " (" + errno_text() +
			             "); an fd that cannot be polled comes with FDPOLL=0; not keeping it");
			return;
		}
	}
	stored_.emplace(id, Stored{name, std::move(fd), poll, st.st_dev, st.st_ino});
}

void Holder::remove(const std::string &name)
{
	std::erase_if(stored_, [&](auto &entry) {
		if (entry.second.name != name)
			return false;
		if (entry.second.poll)
			::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, entry.second.fd.get(), nullptr);
		return true;
	});
}

void Holder::reply_all()
{
	std::size_t sent = 0;
	for (const auto &[id, s] : stored_) {
		if (!send_message(owner_.get(), "FDNAME=" + s.name + (s.poll ? "" : "\nFDPOLL=0"), s.fd.get(), kReplyMs))
			break;
		++sent;
	}
	if (sent == stored_.size() && send_message(owner_.get(), "FDEND=" + std::to_string(sent), -1, kReplyMs))
		return;
	log::warning("fd holder: brokerd pid " + std::to_string(owner_pid_) + " did not take its fds: " + errno_text());
	drop_owner("did not take its fds");
}

void Holder::finish(const std::string &why)
{
	log::notice("fd holder: " + why + "; closing " + std::to_string(stored_.size()) + " fd(s) and exiting");
	stored_.clear();
	struct stat st {};
	if (path_ino_ && ::lstat(path_.c_str(), &st) == 0 && st.st_dev == path_dev_ && st.st_ino == path_ino_)
		::unlink(path_.c_str());
	std::exit(0);
}

} // namespace

std::string fd_holder_path(const std::string &control_path)
{
	return control_path + ".fdstore";
}

int run_fd_holder(const std::string &path)
{
	return Holder(path).run();
}

FdHolderLink::~FdHolderLink()
{
	if (stop_unused_)
		stop();
}

proto::UniqueFd FdHolderLink::open(std::vector<Fetched> &fetched)
{
	sockaddr_un addr;
	socklen_t len;
	if (!make_address(path_, addr, len)) {
		log::warning("fd holder: its socket path " + path_ + " is too long for a unix socket (" +
		             std::to_string(sizeof(addr.sun_path) - 1) +
		             " bytes at most); running without one: a brokerd started again after a crash of this one "
		             "starts clean. A shorter control.path gives one");
		return {};
	}
	struct stat st {};
	bool present = path_[0] != '@' && ::lstat(path_.c_str(), &st) == 0;
	if (present && !S_ISSOCK(st.st_mode))
		throw std::runtime_error("fd holder: " + path_ + " is there and is no socket; remove it");
	// Never hand brokerd's sockets to what another user put there.
	if (present && !allowed(st.st_uid))
		throw std::runtime_error("fd holder: " + path_ + " belongs to " + uid_text(st.st_uid) + ", not to " +
		                         allowed_text() + "; refusing to use it: remove it");
	proto::UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
	if (!fd)
		throw std::runtime_error("fd holder: socket: " + errno_text());
	int r;
	while ((r = ::connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), len)) < 0 && errno == EINTR) {
	}
	if (r == 0)
		return ask(std::move(fd), fetched);
	if (errno == ECONNREFUSED && present) {
		// A holder that died left its file: nobody listens there.
		if (::unlink(path_.c_str()) < 0 && errno != ENOENT)
			throw std::runtime_error("fd holder: cannot remove the stale socket " + path_ + ": " + errno_text());
		log::notice("fd holder: removed the stale socket " + path_ + ", which no holder listened on");
	} else if (errno != ENOENT && errno != ECONNREFUSED) {
		throw std::runtime_error("fd holder: cannot connect to " + path_ + ": " + errno_text());
	}
	proto::UniqueFd conn = spawn();
	if (!conn)
		throw std::runtime_error("fd holder: cannot start one at " + path_);
	stop_unused_ = true;
	return conn;
}

// FDGET=1 to a holder that listens: what it keeps, or why not.
proto::UniqueFd FdHolderLink::ask(proto::UniqueFd fd, std::vector<Fetched> &fetched)
{
	int one = 1;
	::setsockopt(fd.get(), SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
	// A holder that turns brokerd away answers at once and closes: its answer is still to read.
	if (!send_message(fd.get(), "FDGET=1", -1, kReplyMs) && errno != EPIPE && errno != ECONNRESET)
		throw std::runtime_error("fd holder at " + path_ + ": " + errno_text());
	auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(kReplyMs);
	std::optional<ucred> holder;
	for (;;) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
		pollfd p{fd.get(), POLLIN, 0};
		if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) == 0)
			throw std::runtime_error("fd holder at " + path_ + ": no answer within " + std::to_string(kReplyMs) + "ms");
		Received m;
		int r = receive(fd.get(), m, MSG_DONTWAIT);
		// A holder that turns brokerd away closes with FDGET unread: the kernel reports that as a
		// reset once, and the answer is still there to read.
		if (r < 0 && (errno == EAGAIN || errno == ECONNRESET))
			continue;
		if (r <= 0)
			throw std::runtime_error("fd holder at " + path_ + ": the connection ended before its answer" +
			                         (r < 0 ? ": " + errno_text() : std::string()));
		std::string_view text = m.text;
		if (field(text, "BUSY") == "1")
			throw std::runtime_error("brokerd pid " + std::string(field(text, "PID").value_or("?")) +
			                         " runs, and uses the fd holder at " + path_ +
			                         ": two cannot supervise the same workers");
		if (field(text, "DENIED") == "1")
			throw std::runtime_error("the fd holder at " + path_ + " refused " + uid_text(::geteuid()));
		if (!holder) {
			// The sender's credentials, as the kernel saw them: the process that answers.
			if (!m.cred)
				throw std::runtime_error("fd holder at " + path_ + ": its answer carries no credentials");
			if (!allowed(m.cred->uid))
				throw std::runtime_error("fd holder at " + path_ + ": the process that answers, pid " +
				                         std::to_string(m.cred->pid) + ", runs as " + uid_text(m.cred->uid) +
				                         ", not as " + allowed_text() + "; refusing to use it");
			holder = m.cred;
		}
		if (m.truncated)
			throw std::runtime_error("fd holder at " + path_ + ": a truncated answer");
		if (auto end = field(text, "FDEND")) {
			std::size_t count = 0;
			std::from_chars(end->data(), end->data() + end->size(), count);
			if (count != fetched.size())
				throw std::runtime_error("fd holder at " + path_ + ": it sent " + std::to_string(fetched.size()) +
				                         " fds but counted " + std::string(*end));
			break;
		}
		auto name = field(text, "FDNAME");
		if (!name || !valid_name(*name) || m.fds.size() != 1 || fetched.size() >= kFdHolderMax)
			throw std::runtime_error("fd holder at " + path_ + ": an answer that does not read");
		fetched.push_back({std::string(*name), std::move(m.fds[0]), field(text, "FDPOLL") != "0"});
	}
	int off = 0;
	::setsockopt(fd.get(), SOL_SOCKET, SO_PASSCRED, &off, sizeof off);
	pid_ = holder->pid;
	pidfd_.reset(process::pidfd_open(pid_));
	child_ = false;
	conn_.reset(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 3));
	log::notice("fd holder: pid " + std::to_string(pid_) + " at " + path_ + " passed " +
	            std::to_string(fetched.size()) + " fd(s)");
	return fd;
}

proto::UniqueFd FdHolderLink::start()
{
	if (path_[0] != '@')
		::unlink(path_.c_str()); // the holder before is gone: its file is stale
	return spawn();
}

// A new holder at path_: bound and listening before it runs, so that no brokerd that looks for
// it meanwhile takes its file for a stale one; brokerd's connection is its first owner.
proto::UniqueFd FdHolderLink::spawn()
{
	sockaddr_un addr;
	socklen_t len;
	if (!make_address(path_, addr, len))
		return {};
	proto::UniqueFd listener(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
	if (!listener) {
		log::warning("fd holder: socket: " + errno_text());
		return {};
	}
	// 0600 from birth: nobody else may even connect.
	mode_t old = ::umask(0177);
	int r = ::bind(listener.get(), reinterpret_cast<sockaddr *>(&addr), len);
	int err = errno;
	::umask(old);
	if (r < 0 || ::listen(listener.get(), 16) < 0) {
		log::warning("fd holder: cannot listen on " + path_ + ": " + errno_text(r < 0 ? err : errno));
		return {};
	}
	int pair[2];
	if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) {
		log::warning("fd holder: socketpair: " + errno_text());
		return {};
	}
	proto::UniqueFd ours(pair[0]), theirs(pair[1]);
	pid_t pid = spawn_helper({"--fd-holder", path_}, {{listener.get(), kHolderListenFd}, {theirs.get(), kHolderOwnerFd}});
	if (pid < 0) {
		log::warning("fd holder: cannot start it: " + errno_text(-pid));
		if (path_[0] != '@')
			::unlink(path_.c_str());
		return {};
	}
	pid_ = pid;
	child_ = true;
	pidfd_.reset(process::pidfd_open(pid));
	conn_.reset(::fcntl(ours.get(), F_DUPFD_CLOEXEC, 3));
	log::info("fd holder: pid " + std::to_string(pid) + " at " + path_ + " keeps brokerd's fds while no brokerd runs");
	return ours;
}

void FdHolderLink::carry_on(int connection, pid_t pid, bool child)
{
	conn_.reset(::fcntl(connection, F_DUPFD_CLOEXEC, 3));
	pid_ = pid;
	child_ = child;
	pidfd_.reset(process::pidfd_open(pid));
}

void FdHolderLink::watch(sd_event *event, std::function<void()> lost)
{
	event_ = event;
	lost_ = std::move(lost);
	source_.reset();
	if (!pidfd_) {
		log::warning("fd holder: pid " + std::to_string(pid_) + " cannot be watched: " + errno_text());
		return;
	}
	sd_event_source *s = nullptr;
	int r;
	if (child_) {
		r = sd_event_add_child_pidfd(event, &s, pidfd_.get(), WEXITED, on_exit, this);
	} else {
		r = sd_event_add_io(event, &s, pidfd_.get(), EPOLLIN, on_pidfd, this);
	}
	if (r < 0) {
		log::warning("fd holder: cannot watch pid " + std::to_string(pid_) + ": " + errno_text(-r));
		return;
	}
	source_.reset(s);
}

int FdHolderLink::on_exit(sd_event_source *, const siginfo_t *, void *userdata)
{
	static_cast<FdHolderLink *>(userdata)->gone();
	return 0;
}

int FdHolderLink::on_pidfd(sd_event_source *, int, std::uint32_t, void *userdata)
{
	static_cast<FdHolderLink *>(userdata)->gone();
	return 0;
}

void FdHolderLink::gone()
{
	guarded("fd holder", [&]() -> int {
		source_.reset();
		pidfd_.reset();
		conn_.reset();
		if (lost_)
			lost_();
		return 0;
	});
}

void FdHolderLink::stop()
{
	stop_unused_ = false;
	source_.reset();
	if (!conn_)
		return;
	if (!send_message(conn_.get(), "STOP=1", -1, kStopWaitMs))
		log::warning("fd holder: pid " + std::to_string(pid_) + " was not told to stop: " + errno_text());
	conn_.reset();
	// It exits at once, its socket file with it; until then the next check of what is left would
	// count it.
	int r = 0;
	if (pidfd_) {
		pollfd p{pidfd_.get(), POLLIN, 0};
		while ((r = ::poll(&p, 1, kStopWaitMs)) < 0 && errno == EINTR) {
		}
	}
	if (r == 0)
		log::warning("fd holder: pid " + std::to_string(pid_) + " did not exit within " + std::to_string(kStopWaitMs) +
		             "ms of the stop");
	else if (child_)
		::waitpid(pid_, nullptr, 0);
	pidfd_.reset();
}

} // namespace brokerd
