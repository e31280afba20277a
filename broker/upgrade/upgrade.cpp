// An upgrade, rollback or takeover carried out: the Rollout's steps applied to instances; and the
// operator's start and stop with their waiters.
#include "supervisor/supervisor.hpp"

#include "config/invariants.hpp"
#include "os/log.hpp"

#include <cstdio>

namespace brokerd {

using Kind = Refusal::Kind;

namespace {

GenerationOrigin origin_of(const std::string &kind)
{
	if (kind == "rollback")
		return GenerationOrigin::Rollback;
	if (kind == "restart")
		return GenerationOrigin::Restart;
	return GenerationOrigin::Upgrade;
}

} // namespace

std::variant<Event, Refusal> Supervisor::begin_upgrade(Service &svc, UpgradeRequest req, Observer *observer)
{
	if (svc.upgrade)
		return Refusal::of(Kind::UpgradeInProgress, svc.name, svc.upgrade->to->number);
	if (svc.stopped || svc.removing || shutting_down_)
		return Refusal::of(Kind::ServiceStopped, svc.name);
	// The operator's count holds over the file's, the previous generation's and the current one's.
	if (svc.scaled)
		req.cfg.instances = *svc.scaled;
	// Which kind a service is stays as it was added: the config read now may say otherwise.
	if (svc.cfg.exec.empty())
		return Refusal::of(Kind::RegisteredService, svc.name);
	switch (running_change({svc.name, svc.removing, svc.cfg.sockets, false}, req.cfg.sockets, req.cfg.exec.empty())) {
	case RunningChange::ExecKind:
		return Refusal::invalid_config("services." + svc.name + ": without exec, it would become a registered service, "
		                               "which a running service cannot; remove it first");
	case RunningChange::Sockets:
		return Refusal::invalid_config("services." + svc.name +
		                               ".sockets: changed; a service's sockets change with reload");
	case RunningChange::Draining: // stopped, above
	case RunningChange::None:
		break;
	}

	Generation *from = svc.current;
	unsigned old_total = 0;
	if (from)
		for (const auto &inst : from->instances)
			if (!inst->retired())
				old_total++;

	auto up = std::make_unique<Upgrade>(Rollout(old_total, req.cfg.instances, req.cfg.upgrade_batch, req.all_at_once));
	up->from = from;
	up->to = &new_generation(svc, req.cfg, origin_of(req.kind), req.by);
	up->kind = req.kind;
	up->drain_timeout = req.drain_timeout;
	up->started = now_usec(CLOCK_MONOTONIC);
	if (observer)
		up->observers.push_back(observer);
	Upgrade &ref = *up;
	svc.upgrade = std::move(up);

	std::string what = req.kind + " of " + svc.name + " from gen " + (from ? std::to_string(from->number) : "-") +
	                   " to gen " + std::to_string(ref.to->number);
	// The start itself is logged once, as the Upgrade event's record (daemon/journal_events.cpp).
	log::info("service " + svc.name + ": gen " + std::to_string(ref.to->number) + " rolls out " +
	          std::to_string(req.cfg.instances) + " new instance(s), batch " + std::to_string(req.cfg.upgrade_batch) +
	          (req.all_at_once ? ", all at once" : ""));
	emit_service(svc, EventKind::Upgrade, what);
	Event accepted = progress(svc, EventKind::Accepted, nullptr, what);
	notify_observers(ref, accepted);
	apply(svc, ref.rollout.begin());
	return accepted;
}

std::optional<Refusal> Supervisor::abort_upgrade(Service &svc)
{
	Upgrade *up = svc.upgrade.get();
	if (!up || up->rollout.phase() != RolloutPhase::Rolling)
		return Refusal::of(Kind::NoUpgradeInProgress, svc.name);
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
		notify_observers(*up, progress(svc, EventKind::Rollback, nullptr, up->rollout.reason()));
		emit_service(svc, EventKind::Rollback, up->rollout.reason());
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
	const usec_t duration = now_usec(CLOCK_MONOTONIC) - up->started;
	double secs = static_cast<double>(duration) / 1e6;
	// The Watch event of the end, with the kind and duration of the upgrade it ends.
	auto ended = [&](EventKind kind, const std::string &message) {
		Event e = service_event(svc, kind, message);
		e.upgrade_kind = up->kind;
		e.duration = duration;
		emit_event(e);
	};
	char took[32];
	std::snprintf(took, sizeof(took), "%.2fs", secs);
	if (up->rollout.phase() == RolloutPhase::Done) {
		if (up->from) {
			svc.previous = up->from->cfg;
			svc.history.end(up->from->number, GenerationResult::Replaced, now_usec(CLOCK_REALTIME));
		}
		svc.current = up->to;
		const std::string message = up->kind + " to gen " + std::to_string(up->to->number) + " done in " + took;
		ended(EventKind::Done, message);
		Event done = progress(svc, EventKind::Done, nullptr, message);
		done.upgrade = snapshot(*up);
		done.upgrade_kind = up->kind;
		done.duration = duration;
		for (Observer *o : std::vector(up->observers))
			o->finished(&done);
	} else {
		svc.history.end(up->to->number, GenerationResult::RolledBack, now_usec(CLOCK_REALTIME));
		ended(EventKind::RolledBack, up->rollout.reason());
		Refusal failed = Refusal::failure(Kind::UpgradeFailed, svc.name, up->rollout.reason(), up->to->number);
		failed.instance = up->failed_instance;
		failed.output = up->failed_output;
		for (Observer *o : std::vector(up->observers))
			o->failed(failed);
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
		std::erase_if(svc->scale_waiters, [&](const ScaleWaiter &w) { return w.observer == observer; });
	}
}

std::optional<Refusal> Supervisor::start_service(Service &svc, Observer *observer, std::optional<uid_t> by)
{
	if (!svc.stopped || svc.removing || shutting_down_)
		return Refusal::of(Kind::ServiceStopped, svc.name);
	svc.stopped = false;
	if (svc.cfg.exec.empty()) {
		// An external service starts when its workers register again.
		log::notice("service " + svc.name + ": accepting registrations again");
		emit_service(svc, EventKind::Start, "");
		if (observer)
			observer->finished(nullptr);
		changed();
		return std::nullopt;
	}
	const config::ServiceConfig &cfg = svc.current ? svc.current->cfg : svc.cfg;
	Generation &gen = new_generation(svc, cfg, GenerationOrigin::Start, by);
	svc.current = &gen;
	log::notice("service " + svc.name + ": starting gen " + std::to_string(gen.number));
	emit_service(svc, EventKind::Start, "gen " + std::to_string(gen.number));
	if (observer)
		svc.start_waiters.push_back(observer);
	for (unsigned i = 0; i < cfg.instances; i++)
		spawn(add_instance(gen));
	check_waiters(svc);
	changed();
	return std::nullopt;
}

std::optional<Refusal> Supervisor::stop_service(Service &svc, Observer *observer)
{
	if (svc.stopped || svc.removing || shutting_down_)
		return Refusal::of(Kind::ServiceStopped, svc.name);
	if (svc.upgrade)
		return Refusal::of(Kind::UpgradeInProgress, svc.name, svc.upgrade->to->number);
	svc.stopped = true;
	svc.history.end_all(GenerationResult::Stopped, now_usec(CLOCK_REALTIME));
	log::notice("service " + svc.name + ": stopping");
	emit_service(svc, EventKind::Stop, "");
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
				starting = starting || inst->state == InstanceState::Starting ||
				           inst->state == InstanceState::Restarting;
				ready = ready || inst->state == InstanceState::Ready;
			}
		}
	if (!svc.stop_waiters.empty() && !running) {
		auto waiters = std::exchange(svc.stop_waiters, {});
		for (Observer *o : waiters)
			o->finished(nullptr);
	}
	if (!svc.start_waiters.empty() && !starting) {
		auto waiters = std::exchange(svc.start_waiters, {});
		if (!ready && svc.current)
			svc.history.end(svc.current->number, GenerationResult::Failed, now_usec(CLOCK_REALTIME));
		for (Observer *o : waiters) {
			if (ready)
				o->finished(nullptr);
			else
				o->failed(Refusal::failure(Kind::StartFailed, svc.name, "no instance became ready"));
		}
	}
	check_scale_waiters(svc);
}

} // namespace brokerd
