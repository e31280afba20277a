// What the supervisor tells: Watch events, upgrade progress, the Status call's services, the
// summary for STATUS=.
#include "supervisor/supervisor.hpp"

#include <algorithm>

namespace brokerd {

using json = nlohmann::json;

void Supervisor::emit(const Instance &inst, const char *event, const std::string &message)
{
	if (Upgrade *up = inst.service->upgrade.get()) {
		if (inst.generation == up->to || inst.generation == up->from) {
			json p = progress(*inst.service, event, &inst, message);
			for (Observer *o : std::vector(up->observers))
				o->progress(p);
		}
	}
	if (!on_event)
		return;
	json e = {{"event", event},
	          {"time", now_usec(CLOCK_REALTIME)},
	          {"service", inst.service->name},
	          {"generation", inst.generation->number},
	          {"instance", inst.id},
	          {"pid", inst.pid},
	          {"state", state_name(inst.state)}};
	if (!message.empty())
		e["message"] = message;
	on_event(e);
}

void Supervisor::emit_service(const Service &svc, const char *event, const std::string &message)
{
	if (!on_event)
		return;
	json e = {{"event", event}, {"time", now_usec(CLOCK_REALTIME)}, {"service", svc.name}};
	if (svc.upgrade)
		e["generation"] = svc.upgrade->to->number;
	else if (svc.current)
		e["generation"] = svc.current->number;
	if (!message.empty())
		e["message"] = message;
	on_event(e);
}

json Supervisor::services_json(const std::string *only) const
{
	json services = json::array();
	for (const auto &svc : services_) {
		if (only && svc->name != *only)
			continue;
		json gens = json::array();
		bool failed = false;
		for (const auto &gen : svc->generations) {
			if (gen->instances.empty() && gen.get() != svc->current)
				continue;
			json insts = json::array();
			for (const auto &inst : gen->instances) {
				json i = {{"id", inst->id},
				          {"index", inst->index},
				          {"pid", inst->pid},
				          {"state", state_name(inst->state)},
				          {"since", inst->since}};
				if (!inst->status_text.empty())
					i["status"] = inst->status_text;
				if (!inst->handoff.empty())
					i["handoff"] = {{"handed", inst->handoff.handed},
					                {"received", inst->handoff.received},
					                {"returned", inst->handoff.returned}};
				if (gen.get() == svc->current && !inst->retired() && inst->state == InstanceState::Failed)
					failed = true;
				insts.push_back(std::move(i));
			}
			gens.push_back({{"number", gen->number},
			                {"version", gen->cfg.version},
			                {"exec", gen->cfg.exec},
			                {"instances", std::move(insts)}});
		}
		json s = {{"name", svc->name},
		          {"sockets", svc->cfg.sockets},
		          {"ready", config::ready_name(svc->cfg.ready)},
		          {"state", svc->stopped ? "stopped" : failed ? "failed" : "running"},
		          {"generations", std::move(gens)}};
		if (svc->upgrade)
			s["upgrade"] = upgrade_json(*svc->upgrade);
		if (!svc->handoff.empty())
			s["handoff"] = handoff_json(*svc, svc->handoff);
		services.push_back(std::move(s));
	}
	if (only && services.empty())
		return nullptr;
	return services;
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
				std::size_t why = inst->state == InstanceState::Failed     ? 3
				                  : inst->state != InstanceState::Starting ? 0
				                  : inst->backoff.has_failed()             ? 2
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

json Supervisor::upgrade_json(const Upgrade &up) const
{
	const Rollout &r = up.rollout;
	return {{"generation", up.to->number},
	        {"from", up.from ? up.from->number : 0},
	        {"phase", phase_name(r.phase())},
	        {"started", r.new_started()},
	        {"ready", r.new_ready_count()},
	        {"drained", r.old_exited_count()},
	        {"total_new", r.new_total()},
	        {"total_old", r.old_total()},
	        {"handoff", handoff_json(*up.to->service, up.handoff)}};
}

json Supervisor::progress(const Service &svc, const char *event, const Instance *inst, const std::string &message) const
{
	json p = {{"event", event}, {"service", svc.name}};
	if (svc.upgrade) {
		p["generation"] = svc.upgrade->to->number;
		p["upgrade"] = upgrade_json(*svc.upgrade);
	}
	if (inst) {
		p["instance"] = inst->id;
		p["pid"] = inst->pid;
	}
	if (!message.empty())
		p["message"] = message;
	return p;
}

json Supervisor::handoff_json(const Service &svc, const HandoffCounts &c) const
{
	std::uint64_t remaining = 0;
	for (const auto &gen : svc.generations)
		for (const auto &inst : gen->instances)
			if (inst->state != InstanceState::Exited && inst->state != InstanceState::Failed)
				remaining += inst->handoff_remaining;
	return {{"handed", c.handed}, {"received", c.received}, {"returned", c.returned}, {"expected", c.handed + remaining}};
}

} // namespace brokerd
