// Registered workers: Hello and its register rule, a takeover by a new version, their exits, and
// finding an instance by token, pid or Events connection.
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
#include "os/peer.hpp"
#include "supervisor/process.hpp"

#include <signal.h>

#include <algorithm>
#include <chrono>

namespace brokerd {

using namespace process;

bool Supervisor::attach_events(Instance &inst, EventSink *sink)
{
	if (inst.events)
		return false;
	inst.events = sink;
	inst.counted = sink;
	// A drain decided before the stream opened must still reach the worker, with the time left
	// until its deadline: a worker that says Hello again after a crash of brokerd was told once
	// already, and the SIGKILL comes at the same deadline. One not told yet is told now, once.
	if (inst.state == InstanceState::Draining) {
		inst.drain_untold = false;
		sink->send_drain(drain_left(inst));
	}
	return true;
}

void Supervisor::detach_events(EventSink *sink)
{
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances) {
				if (inst->events == sink)
					inst->events = nullptr;
				if (inst->counted == sink)
					inst->counted = nullptr;
			}
	// What it was sent and did not acknowledge goes back to the senders.
	router_.forget(*sink);
	doubts_.forget(*sink);
}

Instance *Supervisor::find_by_sink(const EventSink *sink)
{
	if (!sink)
		return nullptr;
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->counted == sink)
					return inst.get();
	return nullptr;
}

Instance *Supervisor::find_by_token(std::string_view token)
{
	if (token.empty())
		return nullptr;
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->pid && inst->token == token)
					return inst.get();
	return nullptr;
}

Instance *Supervisor::find_by_pid(pid_t pid)
{
	if (pid <= 0)
		return nullptr;
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->pid && (inst->pid == pid || inst->main_pid == pid))
					return inst.get();
	return nullptr;
}

int Supervisor::pidfd_of(const Instance &inst, pid_t pid) const
{
	if (pid == inst.main_pid || (inst.watched_by_pidfd() && pid == inst.pid))
		return inst.pidfd.get();
	if (pid == inst.pid && inst.child_source)
		return sd_event_source_get_child_pidfd(inst.child_source.get());
	return -1;
}

// A registered worker that says Hello again after a crash of brokerd, from the very process the
// crash state named (the pidfd brokerd found it by, and the one it connected with, are the same
// process): its registration carries on, with its generation, state and drain deadline.
Instance *Supervisor::find_awaiting_hello(Service &svc, const std::string &version, int pidfd, pid_t pid)
{
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			if (!inst->awaiting_hello || inst->pid != pid || gen->cfg.version != version || !inst->pidfd ||
			    !peer::same_process(inst->pidfd.get(), pidfd))
				continue;
			inst->awaiting_hello = false;
			log::info("instance " + inst->id + ": registered pid " + std::to_string(pid) + " is back after the crash");
			return inst.get();
		}
	return nullptr;
}

std::variant<Instance *, Refusal> Supervisor::register_external(Service &svc, const std::string &version,
                                                                 proto::UniqueFd pidfd, pid_t pid, uid_t uid,
                                                                 const std::vector<gid_t> &groups)
{
	// Why is logged, never told: a peer learns nothing of the rule it fails.
	auto deny = [&](const std::string &why) {
		log::client(log::Level::Warning, "service " + svc.name + ": registration by pid " + std::to_string(pid) +
		                                     " uid " + std::to_string(uid) + " denied: " + why);
		return Refusal::of(Refusal::Kind::PermissionDenied);
	};
	if (!svc.cfg.exec.empty())
		return deny("the service is started by brokerd (it has exec)");
	if (svc.removing || svc.stopped || shutting_down_)
		return deny("the service is stopped");

	if (!svc.cfg.accounts.may_register(uid, groups))
		return deny("not allowed by services." + svc.name + ".register");
	if (Instance *again = find_awaiting_hello(svc, version, pidfd.get(), pid))
		return again;

	// Join the generation of that version, or start a new one that will take over when ready.
	Generation *gen = nullptr;
	for (auto &g : svc.generations)
		if (g->cfg.version == version && (g.get() == svc.current || (svc.upgrade && g.get() == svc.upgrade->to)))
			gen = g.get();
	if (!gen) {
		if (svc.upgrade) {
			log::warning("service " + svc.name + ": registration of version \"" + version +
			             "\" refused: a takeover is in progress");
			return Refusal::of(Refusal::Kind::UpgradeInProgress, svc.name, svc.upgrade->to->number);
		}
		config::ServiceConfig cfg = svc.cfg;
		cfg.version = version;
		const bool takes_over = svc.current && !svc.current->instances.empty();
		gen = &new_generation(svc, cfg, takes_over ? GenerationOrigin::Takeover : GenerationOrigin::Registration, uid);
		if (takes_over) {
			begin_takeover(svc, *gen);
		} else {
			if (svc.current) // none of its workers is left: the new version simply follows it
				svc.history.end(svc.current->number, GenerationResult::Replaced, now_usec(CLOCK_REALTIME));
			svc.current = gen;
		}
	}

	Instance &inst = add_instance(*gen);
	inst.origin = InstanceOrigin::Registered;
	inst.pid = pid;
	inst.pid_start = start_time(pid);
	inst.pidfd = std::move(pidfd);
	inst.token = random_token();
	set_state(inst, InstanceState::Starting);
	sd_event_source *s = nullptr;
	if (sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst) >= 0)
		inst.child_source.reset(s);
	log::info("instance " + inst.id + ": registered pid " + std::to_string(pid) + " (version \"" + version + "\")");
	emit(inst, EventKind::Started);
	if (gen->cfg.ready == config::ReadyMode::Exec)
		instance_ready(inst, "registered");
	else
		arm_timer(inst, usec(gen->cfg.start_timeout), start_timeout_handler);
	changed();
	return &inst;
}

// A new version takes over the way an upgrade does, but its instances arrive by Hello.
void Supervisor::begin_takeover(Service &svc, Generation &gen)
{
	const config::ServiceConfig &cfg = gen.cfg;
	const std::string &version = cfg.version;
	unsigned old_total = 0;
	for (const auto &inst : svc.current->instances)
		if (!inst->retired())
			old_total++;
	auto up = std::make_unique<Upgrade>(Rollout(old_total, cfg.instances, cfg.upgrade_batch, false));
	up->from = svc.current;
	up->to = &gen;
	up->kind = "takeover";
	up->started = now_usec(CLOCK_MONOTONIC);
	up->service = &svc;
	up->supervisor = this;
	up->last_progress = up->started;
	svc.upgrade = std::move(up);
	std::string what = "takeover of " + svc.name + " by version \"" + version + "\" (gen " +
	                   std::to_string(gen.number) + ")";
	log::notice(what);
	emit_service(svc, EventKind::Upgrade, what);
	svc.upgrade->rollout.begin();
	check_registrations(*svc.upgrade);
}

int Supervisor::registration_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("registration_handler", [&]() -> int {
		auto &up = *static_cast<Upgrade *>(userdata);
		up.supervisor->check_registrations(up);
		return 0;
	});
}

// Called when a takeover begins and then from its timer, four times per start_timeout: the
// takeover fails when it has waited that long for instances that have not registered, while no
// instance was starting or draining. Progress of any kind restarts the wait: its owner may start
// each new worker only once an old one is gone.
void Supervisor::check_registrations(Upgrade &up)
{
	Service &svc = *up.service;
	const Rollout &r = up.rollout;
	up.registration_timer.reset();
	if (r.phase() != RolloutPhase::Rolling || svc.upgrade.get() != &up)
		return;
	usec_t now = now_usec(CLOCK_MONOTONIC);
	std::array<unsigned, 3> seen{up.to->next_index, r.new_ready_count(), r.old_exited_count()};
	if (seen != up.seen) {
		up.seen = seen;
		up.last_progress = now;
	}
	unsigned registered = 0, starting = 0;
	for (const auto &inst : up.to->instances)
		if (!inst->retired()) {
			registered++;
			starting += inst->state == InstanceState::Starting;
		}
	bool waiting = registered < r.new_started() && starting == 0 && r.old_exited_count() == r.old_drained();
	const usec_t limit = usec(up.to->cfg.start_timeout);
	if (waiting && now - up.last_progress >= limit) {
		std::uint64_t ms = msec(limit);
		std::string why = std::to_string(registered) + " of " + std::to_string(r.new_started()) + " instance(s) of version \"" +
		                  up.to->cfg.version + "\" registered, none more within the start timeout (" +
		                  std::to_string(ms) + "ms)";
		log::error("service " + svc.name + ": " + why);
		apply(svc, up.rollout.fail(why));
		return;
	}
	sd_event_source *s = nullptr;
	int rc = sd_event_add_time(event_, &s, CLOCK_MONOTONIC, now + std::max<std::uint64_t>(limit / 4, 1000), 1000,
	                           registration_handler, &up);
	if (rc < 0)
		log::error("service " + svc.name + ": cannot add the takeover's registration timer: " + errno_text(-rc));
	else
		up.registration_timer.reset(s);
}

int Supervisor::external_handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("external_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		// Not our child: its exit status belongs to its parent; a readable pidfd means it is gone.
		inst.supervisor->external_exit(inst, "exited");
		return 0;
	});
}

void Supervisor::external_exit(Instance &inst, const std::string &how)
{
	if (!inst.pid)
		return;
	bool expected = inst.retired() || shutting_down_;
	if (inst.exit_reason.empty())
		inst.exit_reason = how;
	// What it printed last is read before its exit is judged, as for a child (on_exit).
	for (OutputPipe *p : {&inst.out, &inst.err})
		if (p->fd)
			on_output(inst, *p, false);
	if (inst.events)
		inst.events->read_rest();
	if (!inst.pid)
		return; // what it said ended it already
	if (inst.origin == InstanceOrigin::Forked)
		::kill(-inst.session, SIGKILL); // what else its session still runs goes with it
	std::string msg = "instance " + inst.id + ": pid " + std::to_string(inst.pid) + " " + how;
	if (expected)
		log::info(msg);
	else
		log::warning(msg + " unexpectedly");
	after_exit(inst, expected);
}

void Supervisor::connection_closed(std::string_view token)
{
	Instance *inst = find_by_token(token);
	if (!inst || !inst->registered())
		return;
	// It counts as exited; a process still alive is told to drain, so that nothing serves
	// unsupervised on the service's sockets.
	if (inst->state != InstanceState::Draining)
		signal(*inst, inst->generation->cfg.drain_signal);
	external_exit(*inst, "disconnected");
}

} // namespace brokerd
