// Accounts: a config's user and group names resolved once per load, and the register rule that
// reads only what they resolved to.
#include "config/accounts.hpp"

#include "config/config.hpp"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <stdexcept>
#include <system_error>

namespace brokerd::config {
namespace {

// One load's answers: each distinct name is asked once, however many services name it.
class Lookups {
public:
	explicit Lookups(const Resolver &r) : r_(r) {}

	const std::optional<UserEntry> &user(const std::string &name)
	{
		auto it = users_.find(name);
		if (it == users_.end())
			it = users_.emplace(name, r_.user(name)).first;
		return it->second;
	}
	std::optional<gid_t> group(const std::string &name)
	{
		auto it = groups_.find(name);
		if (it == groups_.end())
			it = groups_.emplace(name, r_.group(name)).first;
		return it->second;
	}
	const std::vector<gid_t> &groups_of(const std::string &name, gid_t gid)
	{
		auto it = members_.find(name);
		if (it == members_.end())
			it = members_.emplace(name, r_.groups(name, gid)).first;
		return it->second;
	}

private:
	const Resolver &r_;
	std::map<std::string, std::optional<UserEntry>> users_;
	std::map<std::string, std::optional<gid_t>> groups_;
	std::map<std::string, std::vector<gid_t>> members_;
};

// What a service's user or group did not resolve to: its key, and why.
struct Unresolved {
	const char *key;
	std::string why;
};

// What spawn switches to for `cfg.user` and `cfg.group`, into `c`.
std::optional<Unresolved> resolve_credentials(const ServiceConfig &cfg, Lookups &l, Credentials &c)
{
	c = {};
	if (cfg.user.empty() && cfg.group.empty())
		return std::nullopt;
	c.change = true;
	c.uid = ::getuid();
	c.gid = ::getgid();
	const char *key = "user";
	try {
		if (!cfg.user.empty()) {
			const std::optional<UserEntry> &u = l.user(cfg.user);
			if (!u)
				return Unresolved{"user", "no such user \"" + cfg.user + "\""};
			c.uid = u->uid;
			c.gid = u->gid;
			c.home = u->home;
			c.groups = l.groups_of(cfg.user, u->gid);
		}
		key = "group";
		if (!cfg.group.empty()) {
			std::optional<gid_t> g = l.group(cfg.group);
			if (!g)
				return Unresolved{"group", "no such group \"" + cfg.group + "\""};
			c.gid = *g;
			if (cfg.user.empty())
				c.groups = {c.gid};
			else
				c.groups.push_back(c.gid);
		}
	} catch (const std::runtime_error &e) {
		return Unresolved{key, e.what()};
	}
	return std::nullopt;
}

// A register name that does not resolve, or whose lookup fails, matches nobody.
void resolve_register(const ServiceConfig &cfg, Lookups &l, Accounts &a)
{
	for (const auto &name : cfg.register_users)
		try {
			if (const auto &u = l.user(name))
				a.register_uids.push_back(u->uid);
		} catch (const std::runtime_error &) {
		}
	for (const auto &name : cfg.register_groups)
		try {
			if (auto g = l.group(name))
				a.register_gids.push_back(*g);
		} catch (const std::runtime_error &) {
		}
}

// A getpwnam_r-like lookup, its buffer grown until the entry fits: the entry, or nullopt for no
// such name.
template <typename Entry, typename Lookup>
std::optional<Entry> lookup_r(const char *what, const std::string &name, int size_hint, Lookup lookup)
{
	long hint = ::sysconf(size_hint);
	std::vector<char> buf(hint > 0 ? static_cast<std::size_t>(hint) : 16384);
	for (;;) {
		Entry entry;
		Entry *result = nullptr;
		int err = lookup(name.c_str(), &entry, buf.data(), buf.size(), &result);
		if (err == ERANGE && buf.size() < (1u << 20)) {
			buf.resize(buf.size() * 2);
			continue;
		}
		if (result)
			return entry;
		// glibc reports "not found" as 0 or, from some NSS modules, ENOENT/ESRCH.
		if (err == 0 || err == ENOENT || err == ESRCH)
			return std::nullopt;
		throw std::runtime_error(std::string("cannot look up ") + what + " \"" + name +
		                         "\": " + std::generic_category().message(err));
	}
}

} // namespace

bool Accounts::may_register(uid_t uid, const std::vector<gid_t> &groups) const
{
	auto listed = [](const auto &ids, auto id) { return std::find(ids.begin(), ids.end(), id) != ids.end(); };
	return listed(register_uids, uid) ||
	       std::any_of(groups.begin(), groups.end(), [&](gid_t g) { return listed(register_gids, g); });
}

Resolver Resolver::system()
{
	Resolver r;
	// The entry's strings point into the buffer lookup_r() frees: each is copied out in the lookup.
	r.user = [](const std::string &name) -> std::optional<UserEntry> {
		std::optional<UserEntry> found;
		lookup_r<passwd>("user", name, _SC_GETPW_R_SIZE_MAX,
		                 [&](const char *n, passwd *pw, char *buf, std::size_t len, passwd **result) {
			                 int err = ::getpwnam_r(n, pw, buf, len, result);
			                 if (*result)
				                 found = UserEntry{pw->pw_uid, pw->pw_gid, pw->pw_dir};
			                 return err;
		                 });
		return found;
	};
	r.group = [](const std::string &name) -> std::optional<gid_t> {
		auto gr = lookup_r<struct group>("group", name, _SC_GETGR_R_SIZE_MAX, ::getgrnam_r);
		if (!gr)
			return std::nullopt;
		return gr->gr_gid;
	};
	r.groups = [](const std::string &name, gid_t gid) {
		int n = 64;
		std::vector<gid_t> groups(static_cast<std::size_t>(n));
		if (::getgrouplist(name.c_str(), gid, groups.data(), &n) < 0) {
			groups.resize(static_cast<std::size_t>(n));
			::getgrouplist(name.c_str(), gid, groups.data(), &n);
		}
		groups.resize(static_cast<std::size_t>(n));
		return groups;
	};
	return r;
}

void resolve_accounts(Config &cfg, const Resolver &resolver)
{
	Lookups lookups(resolver);
	for (auto &svc : cfg.services) {
		Accounts a;
		a.resolved = true;
		if (auto missing = resolve_credentials(svc, lookups, a.creds))
			throw ConfigError("services." + svc.name + "." + missing->key + ": " + missing->why);
		resolve_register(svc, lookups, a);
		svc.accounts = std::move(a);
	}
}

void resolve_accounts(ServiceConfig &cfg, const Resolver &resolver)
{
	Lookups lookups(resolver);
	Accounts a;
	a.resolved = true;
	if (auto missing = resolve_credentials(cfg, lookups, a.creds)) {
		a.creds = {};
		a.unknown = missing->why;
	}
	resolve_register(cfg, lookups, a);
	cfg.accounts = std::move(a);
}

void refresh_accounts(ServiceConfig &running, const ServiceConfig &loaded)
{
	if (running.user != loaded.user || running.group != loaded.group || !loaded.accounts.resolved)
		return;
	running.accounts.resolved = true;
	running.accounts.creds = loaded.accounts.creds;
	running.accounts.unknown = loaded.accounts.unknown;
}

} // namespace brokerd::config
