// An instance's lifecycle: ready, status, stopping, main pid, exit, restart, drain, signals, and
// the start, drain and restart timers.
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
#include "proto/status_text.hpp"
#include "supervisor/process.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace brokerd {

using namespace process;

namespace {

std::string describe_exit(const siginfo_t &si)
{
	if (si.si_code == CLD_EXITED)
		return "exited with status " + std::to_string(si.si_status);
	const char *name = sigabbrev_np(si.si_status);
	return std::string("killed by SIG") + (name ? name : std::to_string(si.si_status).c_str());
}

} // namespace

void Supervisor::set_state(Instance &inst, InstanceState s)
{
	inst.state = s;
	inst.since = now_usec(CLOCK_REALTIME);
}

void Supervisor::arm_timer(Instance &inst, usec_t after, int (*cb)(sd_event_source *, std::uint64_t, void *))
{
	sd_event_source *s = nullptr;
	usec_t when = now_usec(CLOCK_MONOTONIC) + after;
	int r = sd_event_add_time(event_, &s, CLOCK_MONOTONIC, when, 1000, cb, &inst);
	if (r < 0) {
		log::error("instance " + inst.id + ": cannot add timer: " + errno_text(-r));
		inst.timer.reset();
		return;
	}
	inst.timer.reset(s);
}

int Supervisor::child_handler(sd_event_source *, const siginfo_t *si, void *userdata)
{
	return guarded("child_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		siginfo_t copy = *si;
		inst.supervisor->on_exit(inst, copy);
		return 0;
	});
}

void Supervisor::on_exit(Instance &inst, const siginfo_t &si)
{
	// Learn whether exec failed before judging the exit, and flush what the worker printed. A
	// forking server names its main process (MAINPID=) just before its first one exits: what the
	// notify socket holds is read first, whichever the event loop saw first.
	on_exec_status(inst, true);
	if (read_notifications)
		read_notifications();
	for (OutputPipe *p : {&inst.out, &inst.err})
		if (p->fd)
			on_output(inst, *p, false);
	if (inst.main_pid && si.si_code == CLD_EXITED && si.si_status == 0 && ::kill(inst.main_pid, 0) == 0) {
		// A forking server: its first process is done, the main pid it named serves on.
		log::info("instance " + inst.id + ": pid " + std::to_string(inst.pid) + " exited, main pid " +
		          std::to_string(inst.main_pid) + " continues");
		inst.pid = std::exchange(inst.main_pid, 0);
		inst.pid_start = std::exchange(inst.main_pid_start, 0);
		inst.origin = InstanceOrigin::Forked; // watched through its pidfd from now on, like a registered worker
		sd_event_source *s = nullptr;
		if (sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst) >= 0) {
			inst.child_source.reset(s);
			// Its exec succeeded, as it ran to the end: "exec" readiness, which waited for the
			// exec status, may have seen the exit first.
			if (inst.generation->cfg.ready == config::ReadyMode::Exec && inst.state == InstanceState::Starting)
				instance_ready(inst, "exec");
			return;
		}
	}
	// Its last calls, too: a sender on a direct channel tells the counts just before it exits.
	if (inst.events)
		inst.events->read_rest();
	// Leftover processes of the instance's session go with it: no worker is orphaned.
	::kill(-inst.session, SIGKILL);

	std::string how = describe_exit(si);
	bool clean = si.si_code == CLD_EXITED && si.si_status == 0;
	if (inst.exit_reason.empty())
		inst.exit_reason = how;
	// Expected only when brokerd asked it to go: a worker that drains on its own (STOPPING=1) and
	// exits is judged like any other exit.
	bool expected = inst.retired() || shutting_down_;
	std::string pid = std::to_string(inst.pid);
	if (expected)
		log::info("instance " + inst.id + ": pid " + pid + " " + how);
	else
		log::warning("instance " + inst.id + ": pid " + pid + " " + how + " unexpectedly");
	after_exit(inst, clean || expected);
}

void Supervisor::after_exit(Instance &inst, bool clean)
{
	bool expected = inst.retired() || shutting_down_;
	switch (inst.origin) {
	case InstanceOrigin::Registered:
		// A registered instance is never restarted by us: whoever started it decides.
		inst.retire();
		inst.child_source.reset();
		inst.pidfd.reset();
		break;
	case InstanceOrigin::Forked:
		// A forking server's main process: the slot restarts under its policy like any other.
		inst.child_source.reset();
		inst.pidfd.reset();
		inst.origin = InstanceOrigin::Spawned;
		break;
	case InstanceOrigin::Spawned:
		break;
	}
	inst.timer.reset();
	inst.events = nullptr;
	inst.token.clear();
	// Whatever it received of a handoff in doubt closed with it.
	doubts_.gone(inst.id);
	settle_doubts(doubts_.take_resolved());
	inst.exec_source.reset();
	inst.exec_status.reset();
	set_state(inst, expected || clean ? InstanceState::Exited : InstanceState::Failed);

	// Feed the rollout first so the event already shows the new counts.
	Service &svc = *inst.service;
	Upgrade *up = svc.upgrade.get();
	std::optional<RolloutStep> step;
	if (up && inst.generation == up->to && up->rollout.phase() == RolloutPhase::Rolling && !expected) {
		// A new instance that dies before the upgrade is done fails the upgrade.
		up->failed_instance = inst.id;
		up->failed_output.assign(inst.last_lines.begin(), inst.last_lines.end());
		inst.retire();
		step = up->rollout.fail("instance " + inst.id + " " + inst.exit_reason);
	} else if (up && inst.generation == up->from && up->rollout.phase() == RolloutPhase::Rolling) {
		// Only the exit of one it drained counts as such. A registered worker gone on its own is
		// one fewer to drain (a spawned one restarts, or its empty slot is drained later).
		if (inst.purpose == InstancePurpose::RolloutDrained)
			step = up->rollout.old_exited();
		else if (inst.registered())
			step = up->rollout.old_lost();
	}
	emit(inst, expected || clean ? EventKind::Exited : EventKind::Failed, inst.exit_reason);
	inst.pid = 0;
	inst.pid_start = 0;

	if (step) {
		apply(svc, *step);
	} else if (!expected && !shutting_down_ && !inst.retired() && !svc.stopped) {
		const auto policy = inst.generation->cfg.restart;
		bool restart = policy == config::RestartPolicy::Always ||
		               (policy == config::RestartPolicy::OnFailure && !clean);
		if (restart)
			schedule_restart(inst);
		if (up && inst.purpose == InstancePurpose::Restored && inst.generation == up->from &&
		    up->rollout.phase() == RolloutPhase::RollingBack) {
			// A refill that failed must not hold the rollback open: it ends short, and the slot
			// goes on under its restart policy.
			log::error("instance " + inst.id + ": could not be restored, the rollback ends short of full capacity");
			inst.purpose = InstancePurpose::Serving;
			apply(svc, up->rollout.restored_ready());
		}
	}
	if (inst.state != InstanceState::Restarting && (inst.generation != svc.current || svc.removing))
		inst.retire();
	schedule_prune();
	check_waiters(svc);
	changed();
}

void Supervisor::schedule_restart(Instance &inst)
{
	// A start timeout is a failure like a crash: a worker that never gets ready is stopped too.
	const config::ServiceConfig &cfg = inst.generation->cfg;
	usec_t start_timeout = cfg.ready == config::ReadyMode::Exec ? 0 : usec(cfg.start_timeout);
	RestartBackoff::Decision d = inst.backoff.failed(now_usec(CLOCK_MONOTONIC), start_timeout);
	if (d.crash_loop) {
		std::string msg = "crash loop (" + std::to_string(d.failures) + " failures within " +
		                  std::to_string(d.window / 1'000'000) + "s), not restarting; last: " + inst.exit_reason;
		log::error("instance " + inst.id + ": " + msg);
		emit(inst, EventKind::CrashLoop, msg);
		return;
	}
	log::info("instance " + inst.id + ": restarting in " + std::to_string(msec(d.delay)) + "ms");
	// The slot counts as starting again, so readiness waits for it.
	set_state(inst, InstanceState::Restarting);
	arm_timer(inst, d.delay, restart_handler);
}

int Supervisor::restart_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("restart_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		if (!inst.supervisor->shutting_down_ && !inst.retired()) {
			inst.restarts++;
			inst.supervisor->spawn(inst);
		}
		return 0;
	});
}

int Supervisor::start_timeout_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("start_timeout_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		if (inst.state != InstanceState::Starting || !inst.pid)
			return 0;
		auto secs = std::chrono::duration_cast<std::chrono::milliseconds>(inst.generation->cfg.start_timeout).count();
		std::string why = "was not ready within the start timeout (" + std::to_string(secs) + "ms)";
		log::error("instance " + inst.id + ": " + why + ", sending SIGKILL");
		inst.supervisor->kill_instance(inst, std::move(why));
		return 0;
	});
}

int Supervisor::drain_timeout_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("drain_timeout_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		if (!inst.pid)
			return 0;
		Supervisor &sup = *inst.supervisor;
		bool budget = sup.shutting_down_ && now_usec(CLOCK_MONOTONIC) >= sup.shutdown_deadline_;
		log::warning("instance " + inst.id + (budget ? ": shutdown timeout" : ": drain timeout") + ", sending SIGKILL");
		sup.kill_instance(inst, budget ? "killed at the shutdown timeout" : "killed at the drain timeout");
		return 0;
	});
}

void Supervisor::kill_instance(Instance &inst, std::string reason)
{
	inst.exit_reason = std::move(reason);
	signal(inst, SIGKILL);
	// With MAINPID= named, that went to the main process: its session goes too, the first
	// process included, whose exit is what is watched until then.
	if (!inst.registered())
		::kill(-inst.session, SIGKILL);
}

bool Supervisor::signal(Instance &inst, int sig)
{
	if (!inst.pid || !inst.child_source)
		return false;
	int pidfd = inst.watched_by_pidfd() || inst.main_pid ? inst.pidfd.get()
	                                                          : sd_event_source_get_child_pidfd(inst.child_source.get());
	if (pidfd < 0)
		return false;
	if (pidfd_send_signal(pidfd, sig) == 0)
		return true;
	if (errno != ESRCH)
		log::warning("instance " + inst.id + ": cannot send signal: " + errno_text(errno) + ", ignoring");
	return false;
}

void Supervisor::drain(Instance &inst, std::optional<config::Duration> timeout)
{
	if (!inst.pid) {
		// Not running (failed, or waiting to restart): nothing to drain, and no restart either.
		inst.timer.reset();
		if (inst.state == InstanceState::Restarting)
			set_state(inst, InstanceState::Exited);
		inst.retire();
		schedule_prune();
		return;
	}
	if (inst.state == InstanceState::Draining)
		return;
	const auto &cfg = inst.generation->cfg;
	const usec_t time = drain_time(timeout.value_or(cfg.drain_timeout));
	set_state(inst, InstanceState::Draining);
	emit(inst, EventKind::Draining);
	arm_timer(inst, time, drain_timeout_handler);
	// Told at the end of this turn of the loop, once the crash state says it drains: a brokerd
	// killed in between is followed by one that takes its exit for the one it asked for.
	inst.drain_untold = true;
	hold();
}

usec_t Supervisor::drain_left(const Instance &inst) const
{
	std::uint64_t deadline = 0;
	if (!inst.timer || sd_event_source_get_time(inst.timer.get(), &deadline) < 0)
		return usec(inst.generation->cfg.drain_timeout);
	usec_t now = now_usec(CLOCK_MONOTONIC);
	return deadline > now ? deadline - now : 0;
}

void Supervisor::tell_drain(Instance &inst)
{
	inst.drain_untold = false;
	const auto &cfg = inst.generation->cfg;
	if (inst.events && inst.events->send_drain(drain_left(inst))) {
		log::info("instance " + inst.id + ": drain requested");
		return;
	}
	const char *name = sigabbrev_np(cfg.drain_signal);
	log::info("instance " + inst.id + ": draining with SIG" + (name ? name : std::to_string(cfg.drain_signal)));
	signal(inst, cfg.drain_signal);
}

usec_t Supervisor::drain_time(config::Duration timeout) const
{
	if (!shutting_down_)
		return usec(timeout);
	usec_t now = now_usec(CLOCK_MONOTONIC);
	return std::min(usec(timeout), shutdown_deadline_ > now ? shutdown_deadline_ - now : 0);
}

void Supervisor::instance_ready(Instance &inst, std::string_view how)
{
	if (inst.state != InstanceState::Starting || !inst.pid)
		return;
	set_state(inst, InstanceState::Ready);
	inst.backoff.ready(now_usec(CLOCK_MONOTONIC));
	inst.timer.reset();
	log::info("instance " + inst.id + ": ready (" + std::string(how) + ")");
	Service &svc = *inst.service;
	Upgrade *up = svc.upgrade.get();
	std::optional<RolloutStep> step;
	if (up && !inst.retired() && inst.generation == up->to)
		step = up->rollout.new_ready();
	else if (up && inst.generation == up->from && inst.purpose == InstancePurpose::Restored)
		step = up->rollout.restored_ready();
	emit(inst, EventKind::Ready);
	if (shutting_down_ || inst.retired() || svc.stopped)
		drain(inst);
	else if (step)
		apply(svc, *step);
	check_waiters(svc);
	changed();
}

std::optional<std::string> Supervisor::instance_status(Instance &inst, std::string text)
{
	if (auto why = proto::check_status_text(text))
		return why;
	inst.status_text = std::move(text);
	return std::nullopt;
}

void Supervisor::instance_stopping(Instance &inst)
{
	if (inst.state == InstanceState::Ready || inst.state == InstanceState::Starting) {
		set_state(inst, InstanceState::Draining);
		emit(inst, EventKind::Draining, "STOPPING=1");
		arm_timer(inst, usec(inst.generation->cfg.drain_timeout), drain_timeout_handler);
		changed();
	}
}

void Supervisor::instance_main_pid(Instance &inst, pid_t pid)
{
	// Only a process of the instance's own session may become its main process. The pidfd is
	// opened first, and the process it names is still alive after the session check: a pid
	// reused in between is never adopted.
	proto::UniqueFd pidfd(pid > 0 && !inst.registered() ? pidfd_open(pid) : -1);
	if (!pidfd || ::getsid(pid) != inst.session || pidfd_send_signal(pidfd.get(), 0) < 0) {
		log::client(log::Level::Warning, "instance " + inst.id + ": MAINPID=" + std::to_string(pid) +
		                                     " is not a process of its session, ignoring");
		return;
	}
	if (inst.origin == InstanceOrigin::Forked) {
		// Its main process handed over to another (a binary upgrade): watch that one instead.
		sd_event_source *s = nullptr;
		int r = sd_event_add_io(event_, &s, pidfd.get(), EPOLLIN, external_handler, &inst);
		if (r < 0) {
			log::warning("instance " + inst.id + ": MAINPID=" + std::to_string(pid) + ": " + errno_text(-r) + ", ignoring");
			return;
		}
		inst.child_source.reset(s);
		inst.pid = pid;
		inst.pid_start = start_time(pid);
	} else {
		inst.main_pid = pid == inst.pid ? 0 : pid;
		inst.main_pid_start = inst.main_pid ? start_time(pid) : 0;
	}
	inst.pidfd = std::move(pidfd);
	log::info("instance " + inst.id + ": main pid is now " + std::to_string(pid));
}

} // namespace brokerd
