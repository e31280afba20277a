// `brokerd --fd-holder`: the process that keeps brokerd's fds while no brokerd runs
// (daemon/fd_holder.hpp).
#include "daemon/fd_holder.hpp"

#include "daemon/fd_holder_wire.hpp"
#include "os/log.hpp"
#include "supervisor/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

namespace brokerd {

using namespace fdholder;

namespace {

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
	// Only brokerd starts it, with its listening socket and a first owner's connection.
	if (sd_is_socket_unix(kHolderListenFd, SOCK_SEQPACKET, 1, nullptr, 0) <= 0 ||
	    sd_is_socket_unix(kHolderOwnerFd, SOCK_SEQPACKET, 0, nullptr, 0) <= 0) {
		log::error("fd holder: brokerd starts it, with its sockets at fds " + std::to_string(kHolderListenFd) + " and " +
		           std::to_string(kHolderOwnerFd) + "; they are not there");
		return 2;
	}
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

int run_fd_holder(const std::string &path)
{
	return Holder(path).run();
}

} // namespace brokerd
