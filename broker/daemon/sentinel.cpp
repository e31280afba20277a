// The stop sentinel: `brokerd --sentinel`, and brokerd's side of it (daemon/sentinel.hpp).
#include "daemon/sentinel.hpp"

#include "daemon/helper.hpp"
#include "daemon/persist.hpp"
#include "os/log.hpp"
#include "os/peer.hpp"
#include "supervisor/process.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace brokerd {

namespace {

// A sentinel that dies sooner than this after its start is started again only this long after
// its start: one that cannot run is not restarted in a tight loop.
constexpr usec_t kRespawnInterval = 1'000'000;
// How long a clean stop waits for the sentinel to go.
constexpr int kStopWaitMs = 1000;

// SIGKILL to the process `id` names, if it is still that process.
bool kill_identified(pid_t pid, std::uint64_t start)
{
	if (pid <= 0 || start == 0)
		return false;
	auto fd = peer::reopen({pid, start});
	auto *pidfd = std::get_if<proto::UniqueFd>(&fd);
	return pidfd && process::pidfd_send_signal(pidfd->get(), SIGKILL) == 0;
}

} // namespace

int end_processes(const std::string &payload)
{
	nlohmann::json st = nlohmann::json::parse(payload);
	int killed = 0;
	std::vector<pid_t> sessions;
	for (const auto &svc : st.at("services"))
		for (const auto &gen : svc.at("generations"))
			for (const auto &inst : gen.at("instances")) {
				pid_t pid = inst.value("pid", 0);
				std::uint64_t start = inst.value("pid_start", std::uint64_t{0});
				if (pid <= 0)
					continue;
				killed += kill_identified(inst.value("main_pid", 0), inst.value("main_pid_start", std::uint64_t{0}));
				killed += kill_identified(pid, start);
				if (inst.value("external", false))
					continue;
				// A spawned process leads its own session: what is left in it goes too, unless a
				// process with the session's id is there and is not the leader the state names
				// (then the session ended, and its id names another's).
				pid_t session = inst.value("session", pid);
				auto leader = peer::identity(session);
				if (!leader || (session == pid && leader->start_ticks == start))
					sessions.push_back(session);
			}
	for (pid_t session : sessions)
		process::kill_session(session);
	return killed;
}

int run_sentinel()
{
	// A stop signal meant for brokerd, or a hangup of its terminal, is nothing to the sentinel.
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, nullptr);
	for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGPIPE})
		signal(sig, SIG_IGN);
	if (::getsid(0) != ::getpid())
		::setsid();
	::close_range(kSentinelStateFd + 1, ~0U, 0);

	char byte = 0;
	ssize_t n;
	for (;;) {
		pollfd p{kSentinelPipeFd, POLLIN, 0};
		if (::poll(&p, 1, -1) < 0 && errno != EINTR) {
			log::error(std::string("sentinel: poll: ") + std::strerror(errno));
			return 1;
		}
		n = ::read(kSentinelPipeFd, &byte, 1);
		if (n >= 0 || (errno != EINTR && errno != EAGAIN))
			break;
	}
	if (n > 0)
		return 0; // brokerd stops cleanly
	if (n < 0) {
		log::error(std::string("sentinel: read: ") + std::strerror(errno));
		return 1;
	}
	// No write end is left: brokerd is gone and so is the service manager's store.
	auto loaded = persist::read(kSentinelStateFd);
	if (auto *f = std::get_if<Failure>(&loaded)) {
		log::error("sentinel: brokerd is gone and its unit stopped, but the crash state is refused (" + f->why +
		           "); ending nothing");
		return 1;
	}
	const auto &slot = std::get<std::optional<persist::Loaded>>(loaded);
	if (!slot)
		return 0;
	try {
		if (nlohmann::json::parse(slot->payload).value("stopped", false))
			return 0;
		int killed = end_processes(slot->payload);
		log::notice("sentinel: brokerd is gone and its unit stopped: killed " + std::to_string(killed) +
		            " process(es) it had left, and what was left of their sessions");
	} catch (const nlohmann::json::exception &e) {
		log::error(std::string("sentinel: the crash state does not read: ") + e.what() + "; ending nothing");
		return 1;
	}
	return 0;
}

void dismiss_sentinel(int write_end)
{
	char q = 'q';
	(void)!::write(write_end, &q, 1);
}

bool SentinelKeeper::spawn()
{
	int p[2];
	if (::pipe2(p, O_CLOEXEC) < 0) {
		log::warning(std::string("sentinel: pipe: ") + std::strerror(errno));
		return false;
	}
	proto::UniqueFd read_end(p[0]), write_end(p[1]);
	// Read only: its own open of the memfd, not brokerd's.
	proto::UniqueFd state(::open(("/proc/self/fd/" + std::to_string(state_fd_)).c_str(), O_RDONLY | O_CLOEXEC));
	if (!state) {
		log::warning(std::string("sentinel: its fds: ") + std::strerror(errno));
		return false;
	}
	pid_t pid = spawn_helper({"--sentinel"}, {{read_end.get(), kSentinelPipeFd}, {state.get(), kSentinelStateFd}});
	if (pid < 0) {
		log::warning(std::string("sentinel: cannot start it: ") + std::strerror(-pid));
		return false;
	}
	if (!reap_when_done(pid)) {
		::kill(pid, SIGKILL);
		::waitpid(pid, nullptr, 0);
		log::warning("sentinel: cannot watch it");
		return false;
	}
	write_ = std::move(write_end);
	started_ = now_usec(CLOCK_MONOTONIC);
	return true;
}

void SentinelKeeper::start()
{
	if (!spawn())
		return;
	if (!hooks_.store(write_.get())) {
		// Nothing would hold the unit's stop: a sentinel would take brokerd's exit for it.
		log::warning("sentinel: the service manager did not take its pipe; none runs");
		dismiss_sentinel(write_.get());
		write_.reset();
		hangup_.reset();
		return;
	}
	log::info("sentinel: pid " + std::to_string(pid_) + " ends the workers if the unit stops while no brokerd runs");
	watch();
}

void SentinelKeeper::carry_on(proto::UniqueFd write_end, pid_t pid)
{
	write_ = std::move(write_end);
	started_ = now_usec(CLOCK_MONOTONIC);
	if (pid > 0)
		reap_when_done(pid);
	watch();
}

// Our child: reaped when it exits.
bool SentinelKeeper::reap_when_done(pid_t pid)
{
	proto::UniqueFd pidfd(process::pidfd_open(pid));
	sd_event_source *s = nullptr;
	if (!pidfd || sd_event_add_child_pidfd(event_, &s, pidfd.get(), WEXITED, on_exit, this) < 0)
		return false;
	sd_event_source_set_child_pidfd_own(s, true);
	(void)pidfd.release();
	child_.reset(s);
	pid_ = pid;
	return true;
}

// Every reader gone: the sentinel died.
void SentinelKeeper::watch()
{
	sd_event_source *s = nullptr;
	int r = sd_event_add_io(event_, &s, write_.get(), EPOLLERR, on_error, this);
	if (r < 0) {
		log::warning(std::string("sentinel: cannot watch its pipe: ") + std::strerror(-r));
		return;
	}
	hangup_.reset(s);
}

int SentinelKeeper::on_error(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("sentinel", [&]() -> int {
		auto *k = static_cast<SentinelKeeper *>(userdata);
		k->hangup_.reset();
		k->write_.reset();
		usec_t now = now_usec(CLOCK_MONOTONIC);
		if (now >= k->started_ + kRespawnInterval) {
			log::warning("sentinel: it is gone; starting another");
			k->hooks_.release();
			k->start();
			return 0;
		}
		log::warning("sentinel: it is gone right after its start; starting another in a second");
		auto again = [](sd_event_source *, std::uint64_t, void *ud) -> int {
			return guarded("sentinel", [&]() -> int {
				auto *keeper = static_cast<SentinelKeeper *>(ud);
				keeper->again_.reset();
				keeper->hooks_.release();
				keeper->start();
				return 0;
			});
		};
		sd_event_source *s = nullptr;
		if (sd_event_add_time(k->event_, &s, CLOCK_MONOTONIC, k->started_ + kRespawnInterval, 0, again, k) >= 0)
			k->again_.reset(s);
		return 0;
	});
}

int SentinelKeeper::on_exit(sd_event_source *, const siginfo_t *, void *userdata)
{
	auto *k = static_cast<SentinelKeeper *>(userdata);
	k->child_.reset();
	k->pid_ = 0;
	return 0;
}

void SentinelKeeper::stop()
{
	again_.reset();
	hangup_.reset();
	if (!write_)
		return;
	dismiss_sentinel(write_.get());
	// It exits at once; its end closes as it does. Until then the next check of what is left
	// would count it.
	pollfd p{write_.get(), 0, 0};
	int r;
	while ((r = ::poll(&p, 1, kStopWaitMs)) < 0 && errno == EINTR) {
	}
	if (r == 0)
		log::warning("sentinel: it did not exit within " + std::to_string(kStopWaitMs) + "ms of the stop");
	if (pid_ > 0 && r > 0) {
		child_.reset();
		::waitpid(pid_, nullptr, 0);
		pid_ = 0;
	}
	write_.reset();
	hooks_.release();
}

} // namespace brokerd
