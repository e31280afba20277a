// Supervisor: services added, updated and removed, shutdown, and the books kept tidy.
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
#include "supervisor/process.hpp"

#include <algorithm>
#include <cstring>

namespace brokerd {

using namespace process;

Supervisor::Supervisor(sd_event *event, const std::list<Listener> &listeners, std::string control_path)
	: event_(event), listeners_(listeners), control_path_(std::move(control_path))
{
	router_.on_report = [this](const HandoffRouter::Report &r) { handoff_report(r); };
	sd_event_source *s = nullptr;
	int r = sd_event_add_defer(event_, &s, held_handler, this);
	if (r < 0)
		throw std::runtime_error(std::string("sd_event_add_defer: ") + std::strerror(-r));
	held_source_.reset(s);
	sd_event_source_set_enabled(s, SD_EVENT_OFF);
	// After the crash state's write (SD_EVENT_PRIORITY_IMPORTANT), before anything else.
	sd_event_source_set_priority(s, SD_EVENT_PRIORITY_IMPORTANT + 1);
}

Supervisor::~Supervisor() = default;

const Listener *Supervisor::find_listener(std::string_view name) const
{
	for (const auto &l : listeners_)
		if (l.name == name)
			return &l;
	return nullptr;
}

Service *Supervisor::find_service(std::string_view name)
{
	for (auto &svc : services_)
		if (svc->name == name)
			return svc.get();
	return nullptr;
}

bool Supervisor::uses_listener(const Listener &l) const
{
	for (const auto &svc : services_)
		for (const Listener *s : svc->sockets)
			if (s == &l)
				return true;
	return false;
}

void Supervisor::add_service(const config::ServiceConfig &cfg)
{
	if (shutting_down_)
		throw std::runtime_error("service " + cfg.name + ": brokerd is shutting down");
	auto svc = std::make_unique<Service>();
	svc->name = cfg.name;
	svc->cfg = cfg;
	for (const auto &name : cfg.sockets) {
		const Listener *l = find_listener(name);
		if (!l)
			throw std::runtime_error("service " + cfg.name + ": no socket named \"" + name + "\"");
		svc->sockets.push_back(l);
	}
	Service &ref = *svc;
	services_.push_back(std::move(svc));
	if (cfg.exec.empty())
		return;
	Generation &gen = new_generation(ref, cfg, GenerationOrigin::Start, std::nullopt);
	ref.current = &gen;
	log::info("service " + ref.name + " gen " + std::to_string(gen.number) + ": starting " +
	          std::to_string(cfg.instances) + " instance(s)");
	for (unsigned i = 0; i < cfg.instances; i++)
		spawn(add_instance(gen));
}

void Supervisor::remove_service(const std::string &name)
{
	Service *svc = find_service(name);
	if (!svc || svc->removing)
		return;
	svc->removing = true;
	svc->history.end_all(GenerationResult::Stopped, now_usec(CLOCK_REALTIME));
	log::notice("service " + name + ": removed from the config, draining it");
	// Nobody may be left waiting on a service that is going away.
	if (auto up = std::move(svc->upgrade)) {
		Refusal failed = Refusal::failure(Refusal::Kind::UpgradeFailed, name, "the service was removed from the config",
		                                  up->to->number);
		for (Observer *o : up->observers)
			o->failed(failed);
	}
	for (Observer *o : std::exchange(svc->start_waiters, {}))
		o->failed(Refusal::failure(Refusal::Kind::StartFailed, name, "the service was removed from the config"));
	for (Observer *o : std::exchange(svc->stop_waiters, {}))
		o->finished(nullptr);
	for (ScaleWaiter &w : std::exchange(svc->scale_waiters, {}))
		if (w.up)
			w.observer->failed(Refusal::failure(Refusal::Kind::StartFailed, name, "the service was removed from the config"));
		else
			w.observer->finished(nullptr);
	for (auto &gen : svc->generations)
		for (auto &inst : gen->instances) {
			inst->retire();
			drain(*inst);
		}
	schedule_prune();
	changed();
}

Generation &Supervisor::new_generation(Service &svc, const config::ServiceConfig &cfg, GenerationOrigin how,
                                       std::optional<uid_t> by)
{
	auto gen = std::make_unique<Generation>();
	gen->service = &svc;
	gen->number = svc.next_generation++;
	gen->cfg = cfg;
	gen->started = now_usec(CLOCK_REALTIME);
	if (svc.current)
		gen->env = env_changes(svc.current->cfg.env, cfg.env);
	svc.history.begin({gen->number, cfg, gen->started, 0, how, GenerationResult::Serving, by});
	Generation &ref = *gen;
	svc.generations.push_back(std::move(gen));
	return ref;
}

Instance &Supervisor::add_instance(Generation &gen)
{
	auto inst = std::make_unique<Instance>();
	inst->supervisor = this;
	inst->service = gen.service;
	inst->generation = &gen;
	inst->index = gen.next_index++;
	inst->id = gen.service->name + "/" + std::to_string(gen.number) + "/" + std::to_string(inst->index);
	gen.instances.push_back(std::move(inst));
	return *gen.instances.back();
}

void Supervisor::update_service(const config::ServiceConfig &cfg)
{
	Service *svc = find_service(cfg.name);
	if (!svc || svc->removing)
		return;
	// A count changed in the file wins over the operator's at the next upgrade; what runs now
	// runs on.
	if (svc->scaled && cfg.instances != svc->cfg.instances) {
		log::notice("service " + svc->name + ": the config's instances changed to " + std::to_string(cfg.instances) +
		            ", which the next upgrade starts instead of the " + std::to_string(*svc->scaled) + " it was scaled to");
		svc->scaled.reset();
	}
	svc->cfg = cfg;
	// Names resolve once per load: the running generations' next spawns see this load's accounts.
	for (auto &gen : svc->generations)
		config::refresh_accounts(gen->cfg, cfg);
	if (svc->previous)
		config::refresh_accounts(*svc->previous, cfg);
	svc->history.each_config([&](config::ServiceConfig &old) { config::refresh_accounts(old, cfg); });
}

void Supervisor::shutdown(config::Duration budget)
{
	if (shutting_down_)
		return;
	shutting_down_ = true;
	shutdown_deadline_ = now_usec(CLOCK_MONOTONIC) + usec(budget);
	log::notice("shutting down: draining every instance, killing what is left in " + std::to_string(budget.count()) +
	            "ms");
	for (auto &svc : services_) {
		if (svc->upgrade) {
			for (Observer *o : std::vector(svc->upgrade->observers))
				o->failed(Refusal::failure(Refusal::Kind::UpgradeFailed, svc->name, "brokerd is shutting down",
				                           svc->upgrade->to->number));
			svc->upgrade.reset();
		}
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances) {
				// One already draining (an upgrade's old instance, or one that said STOPPING=1)
				// keeps its deadline only if it comes before the budget's end.
				std::uint64_t when = 0;
				if (inst->state != InstanceState::Draining)
					drain(*inst);
				else if (inst->timer && sd_event_source_get_time(inst->timer.get(), &when) >= 0 &&
				         when > shutdown_deadline_)
					sd_event_source_set_time(inst->timer.get(), shutdown_deadline_);
			}
	}
	changed();
}

void Supervisor::kill_all()
{
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->pid) {
					inst->timer.reset();
					kill_instance(*inst, "killed: brokerd was told to stop again");
				}
}

bool Supervisor::stopped() const
{
	for (const auto &svc : services_)
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances)
				if (inst->pid)
					return false;
	return true;
}

namespace {

bool first_attempt(const Instance &inst)
{
	return inst.state == InstanceState::Starting && !inst.retired() && !inst.backoff.has_failed();
}

} // namespace

bool Supervisor::settled() const
{
	for (const auto &svc : services_)
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances)
				if (first_attempt(*inst))
					return false;
	return true;
}

std::uint64_t Supervisor::first_starts_deadline() const
{
	std::uint64_t last = 0;
	for (const auto &svc : services_)
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				std::uint64_t when = 0;
				if (first_attempt(*inst) && inst->pid && inst->timer &&
				    sd_event_source_get_time(inst->timer.get(), &when) >= 0)
					last = std::max(last, when);
			}
	return last;
}

// Instances that are gone for good leave the books; generations are kept as history.
void Supervisor::schedule_prune()
{
	if (prune_source_)
		return;
	sd_event_source *s = nullptr;
	if (sd_event_add_defer(event_, &s, prune_handler, this) >= 0) {
		sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
		prune_source_.reset(s);
	}
}

int Supervisor::prune_handler(sd_event_source *, void *userdata)
{
	return guarded("prune_handler", [&]() -> int {
		auto *sup = static_cast<Supervisor *>(userdata);
		sup->prune_source_.reset();
		sup->prune();
		return 0;
	});
}

void Supervisor::prune()
{
	constexpr std::size_t kKeptGenerations = 8;
	std::size_t pruned = 0;
	for (auto &svc : services_) {
		for (auto &gen : svc->generations)
			pruned += std::erase_if(gen->instances, [this](const std::unique_ptr<Instance> &inst) {
				bool gone = inst->retired() && !inst->pid && inst->state != InstanceState::Starting &&
				            inst->state != InstanceState::Restarting;
				if (gone) // what is in its pipes is read; what a child of it may still write goes nowhere
					for (OutputPipe *pipe : {&inst->out, &inst->err})
						if (pipe->fd) {
							on_output(*inst, *pipe, false);
							close_pipe(*pipe);
						}
				return gone;
			});
		// Keep the current generation, the one an upgrade uses, and a few of history.
		while (svc->generations.size() > kKeptGenerations) {
			auto it = std::find_if(svc->generations.begin(), svc->generations.end(), [&](const auto &g) {
				return g.get() != svc->current && g->instances.empty() &&
				       (!svc->upgrade || (g.get() != svc->upgrade->from && g.get() != svc->upgrade->to));
			});
			if (it == svc->generations.end())
				break;
			svc->generations.erase(it);
		}
	}
	std::size_t gone = std::erase_if(services_, [](const std::unique_ptr<Service> &svc) {
		if (!svc->removing)
			return false;
		for (auto &gen : svc->generations)
			if (!gen->instances.empty())
				return false;
		return true;
	});
	// A removed service is gone for good now: the sockets only it used may close. What is kept
	// of the books (the crash state among them) changed with any instance gone.
	if (gone > 0 || pruned > 0)
		changed();
}

void Supervisor::changed()
{
	if (on_change)
		on_change();
}

} // namespace brokerd
