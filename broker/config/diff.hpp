// What a new config changes against the one in force, setting by setting, and when each change
// takes effect: pure, so that a reload's reply and its tests read the same list.
#pragma once

#include "config/config.hpp"

#include <array>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd::config {

// One variable whose value differs from the one before (a generation's, or a reloaded config's): its name and how, never the
// values (they may be secrets).
struct EnvChange {
	enum class Kind { Added, Removed, Changed };
	// Each kind's name, for the wire (EnvChange.change) and the saved state alike.
	static constexpr std::array<const char *, 3> kNames{"added", "removed", "changed"};
	static const char *name_of(Kind k) { return kNames[static_cast<std::size_t>(k)]; }
	// The kind named so; nullopt for a name this brokerd does not know.
	static std::optional<Kind> parse(std::string_view n)
	{
		for (std::size_t i = 0; i < kNames.size(); i++)
			if (n == kNames[i])
				return static_cast<Kind>(i);
		return std::nullopt;
	}
	std::string name;
	Kind kind = Kind::Changed;
	bool operator==(const EnvChange &) const = default;
};

// What differs from `before` to `after`, by name.
std::vector<EnvChange> env_changes(const std::map<std::string, std::string> &before,
                                   const std::map<std::string, std::string> &after);

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
