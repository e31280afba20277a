// Taking over processes brokerd did not start in this run: a service restored from a saved state
// (reexec) is watched again, and whether brokerd may save its state now (busy); after a crash of
// the brokerd before, its processes are found again by their identity (readopt).
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
#include "os/peer.hpp"
#include "supervisor/process.hpp"

#include <sys/wait.h>

namespace brokerd {

using namespace process;

std::optional<std::string> Supervisor::busy() const
{
	if (shutting_down_)
		return "brokerd is shutting down";
	if (router_.batches_in_flight() > 0)
		return "connections are being handed off";
	for (const auto &svc : services_) {
		if (svc->upgrade)
			return "an upgrade of " + svc->name + " is in progress";
		if (svc->removing)
			return "service " + svc->name + " is being removed";
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				if (inst->state == InstanceState::Restarting)
					return "instance " + inst->id + " is waiting to restart";
				if (inst->state == InstanceState::Draining)
					return "instance " + inst->id + " is draining";
				if (inst->state == InstanceState::Starting || inst->exec_source)
					return "instance " + inst->id + " is starting";
			}
	}
	return std::nullopt;
}

// A service restored from a saved state: its instances are watched again.
void Supervisor::adopt(std::unique_ptr<Service> svc)
{
	for (auto &gen : svc->generations)
		for (auto &inst : gen->instances) {
			inst->supervisor = this;
			watch_restored(*inst);
		}
	log::info("service " + svc->name + ": carried on" +
	          (svc->current ? " at gen " + std::to_string(svc->current->number) : std::string()));
	services_.push_back(std::move(svc));
	changed();
}

// The output pipes a restored instance came with, read again.
void Supervisor::watch_output(Instance &inst)
{
	sd_event_source *s = nullptr;
	for (OutputPipe *pipe : {&inst.out, &inst.err})
		if (pipe->fd && sd_event_add_io(event_, &s, pipe->fd.get(), EPOLLIN, output_handler, &inst) >= 0)
			pipe->source.reset(s);
}

void Supervisor::watch_restored(Instance &inst)
{
	watch_output(inst);
	sd_event_source *s = nullptr;
	if (inst.pid <= 0)
		return;

	// Children stay children across execve: a spawned worker is watched as before, and one that
	// exited meanwhile is a zombie that sd-event reaps at once.
	if (inst.origin == InstanceOrigin::Spawned) {
		proto::UniqueFd pidfd(pidfd_open(inst.pid));
		int r = pidfd ? sd_event_add_child_pidfd(event_, &s, pidfd.get(), WEXITED, child_handler, &inst) : -errno;
		if (r < 0)
			throw std::runtime_error("instance " + inst.id + ": cannot watch pid " + std::to_string(inst.pid) + ": " +
			                         errno_text(-r));
		sd_event_source_set_child_pidfd_own(s, 1);
		(void)pidfd.release();
		inst.child_source.reset(s);
		if (inst.main_pid > 0 && !inst.pidfd) {
			inst.main_pid = 0; // no way to name it safely any more: the session's SIGKILL remains
			inst.main_pid_start = 0;
		}
		return;
	}
	if (!inst.pidfd) {
		// Nothing names it safely any more. A registered worker is never restarted by us anyway.
		log::warning("instance " + inst.id + ": pid " + std::to_string(inst.pid) + " came without its pidfd, forgetting it");
		inst.pid = 0;
		inst.pid_start = 0;
		inst.retire();
		inst.token.clear();
		set_state(inst, InstanceState::Exited);
		schedule_prune();
		return;
	}
	if (sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst) >= 0)
		inst.child_source.reset(s);
}

} // namespace brokerd

namespace brokerd {

namespace {

// What is left until a dead brokerd's deadline (CLOCK_MONOTONIC), or `otherwise` without one.
usec_t remaining(usec_t deadline, usec_t otherwise)
{
	if (!deadline)
		return otherwise;
	usec_t now = now_usec(CLOCK_MONOTONIC);
	return deadline > now ? deadline - now : 0;
}

} // namespace

void Supervisor::readopt(std::unique_ptr<Service> svc)
{
	Service &ref = *svc;
	services_.push_back(std::move(svc));
	unsigned kept = 0;
	std::size_t lost_before = recovery_.lost.size();
	for (auto &gen : ref.generations)
		for (auto &inst : gen->instances) {
			inst->supervisor = this;
			if (readopt(*inst))
				kept++;
		}
	recovery_.kept += kept;
	// Handoffs the crash interrupted wait until every instance that may hold part of one has
	// said what it got, or at most kResumeTimeout.
	if (doubts_.silent() > 0 && !doubts_timer_) {
		sd_event_source *s = nullptr;
		int r = sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC, kResumeTimeout, 1000, doubts_handler, this);
		if (r < 0)
			log::error("cannot add the timer for handoffs in doubt: " + errno_text(-r)); // they wait for every instance
		doubts_timer_.reset(s);
	}
	recover_upgrade(ref);
	log::notice("service " + ref.name + ": " + std::to_string(kept) + " process(es) found again after the crash, " +
	            std::to_string(recovery_.lost.size() - lost_before) + " gone while brokerd was down");
	changed();
}

bool Supervisor::readopt(Instance &inst)
{
	watch_output(inst);
	sd_event_source *s = nullptr;
	const usec_t deadline = std::exchange(inst.restored_deadline, 0);
	const config::ServiceConfig &cfg = inst.generation->cfg;
	if (inst.pid <= 0) {
		// Waiting to restart: it does when the dead brokerd would have done it.
		if (inst.state == InstanceState::Restarting && !inst.retired())
			arm_timer(inst, remaining(deadline, 0), restart_handler);
		return false;
	}

	// The process that serves: the main process a forking server named, or the first one.
	const bool main = inst.main_pid > 0;
	peer::ProcessIdentity id{main ? inst.main_pid : inst.pid, main ? inst.main_pid_start : inst.pid_start};
	inst.pid = id.pid;
	inst.pid_start = id.start_ticks;
	inst.main_pid = 0;
	inst.main_pid_start = 0;
	auto found = peer::reopen(id);
	if (auto *f = std::get_if<Failure>(&found)) {
		lost_while_down(inst, f->why);
		return false;
	}
	inst.pidfd = std::move(std::get<proto::UniqueFd>(found));
	// No child of this brokerd: watched through its pidfd, as a forking server's main process.
	if (!inst.registered())
		inst.origin = InstanceOrigin::Forked;
	inst.awaiting_hello = inst.registered();
	int r = sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst);
	if (r < 0) {
		// Only fd exhaustion gets here: one that cannot be watched is not left running unwatched.
		log::error("instance " + inst.id + ": cannot watch pid " + std::to_string(inst.pid) + ": " + errno_text(-r) +
		           ", stopping it");
		pidfd_send_signal(inst.pidfd.get(), SIGKILL);
		lost_while_down(inst, "could not be watched again");
		return false;
	}
	inst.child_source.reset(s);
	// It spoke to the brokerd that died: it may hold connections of a handoff in flight.
	if (inst.linked)
		doubts_.expect(inst.service->name, inst.id);
	if (inst.state == InstanceState::Starting && cfg.ready == config::ReadyMode::Exec)
		instance_ready(inst, "exec"); // it runs: past its exec, or about to be
	else if (inst.state == InstanceState::Starting)
		arm_timer(inst, remaining(deadline, usec(cfg.start_timeout)), start_timeout_handler);
	else if (inst.state == InstanceState::Draining)
		arm_timer(inst, remaining(deadline, usec(cfg.drain_timeout)), drain_timeout_handler);
	return true;
}

// Its process ended while no brokerd watched it: the status is unknown, so it counts as a failure
// unless it was meant to go. What its session still runs goes with it, as after any exit.
void Supervisor::lost_while_down(Instance &inst, const std::string &why)
{
	// One that was draining did what it was asked: not a loss.
	if (inst.retired()) {
		log::notice("instance " + inst.id + ": " + why + " while brokerd was down, as it was draining");
		recovery_.drained.push_back(inst.id);
	} else {
		log::warning("instance " + inst.id + ": " + why + " while brokerd was down");
		recovery_.lost.push_back(inst.id);
	}
	inst.exit_reason = "exited while brokerd was down (status unknown)";
	if (!inst.registered())
		kill_session(inst.session);
	inst.child_source.reset();
	inst.pidfd.reset();
	if (!inst.registered())
		inst.origin = InstanceOrigin::Spawned;
	after_exit(inst, inst.retired());
}

// An upgrade (or rollback, restart, takeover) the crash interrupted: its books died with the
// brokerd that ran it. It ends where the last complete generation is: the new one when every one
// of its instances was ready, otherwise the old one, refilled to full capacity. Either way what
// runs outside the current generation drains.
void Supervisor::recover_upgrade(Service &svc)
{
	auto serving = [](const Generation &gen, bool ready_only) {
		unsigned n = 0;
		for (const auto &inst : gen.instances)
			if (!inst->retired() && (!ready_only || inst->state == InstanceState::Ready))
				n++;
		return n;
	};
	Generation *to = nullptr;
	for (auto &gen : svc.generations)
		if (gen.get() != svc.current && serving(*gen, false) > 0 && (!to || gen->number > to->number))
			to = gen.get();
	if (to && !svc.removing) {
		bool complete = to->cfg.instances > 0 && serving(*to, true) >= to->cfg.instances;
		std::string what;
		const usec_t now = now_usec(CLOCK_REALTIME);
		if (complete) {
			if (svc.current) {
				svc.previous = svc.current->cfg;
				svc.history.end(svc.current->number, GenerationResult::Replaced, now);
			}
			svc.current = to;
			what = "completed at gen " + std::to_string(to->number);
		} else {
			svc.history.end(to->number, GenerationResult::RolledBack, now);
			what = "rolled back to gen " + (svc.current ? std::to_string(svc.current->number) : std::string("-"));
		}
		std::string msg = "an upgrade the crash interrupted: " + what;
		log::notice("service " + svc.name + ": " + msg);
		recovery_.interrupted.push_back(svc.name + ": " + msg);
		emit_service(svc, complete ? EventKind::Done : EventKind::RolledBack, msg);
	}
	for (auto &gen : svc.generations) {
		if (gen.get() == svc.current && !svc.removing)
			continue;
		for (auto &inst : gen->instances) {
			if (inst->retired())
				continue;
			inst->retire();
			drain(*inst);
		}
	}
	// Full capacity again: slots the rollout had drained are refilled.
	if (svc.current && !svc.removing && !svc.stopped && !svc.current->cfg.exec.empty())
		for (unsigned n = serving(*svc.current, false); n < svc.current->cfg.instances; n++)
			spawn(add_instance(*svc.current));
	schedule_prune();
}

} // namespace brokerd
