// Taking over processes brokerd did not start in this run: a service restored from a saved state
// (reexec) is watched again, and whether brokerd may save its state now (busy).
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
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

void Supervisor::watch_restored(Instance &inst)
{
	sd_event_source *s = nullptr;
	for (OutputPipe *pipe : {&inst.out, &inst.err})
		if (pipe->fd && sd_event_add_io(event_, &s, pipe->fd.get(), EPOLLIN, output_handler, &inst) >= 0)
			pipe->source.reset(s);
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
