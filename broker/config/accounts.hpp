// Accounts: the user and group names of a config resolved into ids when it is loaded, so that
// no spawn, Hello or Upgrade asks the account database (NSS, which may block on LDAP or sssd)
// on the event loop.
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace brokerd::config {

// The identity a service's workers run as: spawn switches to it when `change` is set.
struct Credentials {
	bool change = false;
	uid_t uid = 0;
	gid_t gid = 0;
	std::vector<gid_t> groups;
	std::string home;
};

// A service's names as its config's load resolved them.
struct Accounts {
	bool resolved = false;             // false: never resolved (a config parsed, not loaded)
	Credentials creds;                 // user and group
	std::string unknown;               // why they did not resolve ("no such user \"www\""): only
	                                   // in a config a re-exec restored; its instances fail at spawn
	std::vector<uid_t> register_uids;  // register_users and register_groups; a name that did not
	std::vector<gid_t> register_gids;  // resolve is left out, so it matches nobody

	// The register rule, default-deny: a peer may Hello when it is a listed user or in a listed
	// group (`groups` holds its primary group too).
	bool may_register(uid_t uid, const std::vector<gid_t> &groups) const;
};

// A user's entry in the account database.
struct UserEntry {
	uid_t uid = 0;
	gid_t gid = 0;
	std::string home;
};

// The account database, as seams for the tests. system() is getpwnam_r, getgrnam_r and
// getgrouplist. user and group return nullopt for a name that does not exist, and throw
// std::runtime_error ("cannot look up user \"www\": ...") when the lookup itself fails.
struct Resolver {
	std::function<std::optional<UserEntry>(const std::string &name)> user;
	std::function<std::optional<gid_t>(const std::string &name)> group;
	// The groups of user `name`, whose primary group is `gid`, that one included.
	std::function<std::vector<gid_t>(const std::string &name, gid_t gid)> groups;

	static Resolver system();
};

} // namespace brokerd::config
