// What the supervisor tells, as types: Watch events, upgrade progress, the snapshots Status shows,
// and the summary for STATUS=. control/encode.cpp puts them on the wire.
#include "supervisor/supervisor.hpp"

#include <algorithm>

namespace brokerd {

void Supervisor::notify_observers(const Upgrade &up, const Event &e)
{
	for (Observer *o : std::vector(up.observers))
		o->progress(e);
}

void Supervisor::emit(const Instance &inst, EventKind kind, const std::string &message)
{
	if (Upgrade *up = inst.service->upgrade.get()) {
		if (inst.generation == up->to || inst.generation == up->from)
			notify_observers(*up, progress(*inst.service, kind, &inst, message));
	}
	if (!on_event)
		return;
	Event e;
	e.kind = kind;
	e.time = now_usec(CLOCK_REALTIME);
	e.service = inst.service->name;
	e.generation = inst.generation->number;
	e.instance = inst.id;
	e.pid = inst.pid;
	e.state = inst.state;
	e.message = message;
	on_event(e);
}

// The generation a service's event names: the upgrade's new one, or else the current one.
static std::optional<std::uint64_t> service_generation(const Service &svc)
{
	if (svc.upgrade)
		return svc.upgrade->to->number;
	if (svc.current)
		return svc.current->number;
	return std::nullopt;
}

Event Supervisor::service_event(const Service &svc, EventKind kind, const std::string &message) const
{
	Event e;
	e.kind = kind;
	e.time = now_usec(CLOCK_REALTIME);
	e.service = svc.name;
	e.generation = service_generation(svc);
	e.message = message;
	if (svc.upgrade)
		e.upgrade_kind = svc.upgrade->kind;
	return e;
}

void Supervisor::emit_event(const Event &e)
{
	if (on_event)
		on_event(e);
}

void Supervisor::emit_service(const Service &svc, EventKind kind, const std::string &message,
                              std::optional<HandoffTotals> handoff)
{
	if (!on_event)
		return;
	Event e = service_event(svc, kind, message);
	e.handoff = handoff;
	on_event(e);
}

Event Supervisor::progress(const Service &svc, EventKind kind, const Instance *inst, const std::string &message) const
{
	Event e;
	e.kind = kind;
	e.time = now_usec(CLOCK_REALTIME);
	e.service = svc.name;
	if (svc.upgrade) {
		e.upgrade = snapshot(*svc.upgrade);
		e.upgrade_kind = svc.upgrade->kind;
	}
	if (inst) {
		e.instance = inst->id;
		e.pid = inst->pid;
		e.state = inst->state;
	}
	e.message = message;
	return e;
}

ServiceState service_state(const Service &svc)
{
	if (svc.stopped)
		return ServiceState::Stopped;
	if (svc.current)
		for (const auto &inst : svc.current->instances)
			if (!inst->retired() && inst->state == InstanceState::Failed)
				return ServiceState::Failed;
	return ServiceState::Running;
}

std::string Supervisor::summary() const
{
	constexpr unsigned kNamed = 5; // services named as not ready; the rest are counted
	unsigned ready = 0, total = 0, upgrading = 0, not_ready = 0;
	std::string names;
	for (const auto &svc : services_) {
		if (svc->upgrade)
			upgrading++;
		// What keeps the service short of ready, the worst of its current instances (an
		// upgrade's new ones are the upgrade's business).
		static constexpr const char *kWhy[] = {nullptr, "starting", "restarting", "failed"};
		std::size_t worst = 0;
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				total++;
				if (inst->state == InstanceState::Ready)
					ready++;
				if (inst->retired() || svc->stopped || gen.get() != svc->current)
					continue;
				std::size_t why = inst->state == InstanceState::Failed       ? 3
				                  : inst->state == InstanceState::Restarting ? 2
				                  : inst->state != InstanceState::Starting   ? 0
				                  : inst->backoff.has_failed()               ? 2
				                                                             : 1;
				worst = std::max(worst, why);
			}
		if (worst && ++not_ready <= kNamed)
			names += (names.empty() ? "" : ", ") + svc->name + " (" + kWhy[worst] + ")";
	}
	std::string s = std::to_string(services_.size()) + " service(s), " + std::to_string(ready) + "/" +
	                std::to_string(total) + " instance(s) ready";
	if (not_ready)
		s += ", not ready: " + names + (not_ready > kNamed ? " and " + std::to_string(not_ready - kNamed) + " more" : "");
	if (upgrading)
		s += ", " + std::to_string(upgrading) + " upgrade(s) in progress";
	if (shutting_down_)
		s += ", shutting down";
	return s;
}

UpgradeSnapshot snapshot(const Upgrade &up)
{
	const Rollout &r = up.rollout;
	UpgradeSnapshot u;
	u.generation = up.to->number;
	u.from = up.from ? up.from->number : 0;
	u.phase = r.phase();
	u.started = r.new_started();
	u.ready = r.new_ready_count();
	u.drained = r.old_exited_count();
	u.total_new = r.new_total();
	u.total_old = r.old_total();
	u.handoff = handoff_totals(*up.to->service, up.handoff);
	return u;
}

HandoffTotals handoff_totals(const Service &svc, const HandoffCounts &c)
{
	std::uint64_t remaining = 0;
	for (const auto &gen : svc.generations)
		for (const auto &inst : gen->instances)
			if (inst->state != InstanceState::Exited && inst->state != InstanceState::Failed)
				remaining += inst->handoff_remaining;
	return {c, c.handed + remaining};
}

} // namespace brokerd
