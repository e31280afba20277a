// The supervisor's state as JSON, for the brokerd a reexec starts: saving it, and reading it back.
#include "supervisor/serialize.hpp"

#include "daemon/state.hpp"
#include "supervisor/supervisor.hpp"

namespace brokerd {

using json = nlohmann::json;

// An instance's state as the saved state names it. A re-exec happens only when no instance is
// starting, restarting or draining (Supervisor::busy); a crash state has them all.
static const char *state_format_name(InstanceState s)
{
	switch (s) {
	case InstanceState::Starting:
		return "starting";
	case InstanceState::Restarting:
		return "restarting";
	case InstanceState::Ready:
		return "ready";
	case InstanceState::Draining:
		return "draining";
	case InstanceState::Exited:
		return "exited";
	case InstanceState::Failed:
		break;
	}
	return "failed";
}

// The history's records; the config of each is what rollback --to deploys.
static json save_history(const History &history)
{
	json out = json::array();
	for (const HistoryRecord &r : history.records())
		out.push_back({{"generation", r.generation},
		               {"cfg", state::service_config(r.cfg)},
		               {"started", r.started},
		               {"ended", r.ended},
		               {"how", origin_name(r.how)},
		               {"result", result_name(r.result)},
		               {"by", r.by ? json(*r.by) : json()}});
	return out;
}

static void restore_history(Service &svc, const json &sv)
{
	auto it = sv.find("history");
	if (it == sv.end()) {
		// A brokerd that predates history: its generations still known, as well as it can tell.
		// How and when each came, and who asked, it did not keep.
		for (const auto &gen : svc.generations) {
			bool current = gen.get() == svc.current;
			GenerationOrigin how = gen->cfg.exec.empty()           ? GenerationOrigin::Registration
			                       : gen.get() == svc.generations.front().get() ? GenerationOrigin::Start
			                                                                    : GenerationOrigin::Upgrade;
			GenerationResult result = current && !svc.stopped ? GenerationResult::Serving
			                          : current                ? GenerationResult::Stopped
			                                                   : GenerationResult::Replaced;
			svc.history.begin({gen->number, gen->cfg, 0, 0, how, result, std::nullopt});
		}
		return;
	}
	for (const json &r : *it) {
		auto how = origin_named(r.at("how").get<std::string>());
		auto result = result_named(r.at("result").get<std::string>());
		if (!how || !result)
			throw std::runtime_error("state: service " + svc.name + ": a history record with an unknown how or result");
		const json &by = r.at("by");
		svc.history.begin({r.at("generation").get<std::uint64_t>(), state::service_config(r.at("cfg")),
		                   r.at("started").get<std::uint64_t>(), r.at("ended").get<std::uint64_t>(), *how, *result,
		                   by.is_null() ? std::nullopt : std::optional(by.get<uid_t>())});
	}
}

// A sender's direct channels, each [instance, pid, sent, landed, returned]: its Handed calls go
// on counting against them after a re-exec or a crash.
static json peer_links(const Instance &inst)
{
	json out = json::array();
	for (const Instance::PeerLink &l : inst.peers)
		out.push_back({l.instance, l.pid, l.sent, l.landed, l.returned});
	return out;
}

// Every service, each with its history or without (save_text() adds it as text).
static json save_services(const Supervisor &supervisor, std::vector<int> &keep_fds, bool with_history)
{
	json services = json::array();
	for (const auto &svc : supervisor.services()) {
		json gens = json::array();
		for (const auto &gen : svc->generations) {
			json insts = json::array();
			for (const auto &inst : gen->instances) {
				json i = {{"index", inst->index},
				          {"id", inst->id},
				          {"state", state_format_name(inst->state)},
				          {"since", inst->since},
				          {"pid", inst->pid},
				          {"main_pid", inst->main_pid},
				          {"pid_start", inst->pid_start},
				          {"main_pid_start", inst->main_pid_start},
				          {"session", inst->session},
				          {"forked", inst->origin == InstanceOrigin::Forked},
				          {"token", inst->token},
				          {"status", inst->status_text},
				          {"exit_reason", inst->exit_reason},
				          {"slot_restarts", inst->restarts},
				          {"external", inst->registered()},
				          {"retired", inst->retired()},
				          {"restored", inst->purpose == InstancePurpose::Restored},
				          {"restarts", inst->backoff.restarts},
				          {"crash_times", inst->backoff.crash_times},
				          {"ready_since", inst->backoff.ready_since},
				          {"last_lines", inst->last_lines},
				          {"accepts_handoff", inst->accepts_handoff},
				          {"peer_handoff", inst->peer_handoff},
				          {"peers", peer_links(*inst)},
				          {"peers_of", inst->peers_of},
				          {"linked", inst->events != nullptr},
				          {"handoff", {inst->handoff.handed, inst->handoff.received, inst->handoff.returned}}};
				// The start, drain or restart timer's deadline (CLOCK_MONOTONIC, which a crash
				// restart on the same boot shares), or 0.
				std::uint64_t deadline = 0;
				if (inst->timer)
					sd_event_source_get_time(inst->timer.get(), &deadline);
				i["deadline"] = deadline;
				// A registered or MAINPID process is not our child: only its pidfd, carried
				// over, keeps naming it (its pid could be reused).
				if (inst->pidfd) {
					i["pidfd"] = inst->pidfd.get();
					keep_fds.push_back(inst->pidfd.get());
				}
				for (auto [pipe, key] : {std::pair{&inst->out, "out"}, std::pair{&inst->err, "err"}}) {
					if (!pipe->fd)
						continue;
					i[key] = {{"fd", pipe->fd.get()},
					          {"partial", pipe->partial},
					          {"inode", pipe->inode},
					          {"stored", pipe->stored}};
					keep_fds.push_back(pipe->fd.get());
				}
				insts.push_back(std::move(i));
			}
			json env = json::array();
			for (const EnvChange &c : gen->env)
				env.push_back({c.name, EnvChange::name_of(c.kind)});
			gens.push_back({{"number", gen->number},
			                {"started", gen->started},
			                {"env", std::move(env)},
			                {"cfg", state::service_config(gen->cfg)},
			                {"next_index", gen->next_index},
			                {"instances", std::move(insts)}});
		}
		json sv = {{"name", svc->name},
		           {"cfg", state::service_config(svc->cfg)},
		           {"generations", std::move(gens)},
		           {"current", svc->current ? json(svc->current->number) : json()},
		           {"next_generation", svc->next_generation},
		           {"stopped", svc->stopped},
		           {"removing", svc->removing},
		           {"handoff", {svc->handoff.handed, svc->handoff.received, svc->handoff.returned}},
		           {"handoff_channels", svc->handoff_channels}};
		if (svc->previous)
			sv["previous"] = state::service_config(*svc->previous);
		if (with_history)
			sv["history"] = save_history(svc->history);
		if (svc->scaled)
			sv["scaled"] = *svc->scaled;
		services.push_back(std::move(sv));
	}
	return services;
}

json Serializer::save(const Supervisor &supervisor, std::vector<int> &keep_fds)
{
	return save_services(supervisor, keep_fds, true);
}

std::string Serializer::dump(const json &j)
{
	return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// An object's text with one more member, whose value is text already.
static void append_member(std::string &object, std::string_view key, std::string_view value)
{
	object.pop_back(); // its '}'
	if (object.size() > 1)
		object += ',';
	object += json(key).dump();
	object += ':';
	object += value;
	object += '}';
}

std::string Serializer::save_text(const Supervisor &supervisor, json around, HistoryTexts &cache)
{
	std::vector<int> unused;
	json saved = save_services(supervisor, unused, false);
	HistoryTexts kept;
	std::string services = "[";
	std::size_t n = 0;
	for (const auto &svc : supervisor.services()) {
		std::string text = dump(saved.at(n++));
		std::uint64_t revision = svc->history.revision();
		auto it = cache.by_service.find(svc->name);
		if (it == cache.by_service.end() || it->second.first != revision)
			it = cache.by_service.insert_or_assign(svc->name, std::pair{revision, dump(save_history(svc->history))}).first;
		append_member(text, "history", it->second.second);
		services += (services.size() > 1 ? "," : "") + text;
		kept.by_service.insert(cache.by_service.extract(it));
	}
	services += ']';
	cache = std::move(kept); // services gone take their texts with them
	std::string out = dump(around);
	append_member(out, "services", services);
	return out;
}

static InstanceState decode_state(const std::string &st)
{
	for (InstanceState s : {InstanceState::Starting, InstanceState::Restarting, InstanceState::Ready,
	                        InstanceState::Draining, InstanceState::Exited})
		if (st == state_format_name(s))
			return s;
	return InstanceState::Failed;
}

// An instance's fds: the numbers a re-exec carried over, or what the fd store kept after a crash.
static void decode_fds(Instance &inst, const json &i, Serializer::CrashFds *crash)
{
	if (i.contains("pidfd") && !crash) {
		inst.pidfd.reset(i.at("pidfd").get<int>());
		state::set_cloexec(inst.pidfd.get(), true);
	}
	for (auto [pipe, key, target] : {std::tuple{&inst.out, "out", 1}, std::tuple{&inst.err, "err", 2}}) {
		if (!i.contains(key))
			continue;
		const json &p = i.at(key);
		pipe->inode = p.value("inode", std::uint64_t{0});
		pipe->stored = p.value("stored", false);
		pipe->target = target;
		if (!crash) {
			pipe->fd.reset(p.at("fd").get<int>());
			state::set_cloexec(pipe->fd.get(), true);
			pipe->partial = p.at("partial").get<std::string>();
			continue;
		}
		// The line it was in the middle of was the dead brokerd's.
		auto kept = pipe->stored ? crash->pipes.find(pipe->inode) : crash->pipes.end();
		if (kept == crash->pipes.end()) {
			pipe->stored = false;
			continue;
		}
		pipe->fd = std::move(kept->second);
		crash->pipes.erase(kept);
	}
}

static void decode_instance(Instance &inst, const json &i, Serializer::CrashFds *crash)
{
	inst.index = i.at("index").get<unsigned>();
	inst.id = i.at("id").get<std::string>();
	inst.state = decode_state(i.at("state").get<std::string>());
	inst.since = i.at("since").get<std::uint64_t>();
	inst.pid = i.at("pid").get<pid_t>();
	inst.main_pid = i.at("main_pid").get<pid_t>();
	// Absent from the state of a brokerd that predates them.
	inst.pid_start = i.value("pid_start", std::uint64_t{0});
	inst.main_pid_start = i.value("main_pid_start", std::uint64_t{0});
	// Absent from the state of a brokerd that predates them.
	inst.session = i.value("session", inst.pid);
	inst.token = i.at("token").get<std::string>();
	inst.status_text = i.at("status").get<std::string>();
	inst.exit_reason = i.at("exit_reason").get<std::string>();
	inst.restarts = i.value("slot_restarts", 0u); // absent from the state of a brokerd that predates it
	// The origin as two flags, the state format of every brokerd so far ("forked" absent from
	// the oldest).
	inst.origin = i.at("external").get<bool>() ? InstanceOrigin::Registered
	              : i.value("forked", false)   ? InstanceOrigin::Forked
	                                           : InstanceOrigin::Spawned;
	inst.purpose = i.at("retired").get<bool>()    ? InstancePurpose::Retired
	               : i.at("restored").get<bool>() ? InstancePurpose::Restored
	                                              : InstancePurpose::Serving;
	inst.backoff.restarts = i.at("restarts").get<unsigned>();
	for (const json &t : i.at("crash_times"))
		inst.backoff.crash_times.push_back(t.get<std::uint64_t>());
	inst.backoff.ready_since = i.at("ready_since").get<std::uint64_t>();
	for (const json &l : i.at("last_lines"))
		inst.last_lines.push_back(l.get<std::string>());
	inst.accepts_handoff = i.at("accepts_handoff").get<bool>();
	// Absent from the state of a brokerd that predates them.
	inst.peer_handoff = i.value("peer_handoff", false);
	inst.peers_of = i.value("peers_of", 0);
	for (const json &l : i.value("peers", json::array()))
		inst.peers.push_back(Instance::PeerLink{l.at(0).get<std::string>(), l.at(1).get<pid_t>(),
		                                        l.at(2).get<std::uint64_t>(), l.at(3).get<std::uint64_t>(),
		                                        l.at(4).get<std::uint64_t>()});
	inst.linked = i.value("linked", false); // absent from the state of a brokerd that predates it
	const json &h = i.at("handoff");
	inst.handoff = HandoffCounts{h.at(0).get<std::uint64_t>(), h.at(1).get<std::uint64_t>(), h.at(2).get<std::uint64_t>()};
	inst.restored_deadline = i.value("deadline", std::uint64_t{0});
	decode_fds(inst, i, crash);
}

void Serializer::restore(Supervisor &supervisor, const json &services)
{
	restore_services(supervisor, services, nullptr);
}

void Serializer::restore_crashed(Supervisor &supervisor, const json &services, CrashFds &fds)
{
	restore_services(supervisor, services, &fds);
}

void Serializer::restore_services(Supervisor &supervisor, const json &services, CrashFds *crash)
{
	auto counts = [](const json &j) {
		return HandoffCounts{j.at(0).get<std::uint64_t>(), j.at(1).get<std::uint64_t>(), j.at(2).get<std::uint64_t>()};
	};
	for (const json &sv : services) {
		auto svc = std::make_unique<Service>();
		svc->name = sv.at("name").get<std::string>();
		svc->cfg = state::service_config(sv.at("cfg"));
		for (const auto &name : svc->cfg.sockets) {
			const Listener *l = supervisor.find_listener(name);
			if (!l)
				throw std::runtime_error("re-exec state: service " + svc->name + " uses socket " + name +
				                         ", which was not passed on");
			svc->sockets.push_back(l);
		}
		svc->next_generation = sv.at("next_generation").get<std::uint64_t>();
		svc->stopped = sv.at("stopped").get<bool>();
		svc->removing = sv.value("removing", false);
		svc->handoff = counts(sv.at("handoff"));
		svc->handoff_channels = sv.value("handoff_channels", std::uint64_t{0}); // absent before it was counted
		if (sv.contains("previous"))
			svc->previous = state::service_config(sv.at("previous"));
		// Absent from the state of a brokerd that predates Scale, and of a service never scaled.
		if (sv.contains("scaled")) {
			svc->scaled = sv.at("scaled").get<unsigned>();
			if (*svc->scaled < 1 || *svc->scaled > config::kMaxInstances)
				throw std::runtime_error("re-exec state: service " + svc->name + " scaled to " +
				                         std::to_string(*svc->scaled) + " instances");
		}
		for (const json &g : sv.at("generations")) {
			auto gen = std::make_unique<Generation>();
			gen->service = svc.get();
			gen->number = g.at("number").get<std::uint64_t>();
			gen->cfg = state::service_config(g.at("cfg"));
			gen->next_index = g.at("next_index").get<unsigned>();
			// Absent from the state of a brokerd that predates them.
			gen->started = g.value("started", std::uint64_t{0});
			for (const json &c : g.value("env", json::array()))
				if (auto kind = EnvChange::parse(c.at(1).get<std::string>()))
					gen->env.push_back({c.at(0).get<std::string>(), *kind});
			for (const json &i : g.at("instances")) {
				auto inst = std::make_unique<Instance>();
				inst->service = svc.get();
				inst->generation = gen.get();
				decode_instance(*inst, i, crash);
				gen->instances.push_back(std::move(inst));
			}
			if (!sv.at("current").is_null() && sv.at("current").get<std::uint64_t>() == gen->number)
				svc->current = gen.get();
			svc->generations.push_back(std::move(gen));
		}
		restore_history(*svc, sv);
		if (crash)
			supervisor.readopt(std::move(svc));
		else
			supervisor.adopt(std::move(svc));
	}
}

} // namespace brokerd
