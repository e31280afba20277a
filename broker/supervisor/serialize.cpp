// The state a re-executed brokerd carries on from: when it may be saved, saving it, restoring it.
#include "supervisor/supervisor.hpp"

#include "daemon/state.hpp"
#include "os/log.hpp"
#include "supervisor/process.hpp"

#include <sys/wait.h>

namespace brokerd {

using json = nlohmann::json;
using namespace process;

bool Supervisor::quiet(std::string &why) const
{
	if (shutting_down_) {
		why = "brokerd is shutting down";
		return false;
	}
	if (router_.batches_in_flight() > 0) {
		why = "connections are being handed off";
		return false;
	}
	for (const auto &svc : services_) {
		if (svc->upgrade) {
			why = "an upgrade of " + svc->name + " is in progress";
			return false;
		}
		if (svc->removing) {
			why = "service " + svc->name + " is being removed";
			return false;
		}
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				bool running = inst->pid > 0;
				if (inst->state == InstanceState::Starting || inst->state == InstanceState::Draining ||
				    (inst->timer && !running) || inst->exec_source) {
					why = "instance " + inst->id + " is " + (inst->state == InstanceState::Draining ? "draining"
					                                         : running ? "starting" : "waiting to restart");
					return false;
				}
			}
	}
	return true;
}

json Supervisor::save_state(std::vector<int> &keep_fds) const
{
	json services = json::array();
	for (const auto &svc : services_) {
		json gens = json::array();
		for (const auto &gen : svc->generations) {
			json insts = json::array();
			for (const auto &inst : gen->instances) {
				json i = {{"index", inst->index},
				          {"id", inst->id},
				          {"state", state_name(inst->state)},
				          {"since", inst->since},
				          {"pid", inst->pid},
				          {"main_pid", inst->main_pid},
				          {"session", inst->session},
				          {"forked", inst->forked},
				          {"token", inst->token},
				          {"status", inst->status_text},
				          {"exit_reason", inst->exit_reason},
				          {"external", inst->external},
				          {"retired", inst->retired()},
				          {"restored", inst->purpose == InstancePurpose::Restored},
				          {"restarts", inst->backoff.restarts},
				          {"crash_times", inst->backoff.crash_times},
				          {"ready_since", inst->backoff.ready_since},
				          {"last_lines", inst->last_lines},
				          {"accepts_handoff", inst->accepts_handoff},
				          {"handoff", {inst->handoff.handed, inst->handoff.received, inst->handoff.returned}}};
				// A registered or MAINPID process is not our child: only its pidfd, carried
				// over, keeps naming it (its pid could be reused).
				if (inst->pidfd) {
					i["pidfd"] = inst->pidfd.get();
					keep_fds.push_back(inst->pidfd.get());
				}
				for (auto [pipe, key] : {std::pair{&inst->out, "out"}, std::pair{&inst->err, "err"}}) {
					if (!pipe->fd)
						continue;
					i[key] = {{"fd", pipe->fd.get()}, {"partial", pipe->partial}};
					keep_fds.push_back(pipe->fd.get());
				}
				insts.push_back(std::move(i));
			}
			gens.push_back({{"number", gen->number},
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
		           {"handoff", {svc->handoff.handed, svc->handoff.received, svc->handoff.returned}}};
		if (svc->previous)
			sv["previous"] = state::service_config(*svc->previous);
		services.push_back(std::move(sv));
	}
	return services;
}

void Supervisor::restore_state(const json &services)
{
	auto counts = [](const json &j) {
		return HandoffCounts{j.at(0).get<std::uint64_t>(), j.at(1).get<std::uint64_t>(), j.at(2).get<std::uint64_t>()};
	};
	for (const json &sv : services) {
		auto svc = std::make_unique<Service>();
		svc->name = sv.at("name").get<std::string>();
		svc->cfg = state::service_config(sv.at("cfg"));
		for (const auto &name : svc->cfg.sockets) {
			const Listener *l = find_listener(name);
			if (!l)
				throw std::runtime_error("re-exec state: service " + svc->name + " uses socket " + name +
				                         ", which was not passed on");
			svc->sockets.push_back(l);
		}
		svc->next_generation = sv.at("next_generation").get<std::uint64_t>();
		svc->stopped = sv.at("stopped").get<bool>();
		svc->handoff = counts(sv.at("handoff"));
		if (sv.contains("previous"))
			svc->previous = state::service_config(sv.at("previous"));
		for (const json &g : sv.at("generations")) {
			auto gen = std::make_unique<Generation>();
			gen->service = svc.get();
			gen->number = g.at("number").get<std::uint64_t>();
			gen->cfg = state::service_config(g.at("cfg"));
			gen->next_index = g.at("next_index").get<unsigned>();
			for (const json &i : g.at("instances")) {
				auto inst = std::make_unique<Instance>();
				inst->supervisor = this;
				inst->service = svc.get();
				inst->generation = gen.get();
				restore_instance(*inst, i);
				gen->instances.push_back(std::move(inst));
			}
			if (!sv.at("current").is_null() && sv.at("current").get<std::uint64_t>() == gen->number)
				svc->current = gen.get();
			svc->generations.push_back(std::move(gen));
		}
		log::info("service " + svc->name + ": carried on" +
		          (svc->current ? " at gen " + std::to_string(svc->current->number) : std::string()));
		services_.push_back(std::move(svc));
	}
	changed();
}

void Supervisor::restore_instance(Instance &inst, const json &i)
{
	inst.index = i.at("index").get<unsigned>();
	inst.id = i.at("id").get<std::string>();
	std::string st = i.at("state").get<std::string>();
	inst.state = st == "ready" ? InstanceState::Ready : st == "exited" ? InstanceState::Exited : InstanceState::Failed;
	inst.since = i.at("since").get<std::uint64_t>();
	inst.pid = i.at("pid").get<pid_t>();
	inst.main_pid = i.at("main_pid").get<pid_t>();
	// Absent from the state of a brokerd that predates them.
	inst.session = i.value("session", inst.pid);
	inst.forked = i.value("forked", false);
	inst.token = i.at("token").get<std::string>();
	inst.status_text = i.at("status").get<std::string>();
	inst.exit_reason = i.at("exit_reason").get<std::string>();
	inst.external = i.at("external").get<bool>();
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
	const json &h = i.at("handoff");
	inst.handoff = HandoffCounts{h.at(0).get<std::uint64_t>(), h.at(1).get<std::uint64_t>(), h.at(2).get<std::uint64_t>()};

	if (i.contains("pidfd")) {
		inst.pidfd.reset(i.at("pidfd").get<int>());
		state::set_cloexec(inst.pidfd.get(), true);
	}
	sd_event_source *s = nullptr;
	for (auto [pipe, key, target] : {std::tuple{&inst.out, "out", 1}, std::tuple{&inst.err, "err", 2}}) {
		if (!i.contains(key))
			continue;
		pipe->fd.reset(i.at(key).at("fd").get<int>());
		state::set_cloexec(pipe->fd.get(), true);
		pipe->partial = i.at(key).at("partial").get<std::string>();
		pipe->target = target;
		if (sd_event_add_io(event_, &s, pipe->fd.get(), EPOLLIN, output_handler, &inst) >= 0)
			pipe->source.reset(s);
	}
	if (inst.pid <= 0)
		return;

	// Children stay children across execve: a spawned worker is watched as before, and one that
	// exited meanwhile is a zombie that sd-event reaps at once.
	if (!inst.external && !inst.forked) {
		proto::UniqueFd pidfd(pidfd_open(inst.pid));
		int r = pidfd ? sd_event_add_child_pidfd(event_, &s, pidfd.get(), WEXITED, child_handler, &inst) : -errno;
		if (r < 0)
			throw std::runtime_error("instance " + inst.id + ": cannot watch pid " + std::to_string(inst.pid) + ": " +
			                         errno_text(-r));
		sd_event_source_set_child_pidfd_own(s, 1);
		(void)pidfd.release();
		inst.child_source.reset(s);
		if (inst.main_pid > 0 && !inst.pidfd)
			inst.main_pid = 0; // no way to name it safely any more: the session's SIGKILL remains
		return;
	}
	if (!inst.pidfd) {
		// Nothing names it safely any more. A registered worker is never restarted by us anyway.
		log::warning("instance " + inst.id + ": pid " + std::to_string(inst.pid) + " came without its pidfd, forgetting it");
		inst.pid = 0;
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
