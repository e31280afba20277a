// brokerctl reload and SIGHUP: the config file applied again to the running daemon, as a pure
// plan (what changes, or why nothing may) and its application.
#include "daemon/reload.hpp"

#include "daemon/daemon.hpp"

#include "control/access.hpp"
#include "control/encode.hpp"
#include "os/log.hpp"

#include <algorithm>

namespace brokerd {
namespace {

const RunningService *find_running(const std::vector<RunningService> &services, const std::string &name)
{
	auto it = std::find_if(services.begin(), services.end(), [&](const auto &s) { return s.name == name; });
	return it == services.end() ? nullptr : &*it;
}

std::string refusal(const std::string &service, RunningChange change)
{
	switch (change) {
	case RunningChange::Draining:
		return "services." + service + ": still draining since a reload removed it; reload again once it is gone";
	case RunningChange::Sockets:
		return "services." + service + ".sockets: a running service's sockets cannot change; add the service "
		       "under another name, or remove it first";
	case RunningChange::ExecKind:
		return "services." + service + ".exec: a running service cannot switch between workers brokerd starts "
		       "and registered ones; add the service under another name, or remove it first";
	case RunningChange::None:
		break;
	}
	return {};
}

} // namespace

std::variant<ReloadPlan, ReloadRefusal> plan_reload(const RunningState &running, const config::Config &next)
{
	ReloadPlan p;
	// A running service keeps its sockets and its kind; one that a reload removed comes back
	// only once it has drained.
	for (const auto &sc : next.services) {
		const RunningService *svc = find_running(running.services, sc.name);
		if (!svc) {
			p.add_services.push_back(sc.name);
			continue;
		}
		if (RunningChange change = running_change(*svc, sc.sockets, sc.exec.empty()); change != RunningChange::None)
			return ReloadRefusal{refusal(sc.name, change)};
		p.update_services.push_back(sc.name);
	}
	// A listener is never re-bound: the workers and the service manager's fd store hold it.
	for (const auto &sc : next.sockets) {
		const config::SocketConfig *old = running.config.find_socket(sc.name);
		bool open = std::find(running.listeners.begin(), running.listeners.end(), sc.name) != running.listeners.end();
		if (!old || !open) {
			p.open_sockets.push_back(sc.name);
			continue;
		}
		if (old->listen != sc.listen || old->systemd_name != sc.systemd_name)
			return ReloadRefusal{"sockets." + sc.name +
			               ": changed address; a listener is never re-bound, add the new one under another name"};
	}
	for (const auto &svc : running.config.services)
		if (!next.find_service(svc.name))
			p.remove_services.push_back(svc.name);
	for (const auto &sc : running.config.sockets)
		if (!next.find_socket(sc.name))
			p.removed_sockets.push_back(sc.name);
	p.changes = config::diff(running.config, next);
	return p;
}

std::string reload_summary(const ReloadPlan &plan)
{
	std::string out;
	auto part = [&out](const char *what, const std::vector<std::string> &names) {
		if (names.empty())
			return;
		out += (out.empty() ? "" : "; ") + std::string(what);
		for (std::size_t i = 0; i < names.size(); ++i)
			out += (i ? ", " : " ") + names[i];
	};
	part("added sockets", plan.open_sockets);
	part("added services", plan.add_services);
	part("removed services", plan.remove_services);
	part("removed sockets", plan.removed_sockets);
	if (!plan.changes.empty())
		out += (out.empty() ? "" : "; ") + std::to_string(plan.changes.size()) + " setting(s) changed";
	return out.empty() ? "nothing changed" : out;
}

RunningState Daemon::running_for_reload(const config::Config &next) const
{
	RunningState running{cfg_, {}, {}};
	for (const auto &l : listeners_)
		running.listeners.push_back(l.name);
	auto add = [&](const std::string &name) {
		const Service *svc = supervisor_->find_service(name);
		if (svc && !find_running(running.services, name))
			running.services.push_back({name, svc->removing, svc->cfg.sockets, svc->cfg.exec.empty()});
	};
	for (const auto &svc : cfg_.services)
		add(svc.name);
	for (const auto &svc : next.services)
		add(svc.name);
	return running;
}

// Applies the config file again: new sockets are bound and new services started; removed
// services drain, and a removed socket closes only once no service uses it any more.
nlohmann::json Daemon::reload()
{
	std::string next_text;
	config::Config next = config::load(config_path_, next_text);
	AccessRules rules = AccessRules::resolve(next.control);
	notifier_.send("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(now_usec(CLOCK_MONOTONIC)));
	auto planned = plan_reload(running_for_reload(next), next);
	if (auto *refused = std::get_if<ReloadRefusal>(&planned)) {
		notifier_.send("READY=1");
		throw config::ConfigError(refused->message);
	}
	const ReloadPlan &plan = std::get<ReloadPlan>(planned);
	nlohmann::json result;
	try {
		result = apply_reload(plan, std::move(next), std::move(next_text), std::move(rules));
	} catch (...) {
		notifier_.send("READY=1");
		throw;
	}
	log::EventRecord record = reload_record(config_path_);
	log::event(record);
	Event e;
	e.kind = EventKind::Reload;
	e.message = record.message + ": " + reload_summary(plan);
	e.changes = plan.changes;
	broadcast_own(std::move(e));
	notifier_.send("READY=1");
	return result;
}

// Throws, with nothing changed, when a new socket cannot be bound.
nlohmann::json Daemon::apply_reload(const ReloadPlan &plan, config::Config next, std::string next_text, AccessRules rules)
{
	// Sockets first, all or nothing, so new services find theirs.
	std::vector<Listener> opened;
	InheritedFds none;
	for (const auto &name : plan.open_sockets)
		opened.push_back(open_listener(*next.find_socket(name), none));
	for (auto &l : opened) {
		log::info("reload: socket " + l.name + ": listening on " + l.address);
		store_fd(l.name, l.fd.get());
		listeners_.push_back(std::move(l));
	}

	// The new config is in force before services change, so that a listener is judged unused
	// against it, and never against the old one.
	cfg_ = std::move(next);
	cfg_text_ = std::move(next_text);
	control_->set_rules(std::move(rules));
	journal_->apply(cfg_.logging.journal);
	for (const auto &name : plan.remove_services)
		supervisor_->remove_service(name);
	for (const auto &name : plan.add_services)
		supervisor_->add_service(*cfg_.find_service(name));
	// The next upgrade, or a registration, goes by the new settings.
	for (const auto &name : plan.update_services)
		supervisor_->update_service(*cfg_.find_service(name));
	close_unused_listeners();
	// Written before the caller hears it is done: a brokerd killed after the reply carries on
	// with the reloaded config, not the one before (the config text changed, whether or not a
	// service did).
	if (crash_state_)
		crash_state_->write();
	return {{"added_sockets", plan.open_sockets},
	        {"removed_sockets", plan.removed_sockets},
	        {"added_services", plan.add_services},
	        {"removed_services", plan.remove_services},
	        {"changed", encode::changes(plan.changes)}};
}

} // namespace brokerd
