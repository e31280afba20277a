// The operator's runtime instance count (Scale) with its waiters, and signals to a service's
// instances (Signal).
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"

#include <signal.h>
#include <string.h>

#include <algorithm>

namespace brokerd {

using Kind = Refusal::Kind;

std::variant<Supervisor::Scaled, Refusal> Supervisor::scale_service(Service &svc, unsigned instances, Observer *observer)
{
	// brokerd does not start a registered service's workers: their owner does.
	if (svc.cfg.exec.empty())
		return Refusal::of(Kind::RegisteredService, svc.name);
	if (svc.stopped || svc.removing || shutting_down_ || !svc.current)
		return Refusal::of(Kind::ServiceStopped, svc.name);
	// The rollout counts the old generation's instances as it goes: they are not the operator's
	// to change until it ends.
	if (svc.upgrade)
		return Refusal::of(Kind::UpgradeInProgress, svc.name, svc.upgrade->to->number);

	Generation &gen = *svc.current;
	std::vector<Instance *> slots;
	for (auto &inst : gen.instances)
		if (!inst->retired())
			slots.push_back(inst.get());
	const auto from = static_cast<unsigned>(slots.size());
	svc.scaled = instances;
	gen.cfg.instances = instances;
	log::notice("service " + svc.name + " gen " + std::to_string(gen.number) + ": scaled from " + std::to_string(from) +
	            " to " + std::to_string(instances) + " instance(s) by the operator");

	ScaleWaiter waiter{observer, {}, instances > from};
	if (instances > from) {
		for (unsigned i = from; i < instances; i++) {
			Instance &inst = add_instance(gen);
			waiter.instances.push_back(inst.id);
			spawn(inst);
		}
	} else {
		std::sort(slots.begin(), slots.end(), [](const Instance *a, const Instance *b) { return a->index > b->index; });
		for (unsigned i = 0; i < from - instances; i++) {
			waiter.instances.push_back(slots[i]->id);
			slots[i]->retire();
			drain(*slots[i]);
		}
	}
	changed();
	Scaled scaled{from, instances, false};
	if (!observer)
		return scaled;
	auto outcome = scale_outcome(svc, waiter);
	if (!outcome) {
		svc.scale_waiters.push_back(std::move(waiter));
		scaled.pending = true;
	} else if (*outcome) {
		return **outcome;
	}
	return scaled;
}

std::optional<std::optional<Refusal>> Supervisor::scale_outcome(const Service &svc, const ScaleWaiter &w) const
{
	auto find = [&](const std::string &id) -> const Instance * {
		for (const auto &gen : svc.generations)
			for (const auto &inst : gen->instances)
				if (inst->id == id)
					return inst.get();
		return nullptr;
	};
	std::string not_ready;
	for (const std::string &id : w.instances) {
		const Instance *inst = find(id);
		if (!w.up) {
			if (inst && inst->pid)
				return std::nullopt;
			continue;
		}
		// A new instance that failed waits out its restart, as a start does.
		if (inst && (inst->state == InstanceState::Starting || inst->state == InstanceState::Restarting))
			return std::nullopt;
		if (!inst || inst->state != InstanceState::Ready)
			not_ready = "instance " + id + " did not become ready" +
			            (inst && !inst->exit_reason.empty() ? " (" + inst->exit_reason + ")" : "");
	}
	if (not_ready.empty())
		return std::optional<Refusal>();
	return std::optional<Refusal>(Refusal::failure(Kind::StartFailed, svc.name, not_ready));
}

void Supervisor::check_scale_waiters(Service &svc)
{
	std::vector<std::pair<Observer *, std::optional<Refusal>>> done;
	std::erase_if(svc.scale_waiters, [&](const ScaleWaiter &w) {
		auto outcome = scale_outcome(svc, w);
		if (outcome)
			done.emplace_back(w.observer, std::move(*outcome));
		return outcome.has_value();
	});
	// Told once the books are tidy: an observer may call in again.
	for (auto &[observer, failed] : done) {
		if (failed)
			observer->failed(*failed);
		else
			observer->finished(nullptr);
	}
}

std::vector<std::string> Supervisor::signal_service(Service &svc, int sig)
{
	std::vector<std::string> signalled;
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances)
			if (inst->pid && signal(*inst, sig))
				signalled.push_back(inst->id);
	const char *name = sigabbrev_np(sig);
	log::notice("service " + svc.name + ": SIG" + (name ? name : std::to_string(sig)) + " sent to " +
	            std::to_string(signalled.size()) + " instance(s) by the operator");
	return signalled;
}

} // namespace brokerd
