// Reload as diff, plan, apply: plan_reload() is pure (the running state and the new config in, a plan
// or a refusal out), so it is tested as a table; the daemon applies the plan (daemon/reload.cpp).
#pragma once

#include "config/config.hpp"
#include "config/diff.hpp"
#include "config/invariants.hpp"

#include <string>
#include <variant>
#include <vector>

namespace brokerd {

// What is running, as far as a reload needs to know.
struct RunningState {
	const config::Config &config;         // the config in force
	std::vector<std::string> listeners;   // names of the open listeners
	std::vector<RunningService> services; // the supervisor's services the old or new config names
};

// The changes, each list in the order of the config it comes from.
struct ReloadPlan {
	std::vector<std::string> open_sockets{};    // new in the config: bound, all or nothing
	std::vector<std::string> add_services{};    // started
	std::vector<std::string> update_services{}; // kept: the next upgrade or registration uses the new settings
	std::vector<std::string> remove_services{}; // drained, then forgotten
	std::vector<std::string> removed_sockets{}; // no longer configured: closed once no service uses them
	std::vector<config::Change> changes{};      // brokerd's and the kept services' changed settings
};

// Why the new config cannot be applied, with the key path; nothing changed.
struct ReloadRefusal {
	std::string message;
};

std::variant<ReloadPlan, ReloadRefusal> plan_reload(const RunningState &running, const config::Config &next);

// The plan in a line, for the reload event: "added sockets api; added services web2; 2 setting(s)
// changed", or "nothing changed".
std::string reload_summary(const ReloadPlan &plan);

} // namespace brokerd
