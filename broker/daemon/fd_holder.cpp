// brokerd's side of the fd holder: finding it or starting one, watching it, stopping it
// (daemon/fd_holder.hpp).
#include "daemon/fd_holder.hpp"

#include "daemon/fd_holder_wire.hpp"
#include "daemon/helper.hpp"
#include "os/log.hpp"
#include "os/paths.hpp"
#include "supervisor/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <stdexcept>

namespace brokerd {

using namespace fdholder;

namespace {

// How long a clean stop waits for the holder to exit.
constexpr int kStopWaitMs = 1000;

} // namespace

std::string fd_holder_path(const std::string &control_path)
{
	return control_path + ".fdstore";
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
	// Non-blocking: a holder that takes no connection (its queue full) must not hold brokerd up.
	proto::UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd)
		throw std::runtime_error("fd holder: socket: " + errno_text());
	int r;
	while ((r = ::connect(fd.get(), reinterpret_cast<sockaddr *>(&addr), len)) < 0 && errno == EINTR) {
	}
	if (r == 0)
		return ask(std::move(fd), fetched);
	if (errno == EAGAIN)
		throw std::runtime_error("fd holder: the one at " + path_ + " takes no connection (its queue is full)");
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
	// Beside the control socket, whose directory may not exist yet (brokerd binds that later).
	if (auto why = path_[0] == '@' ? std::nullopt : make_parent_directory(path_)) {
		log::warning("fd holder: " + *why);
		return {};
	}
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
