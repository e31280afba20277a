// An upgrade, rollback or takeover carried out: the Rollout's steps applied to instances; and the
// operator's start and stop with their waiters.
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
#include "proto/errors.hpp"

#include <cstdio>

namespace brokerd {

using json = nlohmann::json;

std::optional<ControlError> Supervisor::begin_upgrade(Service &svc, UpgradeRequest req, Observer *observer)
{
	if (svc.upgrade)
		return ControlError{proto::errors::kUpgradeInProgress,
		                    {{"service", svc.name}, {"generation", svc.upgrade->to->number}}};
	if (svc.stopped || svc.removing || shutting_down_)
		return ControlError{proto::errors::kServiceStopped, {{"service", svc.name}}};
	// Which kind a service is stays as it was added: the config read now may say otherwise.
	if (svc.cfg.exec.empty())
		return ControlError{proto::errors::kRegisteredService, {{"service", svc.name}}};
	if (req.cfg.exec.empty())
		return ControlError{proto::errors::kInvalidConfig,
		                    {{"message", "services." + svc.name + ": without exec, it would become a registered service, "
		                                 "which a running service cannot; remove it first"}}};
	if (req.cfg.sockets != svc.cfg.sockets)
		return ControlError{proto::errors::kInvalidConfig,
		                    {{"message", "services." + svc.name + ".sockets: changed; a service's sockets change with reload"}}};

	Generation *from = svc.current;
	unsigned old_total = 0;
	if (from)
		for (const auto &inst : from->instances)
			if (!inst->retired())
				old_total++;

	auto up = std::make_unique<Upgrade>(Rollout(old_total, req.cfg.instances, req.cfg.upgrade_batch, req.all_at_once));
	up->from = from;
	up->to = &new_generation(svc, req.cfg);
	up->kind = req.kind;
	up->drain_timeout = req.drain_timeout;
	up->started = now_usec(CLOCK_MONOTONIC);
	if (observer)
		up->observers.push_back(observer);
	Upgrade &ref = *up;
	svc.upgrade = std::move(up);

	std::string what = req.kind + " of " + svc.name + " from gen " + (from ? std::to_string(from->number) : "-") +
	                   " to gen " + std::to_string(ref.to->number);
	log::notice(what + ": " + std::to_string(req.cfg.instances) + " new instance(s), batch " +
	            std::to_string(req.cfg.upgrade_batch) + (req.all_at_once ? ", all at once" : ""));
	emit_service(svc, "upgrade", what);
	for (Observer *o : std::vector(ref.observers))
		o->progress(progress(svc, "accepted", nullptr, what));
	apply(svc, ref.rollout.begin());
	return std::nullopt;
}

std::optional<ControlError> Supervisor::abort_upgrade(Service &svc)
{
	Upgrade *up = svc.upgrade.get();
	if (!up || up->rollout.phase() != RolloutPhase::Rolling)
		return ControlError{proto::errors::kNoUpgradeInProgress, {{"service", svc.name}}};
	log::notice("service " + svc.name + ": upgrade to gen " + std::to_string(up->to->number) + " aborted by the operator");
	apply(svc, up->rollout.fail("aborted by the operator"));
	return std::nullopt;
}

void Supervisor::apply(Service &svc, const RolloutStep &step)
{
	Upgrade *up = svc.upgrade.get();
	if (!up)
		return;

	if (step.stop_new) {
		log::warning("service " + svc.name + ": " + up->kind + " to gen " + std::to_string(up->to->number) +
		             " failed (" + up->rollout.reason() + "), rolling back");
		for (Observer *o : std::vector(up->observers))
			o->progress(progress(svc, "rollback", nullptr, up->rollout.reason()));
		emit_service(svc, "rollback", up->rollout.reason());
		// New instances that serve keep serving until a restored old one replaces each, so
		// capacity never dips; the rest go now.
		for (auto &inst : up->to->instances) {
			inst->retire();
			if (inst->state != InstanceState::Ready)
				drain(*inst);
		}
	}
	if (step.drain_replaced && up->rollout.phase() != RolloutPhase::Rolling) {
		for (auto &inst : up->to->instances)
			if (inst->state == InstanceState::Ready) {
				drain(*inst);
				break;
			}
	}
	// Spawning can fail on the spot, which feeds the rollout and may end the upgrade.
	auto still_ours = [&] { return svc.upgrade.get() == up; };
	const bool external = up->to->cfg.exec.empty();
	for (unsigned i = 0; i < step.restore_old && still_ours() && up->from; i++) {
		if (up->from->cfg.exec.empty()) {
			// brokerd cannot start what others started: the rollback ends with what still runs.
			log::warning("service " + svc.name + ": cannot restart a drained registered instance; " +
			             "its owner must register it again");
			apply(svc, up->rollout.restored_ready());
			continue;
		}
		Instance &inst = add_instance(*up->from);
		inst.purpose = InstancePurpose::Restored;
		spawn(inst);
	}
	// Registered services grow by Hello, not by spawning.
	// A spawn that fails on the spot fails the rollout: no more new instances after that.
	for (unsigned i = 0; i < step.start_new && still_ours() && !external && up->rollout.phase() == RolloutPhase::Rolling;
	     i++)
		spawn(add_instance(*up->to));

	// Drain old instances: those not serving first, then the newest serving ones.
	for (unsigned n = 0; n < step.drain_old && still_ours() && up->from; n++) {
		Instance *pick = nullptr;
		auto rank = [](const Instance &i) { return std::pair(i.state == InstanceState::Ready, -static_cast<int>(i.index)); };
		for (auto &inst : up->from->instances)
			if (!inst->retired() && (!pick || rank(*inst) < rank(*pick)))
				pick = inst.get();
		if (!pick)
			break;
		pick->purpose = InstancePurpose::RolloutDrained;
		bool running = pick->pid != 0;
		drain(*pick, up->drain_timeout);
		if (!running)
			apply(svc, up->rollout.old_exited()); // nothing to wait for: it counts as exited now
	}

	if (!still_ours())
		return;
	if (step.finished || !up->rollout.active())
		finish_upgrade(svc);
}

void Supervisor::finish_upgrade(Service &svc)
{
	std::unique_ptr<Upgrade> up = std::move(svc.upgrade);
	if (!up)
		return;
	double secs = static_cast<double>(now_usec(CLOCK_MONOTONIC) - up->started) / 1e6;
	char took[32];
	std::snprintf(took, sizeof(took), "%.2fs", secs);
	if (up->rollout.phase() == RolloutPhase::Done) {
		if (up->from)
			svc.previous = up->from->cfg;
		svc.current = up->to;
		log::notice("service " + svc.name + ": now at gen " + std::to_string(up->to->number) + " (" + up->kind +
		            " took " + took + ")");
		emit_service(svc, "done", up->kind + " to gen " + std::to_string(up->to->number) + " done in " + took);
		json p = progress(svc, "done", nullptr, took);
		p["generation"] = up->to->number;
		p["upgrade"] = upgrade_json(*up);
		for (Observer *o : std::vector(up->observers))
			o->finished(p);
	} else {
		log::notice("service " + svc.name + ": rolled back to gen " +
		            (up->from ? std::to_string(up->from->number) : std::string("-")) + " in " + took);
		emit_service(svc, "rolled-back", up->rollout.reason());
		json err = {{"service", svc.name},
		            {"generation", up->to->number},
		            {"reason", up->rollout.reason()},
		            {"output", up->failed_output}};
		if (!up->failed_instance.empty())
			err["instance"] = up->failed_instance;
		for (Observer *o : std::vector(up->observers))
			o->failed(proto::errors::kUpgradeFailed, err);
	}
	// Whatever still runs outside the current generation goes now: a new instance kept serving
	// through a rollback, or an old-version worker that registered during a takeover. A refill is
	// an ordinary instance from now on: a later rollback must not count it as its own.
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			if (inst->purpose == InstancePurpose::Restored)
				inst->purpose = InstancePurpose::Serving;
			if (gen.get() == svc.current)
				continue;
			inst->retire();
			if (inst->pid && inst->state != InstanceState::Draining)
				drain(*inst);
		}
	schedule_prune();
	changed();
}

void Supervisor::detach_observer(Observer *observer)
{
	for (auto &svc : services_) {
		if (svc->upgrade)
			std::erase(svc->upgrade->observers, observer);
		std::erase(svc->start_waiters, observer);
		std::erase(svc->stop_waiters, observer);
	}
}

std::optional<ControlError> Supervisor::start_service(Service &svc, Observer *observer)
{
	if (!svc.stopped || svc.removing || shutting_down_)
		return ControlError{proto::errors::kServiceStopped, {{"service", svc.name}}};
	svc.stopped = false;
	if (svc.cfg.exec.empty()) {
		// An external service starts when its workers register again.
		log::notice("service " + svc.name + ": accepting registrations again");
		emit_service(svc, "start", "");
		if (observer)
			observer->finished(json::object());
		changed();
		return std::nullopt;
	}
	const config::ServiceConfig &cfg = svc.current ? svc.current->cfg : svc.cfg;
	Generation &gen = new_generation(svc, cfg);
	svc.current = &gen;
	log::notice("service " + svc.name + ": starting gen " + std::to_string(gen.number));
	emit_service(svc, "start", "gen " + std::to_string(gen.number));
	if (observer)
		svc.start_waiters.push_back(observer);
	for (unsigned i = 0; i < cfg.instances; i++)
		spawn(add_instance(gen));
	check_waiters(svc);
	changed();
	return std::nullopt;
}

std::optional<ControlError> Supervisor::stop_service(Service &svc, Observer *observer)
{
	if (svc.stopped || svc.removing || shutting_down_)
		return ControlError{proto::errors::kServiceStopped, {{"service", svc.name}}};
	if (svc.upgrade)
		return ControlError{proto::errors::kUpgradeInProgress,
		                    {{"service", svc.name}, {"generation", svc.upgrade->to->number}}};
	svc.stopped = true;
	log::notice("service " + svc.name + ": stopping");
	emit_service(svc, "stop", "");
	if (observer)
		svc.stop_waiters.push_back(observer);
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			inst->retire();
			drain(*inst);
		}
	check_waiters(svc);
	changed();
	return std::nullopt;
}

void Supervisor::check_waiters(Service &svc)
{
	bool running = false, starting = false, ready = false;
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			running = running || inst->pid;
			if (gen.get() == svc.current && !inst->retired()) {
				starting = starting || inst->state == InstanceState::Starting;
				ready = ready || inst->state == InstanceState::Ready;
			}
		}
	if (!svc.stop_waiters.empty() && !running) {
		auto waiters = std::exchange(svc.stop_waiters, {});
		for (Observer *o : waiters)
			o->finished(json::object());
	}
	if (!svc.start_waiters.empty() && !starting) {
		auto waiters = std::exchange(svc.start_waiters, {});
		for (Observer *o : waiters) {
			if (ready)
				o->finished(json::object());
			else
				o->failed(proto::errors::kStartFailed, {{"service", svc.name}, {"reason", "no instance became ready"}});
		}
	}
}

} // namespace brokerd
