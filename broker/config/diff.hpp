// What a new config changes against the one in force, setting by setting, and when each change
// takes effect: pure, so that a reload's reply and its tests read the same list.
#pragma once

#include "config/config.hpp"

#include <string>
#include <vector>

namespace brokerd::config {

// When a running brokerd applies a changed setting: at once (who may register or call, the
// shutdown budget, the journal), at the service's next upgrade (or, for a registered service,
// its next takeover), which starts its new generation from the new settings, at brokerd's next
// start (the control socket's own settings: a reexec carries the socket over as it is), or at its
// next reexec or start (the metrics endpoint).
enum class Effect { Now, NextUpgrade, NextStart, NextReexec };

// One changed setting. service is empty for brokerd's own settings (control.*, shutdown.*,
// logging.*); key is the setting's path inside its service's entry or in the file ("instances",
// "drain.timeout", "control.admin_users"); from and to are its values as the config file writes
// them. env's values are never shown, since they may be secrets: its change has no from, and to
// names the variables ("FOO added, BAR changed, BAZ removed").
struct Change {
	std::string service;
	std::string key;
	std::string from;
	std::string to;
	Effect when = Effect::NextUpgrade;

	bool operator==(const Change &) const = default;
};

// Every changed setting of a service in both configs, in the order of ServiceConfig's fields.
// A service's sockets and kind cannot change while it runs (config/invariants.hpp): they are not
// compared here.
std::vector<Change> diff_service(const ServiceConfig &old, const ServiceConfig &next);

// brokerd's own changed settings, then each service's of those in both configs, in name order.
std::vector<Change> diff(const Config &old, const Config &next);

} // namespace brokerd::config
