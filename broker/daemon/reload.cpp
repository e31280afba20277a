// brokerctl reload and SIGHUP: the config file applied again to the running daemon.
#include "daemon/daemon.hpp"

#include "control/access.hpp"
#include "os/log.hpp"

namespace brokerd {

// Applies the config file again: new sockets are bound and new services started; removed
// services drain, and a removed socket closes only once no service uses it any more.
nlohmann::json Daemon::reload()
{
	std::string next_text;
	config::Config next = config::load(config_path_, next_text);
	AccessRules rules = AccessRules::resolve(next.control);
	notifier_.send("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(now_usec(CLOCK_MONOTONIC)));
	nlohmann::json result = {{"added_sockets", nlohmann::json::array()},
	                         {"removed_sockets", nlohmann::json::array()},
	                         {"added_services", nlohmann::json::array()},
	                         {"removed_services", nlohmann::json::array()}};
	auto find_listener = [this](const std::string &name) -> Listener * {
		for (auto &l : listeners_)
			if (l.name == name)
				return &l;
		return nullptr;
	};

	// A running service keeps its sockets: its workers hold them at fd 3 and up, in order. One
	// that a reload removed comes back only once it has drained.
	for (const auto &sc : next.services) {
		const Service *svc = supervisor_->find_service(sc.name);
		std::string problem;
		if (svc && svc->removing)
			problem = "services." + sc.name + ": still draining since a reload removed it; reload again once it is gone";
		else if (svc && svc->cfg.sockets != sc.sockets)
			problem = "services." + sc.name + ".sockets: a running service's sockets cannot change; add the service "
			          "under another name, or remove it first";
		else if (svc && svc->cfg.exec.empty() != sc.exec.empty())
			problem = "services." + sc.name + ".exec: a running service cannot switch between workers brokerd starts "
			          "and registered ones; add the service under another name, or remove it first";
		if (!problem.empty()) {
			notifier_.send("READY=1");
			throw config::ConfigError(problem);
		}
	}

	// Sockets first, all or nothing, so new services find theirs.
	std::vector<Listener> opened;
	try {
		InheritedFds none;
		for (const auto &sc : next.sockets) {
			const config::SocketConfig *old = cfg_.find_socket(sc.name);
			if (old && find_listener(sc.name)) {
				if (old->listen != sc.listen || old->systemd_name != sc.systemd_name)
					throw config::ConfigError("sockets." + sc.name +
					                          ": changed address; a listener is never re-bound, add the new one under another name");
				continue;
			}
			opened.push_back(open_listener(sc, none));
		}
	} catch (...) {
		notifier_.send("READY=1");
		throw;
	}
	for (auto &l : opened) {
		log::info("reload: socket " + l.name + ": listening on " + l.address);
		result["added_sockets"].push_back(l.name);
		store_fd(l.name, l.fd.get());
		listeners_.push_back(std::move(l));
	}

	// The new config is in force before services change, so that a listener is judged unused
	// against it, and never against the old one.
	config::Config old = std::exchange(cfg_, std::move(next));
	cfg_text_ = std::move(next_text);
	control_->set_rules(std::move(rules));
	for (const auto &svc : old.services)
		if (!cfg_.find_service(svc.name)) {
			supervisor_->remove_service(svc.name);
			result["removed_services"].push_back(svc.name);
		}
	for (const auto &svc : cfg_.services) {
		if (!supervisor_->find_service(svc.name)) {
			supervisor_->add_service(svc);
			result["added_services"].push_back(svc.name);
		} else {
			// The next upgrade, or a registration, goes by the new settings.
			supervisor_->update_service(svc);
		}
	}
	for (const auto &sc : old.sockets)
		if (!cfg_.find_socket(sc.name))
			result["removed_sockets"].push_back(sc.name);
	close_unused_listeners();
	log::notice("reloaded " + config_path_);
	notifier_.send("READY=1");
	return result;
}

} // namespace brokerd
