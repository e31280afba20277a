// Access: the privilege tiers of the control socket, the rules that place a caller in one, the
// parameters only root may give. Which tier each method needs is
// control/methods.cpp's table.
#pragma once

#include "config/config.hpp"

#include <sys/types.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd {

// Who may call what, resolved from the config's names once at start.
struct AccessRules {
	std::vector<uid_t> admin_uids;
	std::vector<gid_t> admin_gids;
	std::vector<uid_t> read_uids;
	std::vector<gid_t> read_gids;

	// Throws std::runtime_error naming an unknown user or group.
	static AccessRules resolve(const config::ControlConfig &cfg,
	                           const config::Resolver &accounts = config::Resolver::system());
};

namespace access {

// Who a caller is, from its SO_PEERCRED, weakest first. Root: uid 0 or brokerd's own uid.
// Admin: control.admin_users and admin_groups. Reader: control.read_users and read_groups.
// Worker: every other peer, which may call org.varlink.service and io.brokerd.Worker (whose
// methods authenticate by Hello).
enum class Tier { Worker, Reader, Admin, Root };
const char *tier_name(Tier t);

// The tier an io.brokerd.Control method needs (by its name without the interface), or nullopt
// for a method that does not exist: control/methods.cpp's table says.
std::optional<Tier> required(std::string_view control_method);

// The tier of a peer with `uid` and `groups` (its primary group among them), under `rules`.
// `broker_uid` is brokerd's own, which is Root like uid 0.
Tier tier_of(const AccessRules &rules, uid_t uid, const std::vector<gid_t> &groups, uid_t broker_uid);

// Some parameters need more than their method's tier. Each returns why `caller` may not give
// it, or nullopt.
// Reexec with a binary: the binary runs as brokerd, so only Root names one.
std::optional<std::string> reexec_binary(Tier caller);

// A caller below Root never makes brokerd run a program, argument list or environment it chose
// (an Upgrade's exec or env) as root, in root's group, or as brokerd's own user: that would be
// root's power. Returns why such a choice is refused for `cfg`, or nullopt when `caller` may
// make it. `broker_uid` and `broker_gid` are brokerd's own, which a service without user and
// group runs as. Reads the ids `cfg`'s load resolved: no lookup.
std::optional<std::string> program_choice(Tier caller, const config::ServiceConfig &cfg, uid_t broker_uid,
                                          gid_t broker_gid);

} // namespace access
} // namespace brokerd
