// What a new config changes against the one in force (see diff.hpp).
#include "config/diff.hpp"

#include <cstdio>
#include <cstring>
#include <string_view>

namespace brokerd::config {
namespace {

// The duration exactly, in the config's grammar: "30s", "1m30s", "1500ms" as "1s500ms".
std::string duration_text(Duration d)
{
	if (d.count() <= 0)
		return "0s";
	struct Unit {
		const char *name;
		long long ms;
	};
	constexpr Unit units[] = {{"d", 86'400'000}, {"h", 3'600'000}, {"m", 60'000}, {"s", 1000}, {"ms", 1}};
	long long left = d.count();
	std::string out;
	for (const Unit &u : units)
		if (left >= u.ms) {
			out += std::to_string(left / u.ms) + u.name;
			left %= u.ms;
		}
	return out;
}

std::string mode_text(mode_t mode)
{
	char out[8];
	std::snprintf(out, sizeof(out), "%04o", static_cast<unsigned>(mode & 07777));
	return out;
}

std::string signal_text(int sig)
{
	const char *abbrev = sigabbrev_np(sig);
	return abbrev ? std::string("SIG") + abbrev : std::to_string(sig);
}

// A list as the config writes it, in JSON: ["a","b"]. An empty one is [].
std::string list_text(const std::vector<std::string> &items)
{
	std::string out = "[";
	for (const auto &item : items)
		out += (out.size() > 1 ? "," : "") + ("\"" + item + "\"");
	return out + "]";
}

const char *journal_text(JournalMode mode)
{
	switch (mode) {
	case JournalMode::Always:
		return "always";
	case JournalMode::Never:
		return "never";
	case JournalMode::Auto:
		break;
	}
	return "auto";
}

// "FOO added, BAR changed, BAZ removed", in name order within each; empty when nothing changed.
std::string env_text(const std::map<std::string, std::string> &old, const std::map<std::string, std::string> &next)
{
	const std::vector<EnvChange> changes = env_changes(old, next);
	std::string out;
	for (EnvChange::Kind kind : {EnvChange::Kind::Added, EnvChange::Kind::Changed, EnvChange::Kind::Removed}) {
		std::string names;
		for (const EnvChange &c : changes)
			if (c.kind == kind)
				names += (names.empty() ? "" : ", ") + c.name;
		if (!names.empty())
			out += (out.empty() ? "" : ", ") + names + " " + EnvChange::name_of(kind);
	}
	return out;
}

// Collects the changes of one service (or of brokerd's settings, with an empty service).
class Changes {
public:
	Changes(std::vector<Change> &out, std::string service) : out_(out), service_(std::move(service)) {}

	void text(const char *key, const std::string &from, const std::string &to, Effect when = Effect::NextUpgrade)
	{
		if (from != to)
			out_.push_back({service_, key, from, to, when});
	}
	void number(const char *key, unsigned from, unsigned to, Effect when = Effect::NextUpgrade)
	{
		text(key, std::to_string(from), std::to_string(to), when);
	}
	void duration(const char *key, Duration from, Duration to, Effect when = Effect::NextUpgrade)
	{
		text(key, duration_text(from), duration_text(to), when);
	}
	void list(const char *key, const std::vector<std::string> &from, const std::vector<std::string> &to,
	          Effect when = Effect::NextUpgrade)
	{
		text(key, list_text(from), list_text(to), when);
	}

private:
	std::vector<Change> &out_;
	std::string service_;
};

} // namespace

std::vector<EnvChange> env_changes(const std::map<std::string, std::string> &before,
                                   const std::map<std::string, std::string> &after)
{
	std::vector<EnvChange> out;
	auto b = before.begin(), a = after.begin();
	while (b != before.end() || a != after.end()) {
		if (a == after.end() || (b != before.end() && b->first < a->first)) {
			out.push_back({b->first, EnvChange::Kind::Removed});
			++b;
		} else if (b == before.end() || a->first < b->first) {
			out.push_back({a->first, EnvChange::Kind::Added});
			++a;
		} else {
			if (a->second != b->second)
				out.push_back({a->first, EnvChange::Kind::Changed});
			++a, ++b;
		}
	}
	return out;
}

std::vector<Change> diff_service(const ServiceConfig &old, const ServiceConfig &next)
{
	std::vector<Change> out;
	Changes c(out, next.name);
	c.list("exec", old.exec, next.exec);
	c.number("instances", old.instances, next.instances);
	c.text("version", old.version, next.version);
	c.text("ready", ready_name(old.ready), ready_name(next.ready));
	c.duration("start_timeout", old.start_timeout, next.start_timeout);
	c.duration("drain.timeout", old.drain_timeout, next.drain_timeout);
	c.text("drain.signal", signal_text(old.drain_signal), signal_text(next.drain_signal));
	c.number("upgrade.batch", old.upgrade_batch, next.upgrade_batch);
	c.text("restart", restart_name(old.restart), restart_name(next.restart));
	// A generation's workers learn it in Hello.
	c.text("handoff", handoff_name(old.handoff), handoff_name(next.handoff));
	c.text("user", old.user, next.user);
	c.text("group", old.group, next.group);
	c.text("cwd", old.cwd, next.cwd);
	if (std::string env = env_text(old.env, next.env); !env.empty())
		out.push_back({next.name, "env", "", env, Effect::NextUpgrade});
	// A registration is judged by the service's settings as they are now.
	c.list("register.users", old.register_users, next.register_users, Effect::Now);
	c.list("register.groups", old.register_groups, next.register_groups, Effect::Now);
	return out;
}

std::vector<Change> diff(const Config &old, const Config &next)
{
	std::vector<Change> out;
	// What a reload applies to brokerd itself at once: who may call, the stop budget, the journal.
	Changes c(out, "");
	c.list("control.admin_users", old.control.admin_users, next.control.admin_users, Effect::Now);
	c.list("control.admin_groups", old.control.admin_groups, next.control.admin_groups, Effect::Now);
	c.list("control.read_users", old.control.read_users, next.control.read_users, Effect::Now);
	c.list("control.read_groups", old.control.read_groups, next.control.read_groups, Effect::Now);
	c.duration("shutdown.timeout", old.shutdown.timeout, next.shutdown.timeout, Effect::Now);
	c.text("logging.journal", journal_text(old.logging.journal), journal_text(next.logging.journal), Effect::Now);
	// What only a new control socket takes: a reexec carries the one bound at the start over.
	c.text("control.path", old.control.path, next.control.path, Effect::NextStart);
	c.text("control.mode", mode_text(old.control.mode), mode_text(next.control.mode), Effect::NextStart);
	c.number("control.max_connections", old.control.max_connections, next.control.max_connections, Effect::NextStart);
	c.number("control.max_connections_per_user", old.control.max_connections_per_user,
	         next.control.max_connections_per_user, Effect::NextStart);
	c.number("control.reserved_connections", old.control.reserved_connections, next.control.reserved_connections,
	         Effect::NextStart);
	// The metrics endpoint is bound at a start or a reexec; an added or removed one is its listen.
	const MetricsConfig none;
	const MetricsConfig &was = old.metrics ? *old.metrics : none, &now = next.metrics ? *next.metrics : none;
	c.text("metrics.listen", old.metrics ? was.socket.listen : "", next.metrics ? now.socket.listen : "",
	       Effect::NextReexec);
	if (old.metrics && next.metrics) {
		c.text("metrics.mode", was.socket.mode ? mode_text(*was.socket.mode) : "",
		       now.socket.mode ? mode_text(*now.socket.mode) : "", Effect::NextReexec);
		c.number("metrics.max_connections", was.max_connections, now.max_connections, Effect::NextReexec);
	}
	for (const auto &svc : next.services)
		if (const ServiceConfig *was = old.find_service(svc.name)) {
			auto changes = diff_service(*was, svc);
			out.insert(out.end(), changes.begin(), changes.end());
		}
	return out;
}

} // namespace brokerd::config
