// Access: which tier may call what, and the rule that keeps root's programs root's choice.
#include "control/access.hpp"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

namespace brokerd::access {

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

std::optional<Tier> required(std::string_view control_method)
{
	// The table of docs/protocol.md's "Authorization" section.
	static constexpr struct {
		std::string_view method;
		Tier tier;
	} table[] = {
		{"Status", Tier::Reader},  {"Sockets", Tier::Reader}, {"Watch", Tier::Reader},
		{"Upgrade", Tier::Admin},  {"Rollback", Tier::Admin}, {"Restart", Tier::Admin},
		{"Abort", Tier::Admin},    {"Start", Tier::Admin},    {"Stop", Tier::Admin},
		{"Reload", Tier::Admin},   {"Reexec", Tier::Admin},
	};
	for (const auto &row : table)
		if (row.method == control_method)
			return row.tier;
	return std::nullopt;
}

Credentials lookup_credentials(const config::ServiceConfig &cfg)
{
	Credentials c;
	if (cfg.user.empty() && cfg.group.empty())
		return c;
	c.change = true;
	c.uid = ::getuid();
	c.gid = ::getgid();
	if (!cfg.user.empty()) {
		passwd *pw = ::getpwnam(cfg.user.c_str());
		if (!pw)
			throw std::runtime_error("no such user \"" + cfg.user + "\"");
		c.uid = pw->pw_uid;
		c.gid = pw->pw_gid;
		c.home = pw->pw_dir;
		int n = 64;
		c.groups.resize(static_cast<std::size_t>(n));
		if (::getgrouplist(cfg.user.c_str(), c.gid, c.groups.data(), &n) < 0) {
			c.groups.resize(static_cast<std::size_t>(n));
			::getgrouplist(cfg.user.c_str(), c.gid, c.groups.data(), &n);
		}
		c.groups.resize(static_cast<std::size_t>(n));
	}
	if (!cfg.group.empty()) {
		group *gr = ::getgrnam(cfg.group.c_str());
		if (!gr)
			throw std::runtime_error("no such group \"" + cfg.group + "\"");
		c.gid = gr->gr_gid;
		if (cfg.user.empty())
			c.groups = {c.gid};
		else
			c.groups.push_back(c.gid);
	}
	return c;
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
	Credentials c;
	try {
		c = lookup_credentials(cfg);
	} catch (const std::exception &e) {
		return who + ": " + e.what() + only_root;
	}
	if (c.uid == 0 || c.uid == broker_uid)
		return who + " runs as user \"" + cfg.user + "\", uid " + std::to_string(c.uid) + only_root;
	bool root_group = c.gid == 0 || c.gid == broker_gid ||
	                  std::any_of(c.groups.begin(), c.groups.end(), [&](gid_t g) { return g == 0 || g == broker_gid; });
	if (root_group)
		return who + " runs in root's or brokerd's group" + only_root;
	return std::nullopt;
}

} // namespace brokerd::access
