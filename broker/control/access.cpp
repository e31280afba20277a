// Access: the tier of a caller, and the rules that keep root's programs root's choice.
#include "control/access.hpp"

#include "control/methods.hpp"

#include <algorithm>
#include <stdexcept>

namespace brokerd {

AccessRules AccessRules::resolve(const config::ControlConfig &cfg, const config::Resolver &accounts)
{
	AccessRules r;
	auto users = [&](const std::vector<std::string> &names, std::vector<uid_t> &out, const char *key) {
		for (const auto &n : names) {
			auto user = accounts.user(n);
			if (!user)
				throw std::runtime_error(std::string("control.") + key + ": no such user \"" + n + "\"");
			out.push_back(user->uid);
		}
	};
	auto groups = [&](const std::vector<std::string> &names, std::vector<gid_t> &out, const char *key) {
		for (const auto &n : names) {
			auto gid = accounts.group(n);
			if (!gid)
				throw std::runtime_error(std::string("control.") + key + ": no such group \"" + n + "\"");
			out.push_back(*gid);
		}
	};
	users(cfg.admin_users, r.admin_uids, "admin_users");
	groups(cfg.admin_groups, r.admin_gids, "admin_groups");
	users(cfg.read_users, r.read_uids, "read_users");
	groups(cfg.read_groups, r.read_gids, "read_groups");
	return r;
}

namespace access {

const char *tier_name(Tier t)
{
	switch (t) {
	case Tier::Root:
		return "root";
	case Tier::Admin:
		return "admin";
	case Tier::Reader:
		return "reader";
	case Tier::Worker:
		break;
	}
	return "worker";
}

Tier tier_of(const AccessRules &rules, uid_t uid, const std::vector<gid_t> &groups, uid_t broker_uid)
{
	auto has = [](const auto &v, auto x) { return std::find(v.begin(), v.end(), x) != v.end(); };
	auto in_groups = [&](const std::vector<gid_t> &allowed) {
		return std::any_of(groups.begin(), groups.end(), [&](gid_t g) { return has(allowed, g); });
	};
	if (uid == 0 || uid == broker_uid)
		return Tier::Root;
	if (has(rules.admin_uids, uid) || in_groups(rules.admin_gids))
		return Tier::Admin;
	if (has(rules.read_uids, uid) || in_groups(rules.read_gids))
		return Tier::Reader;
	return Tier::Worker;
}

std::optional<Tier> required(std::string_view control_method)
{
	return control::required("io.brokerd.Control." + std::string(control_method));
}

std::optional<std::string> reexec_binary(Tier caller)
{
	// Configured admins may re-execute the installed brokerd.
	if (caller == Tier::Root)
		return std::nullopt;
	return "only root names a binary: it runs as brokerd's user";
}

std::optional<std::string> program_choice(Tier caller, const config::ServiceConfig &cfg, uid_t broker_uid,
                                          gid_t broker_gid)
{
	if (caller == Tier::Root)
		return std::nullopt;
	const std::string who = "services." + cfg.name;
	const std::string only_root = ": only root may choose the program, arguments or environment it runs";
	if (cfg.user.empty())
		return who + " has no \"user\", so it runs as brokerd's own user" + only_root;
	if (!cfg.accounts.unknown.empty())
		return who + ": " + cfg.accounts.unknown + only_root;
	if (!cfg.accounts.resolved)
		return who + ": its user was never resolved" + only_root;
	const config::Credentials &c = cfg.accounts.creds;
	if (c.uid == 0 || c.uid == broker_uid)
		return who + " runs as user \"" + cfg.user + "\", uid " + std::to_string(c.uid) + only_root;
	bool root_group = c.gid == 0 || c.gid == broker_gid ||
	                  std::any_of(c.groups.begin(), c.groups.end(), [&](gid_t g) { return g == 0 || g == broker_gid; });
	if (root_group)
		return who + " runs in root's or brokerd's group" + only_root;
	return std::nullopt;
}

} // namespace access
} // namespace brokerd
