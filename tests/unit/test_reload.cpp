// Reload's plan as a table: the running state and a new config in, the changes or the refusal
// (with the exact message brokerctl reload shows) out.
#include "daemon/reload.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <variant>
#include <vector>

using namespace brokerd;
using json = nlohmann::json;
using Names = std::vector<std::string>;

namespace {

// Running: the sockets http and api, the spawned service web on http, and the registered
// service edge on http.
json base()
{
	return {{"sockets", {{"http", {{"listen", "tcp://127.0.0.1:8080"}}}, {"api", {{"listen", "unix:/run/api.sock"}}}}},
	        {"services",
	         {{"web", {{"exec", {"/bin/web"}}, {"sockets", {"http"}}}},
	          {"edge", {{"sockets", {"http"}}, {"register", {{"users", {"root"}}}}}}}}};
}

RunningService web() { return {"web", false, {"http"}, false}; }
RunningService edge() { return {"edge", false, {"http"}, true}; }

struct Case {
	const char *name;
	json old_config;
	Names listeners;
	std::vector<RunningService> services;
	json next;
	std::string refusal; // empty: the plan below
	ReloadPlan plan;
};

template <typename F>
json edited(F &&edit)
{
	json j = base();
	edit(j);
	return j;
}

std::vector<Case> cases()
{
	const Names open = {"api", "http"};
	const std::vector<RunningService> running = {edge(), web()};
	const Names kept = {"edge", "web"};
	return {
		{"nothing changed: the kept services take their settings, nothing else", base(), open, running, base(), "",
		 {.update_services = kept}},
		{"a kept service's new settings are an update", base(), open, running,
		 edited([](json &j) { j["services"]["web"]["instances"] = 3; }), "", {.update_services = kept}},
		{"a new socket is opened and a new service on it added", base(), open, running,
		 edited([](json &j) {
			 j["sockets"]["admin"] = {{"listen", "tcp://127.0.0.1:9090"}};
			 j["services"]["web2"] = {{"exec", {"/bin/web"}}, {"sockets", {"admin"}}};
		 }),
		 "", {.open_sockets = {"admin"}, .add_services = {"web2"}, .update_services = kept}},
		{"a removed service drains and a removed socket is reported", base(), open, running,
		 edited([](json &j) {
			 j["services"].erase("edge");
			 j["sockets"].erase("api");
		 }),
		 "", {.update_services = {"web"}, .remove_services = {"edge"}, .removed_sockets = {"api"}}},
		{"a socket removed earlier, still open for a draining service, is bound again when added back",
		 edited([](json &j) { j["sockets"].erase("api"); }), open, running, base(), "",
		 {.open_sockets = {"api"}, .update_services = kept}},
		{"a configured socket with no listener is opened", base(), {"http"}, running, base(), "",
		 {.open_sockets = {"api"}, .update_services = kept}},
		{"refused: a service still draining since its removal",
		 base(), open, {edge(), web(), {"web2", true, {"http"}, false}},
		 edited([](json &j) { j["services"]["web2"] = {{"exec", {"/bin/web"}}, {"sockets", {"http"}}}; }),
		 "services.web2: still draining since a reload removed it; reload again once it is gone", {}},
		{"refused: a running service's sockets", base(), open, running,
		 edited([](json &j) { j["services"]["web"]["sockets"] = {"http", "api"}; }),
		 "services.web.sockets: a running service's sockets cannot change; add the service under another name, or "
		 "remove it first",
		 {}},
		{"refused: a spawned service becoming a registered one", base(), open, running,
		 edited([](json &j) {
			 j["services"]["web"].erase("exec");
			 j["services"]["web"]["register"] = {{"users", {"root"}}};
		 }),
		 "services.web.exec: a running service cannot switch between workers brokerd starts and registered ones; "
		 "add the service under another name, or remove it first",
		 {}},
		{"refused: a registered service becoming a spawned one", base(), open, running,
		 edited([](json &j) {
			 j["services"]["edge"].erase("register");
			 j["services"]["edge"]["exec"] = {"/bin/edge"};
		 }),
		 "services.edge.exec: a running service cannot switch between workers brokerd starts and registered ones; "
		 "add the service under another name, or remove it first",
		 {}},
		{"refused: an open socket's address", base(), open, running,
		 edited([](json &j) { j["sockets"]["http"]["listen"] = "tcp://127.0.0.1:8081"; }),
		 "sockets.http: changed address; a listener is never re-bound, add the new one under another name", {}},
		{"refused: a service's problem comes before a socket's", base(), open, running,
		 edited([](json &j) {
			 j["sockets"]["http"]["listen"] = "tcp://127.0.0.1:8081";
			 j["services"]["web"]["sockets"] = {"http", "api"};
		 }),
		 "services.web.sockets: a running service's sockets cannot change; add the service under another name, or "
		 "remove it first",
		 {}},
	};
}

std::string list(const Names &names)
{
	std::string out = "[";
	for (const auto &n : names)
		out += (out.size() > 1 ? " " : "") + n;
	return out + "]";
}

std::string outcome(const std::variant<ReloadPlan, ReloadRefusal> &got)
{
	if (auto *refused = std::get_if<ReloadRefusal>(&got))
		return "refused: " + refused->message;
	const ReloadPlan &p = std::get<ReloadPlan>(got);
	return "open " + list(p.open_sockets) + ", add " + list(p.add_services) + ", update " + list(p.update_services) +
	       ", remove " + list(p.remove_services) + ", removed sockets " + list(p.removed_sockets);
}

} // namespace

TEST_CASE("reload: a plan for each kind of change and refuses what a running service cannot take")
{
	for (const Case &c : cases()) {
		INFO(std::string(c.name));
		config::Config old = config::parse(c.old_config.dump());
		config::Config next = config::parse(c.next.dump());
		auto got = plan_reload(RunningState{old, c.listeners, c.services}, next);
		CHECK(outcome(got) == (c.refusal.empty() ? outcome(c.plan) : "refused: " + c.refusal));
	}
}

TEST_CASE("reload: a running service's invariants, one rule for reload and the Upgrade call")
{
	const struct {
		const char *name;
		RunningService running;
		Names sockets;
		bool registered;
		RunningChange change;
	} cases[] = {
		{"the same sockets and kind", web(), {"http"}, false, RunningChange::None},
		{"draining since its removal, even unchanged", {"web", true, {"http"}, false}, {"http"}, false,
		 RunningChange::Draining},
		{"another socket added", web(), {"http", "api"}, false, RunningChange::Sockets},
		{"the same sockets in another order", {"web", false, {"http", "api"}, false}, {"api", "http"}, false,
		 RunningChange::Sockets},
		{"spawned to registered", web(), {"http"}, true, RunningChange::ExecKind},
		{"registered to spawned", edge(), {"http"}, false, RunningChange::ExecKind},
		{"sockets are judged before the kind", web(), {"api"}, true, RunningChange::Sockets},
	};
	for (const auto &c : cases) {
		INFO(std::string(c.name));
		CHECK(running_change(c.running, c.sockets, c.registered) == c.change);
	}
}

TEST_CASE("reload: the changed settings, each with when it takes effect, and never an env value")
{
	using config::Change;
	constexpr auto now = config::Effect::Now, next_upgrade = config::Effect::NextUpgrade;
	constexpr auto next_start = config::Effect::NextStart, next_reexec = config::Effect::NextReexec;
	const std::string control_path = config::parse(base().dump()).control.path; // the build's default
	const json spawned = {{"exec", {"/bin/web"}}, {"sockets", {"http"}}, {"env", {{"TOKEN", "a"}, {"OLD", "x"}}}};
	const struct {
		const char *name;
		std::function<void(json &)> edit;
		std::vector<Change> changes;
	} cases[] = {
		{"nothing changed", [](json &) {}, {}},
		{"instances", [](json &j) { j["services"]["web"]["instances"] = 3; },
		 {{"web", "instances", "1", "3", next_upgrade}}},
		{"exec and version, in the entry's order",
		 [](json &j) {
			 j["services"]["web"]["version"] = "2";
			 j["services"]["web"]["exec"] = {"/bin/web", "--fast"};
		 },
		 {{"web", "exec", R"(["/bin/web"])", R"(["/bin/web","--fast"])", next_upgrade},
		  {"web", "version", "", "2", next_upgrade}}},
		{"timeouts in the config's grammar, the drain signal by name, batch and restart",
		 [](json &j) {
			 j["services"]["web"]["start_timeout"] = "1m30s";
			 j["services"]["web"]["drain"] = {{"timeout", "1500ms"}, {"signal", "SIGINT"}};
			 j["services"]["web"]["upgrade"] = {{"batch", 2}};
			 j["services"]["web"]["restart"] = "always";
		 },
		 {{"web", "start_timeout", "30s", "1m30s", next_upgrade},
		  {"web", "drain.timeout", "30s", "1s500ms", next_upgrade},
		  {"web", "drain.signal", "SIGTERM", "SIGINT", next_upgrade},
		  {"web", "upgrade.batch", "1", "2", next_upgrade},
		  {"web", "restart", "on-failure", "always", next_upgrade}}},
		{"env names what changed, never a value",
		 [](json &j) {
			 j["services"]["web"]["env"] = {{"TOKEN", "b"}, {"NEW", "y"}};
		 },
		 {{"web", "env", "", "NEW added, TOKEN changed, OLD removed", next_upgrade}}},
		{"who may register applies now",
		 [](json &j) { j["services"]["edge"]["register"]["users"] = {"root", "nobody"}; },
		 {{"edge", "register.users", R"(["root"])", R"(["root","nobody"])", now}}},
		{"brokerd's own settings apply now, before the services'",
		 [](json &j) {
			 j["shutdown"] = {{"timeout", "30s"}};
			 j["control"] = {{"admin_users", {"root"}}};
			 j["services"]["web"]["instances"] = 2;
		 },
		 {{"", "control.admin_users", "[]", R"(["root"])", now},
		  {"", "shutdown.timeout", "1m30s", "30s", now},
		  {"web", "instances", "1", "2", next_upgrade}}},
		{"the control socket's own settings wait for brokerd's next start",
		 [](json &j) {
			 j["control"] = {{"path", "/run/other.sock"}, {"mode", "0660"}, {"max_connections", 64},
			                 {"reserved_connections", 4}, {"max_connections_per_user", 8}};
		 },
		 {{"", "control.path", control_path, "/run/other.sock", next_start},
		  {"", "control.mode", "0666", "0660", next_start},
		  {"", "control.max_connections", "512", "64", next_start},
		  {"", "control.max_connections_per_user", "128", "8", next_start},
		  {"", "control.reserved_connections", "16", "4", next_start}}},
		{"an added metrics endpoint waits for a reexec or the next start",
		 [](json &j) { j["metrics"] = {{"listen", "tcp://127.0.0.1:9469"}}; },
		 {{"", "metrics.listen", "", "tcp://127.0.0.1:9469", next_reexec}}},
		{"an added or removed service is no change of settings",
		 [](json &j) {
			 j["services"].erase("edge");
			 j["services"]["web2"] = {{"exec", {"/bin/web"}}, {"sockets", {"http"}}};
		 },
		 {}},
	};
	for (const auto &c : cases) {
		INFO(std::string(c.name));
		json old_json = base();
		old_json["services"]["web"] = spawned;
		json next_json = old_json;
		c.edit(next_json);
		config::Config old = config::parse(old_json.dump());
		config::Config next = config::parse(next_json.dump());
		CHECK(config::diff(old, next) == c.changes);
		auto got = plan_reload(RunningState{old, {"api", "http"}, {edge(), web()}}, next);
		REQUIRE(std::holds_alternative<ReloadPlan>(got));
		CHECK(std::get<ReloadPlan>(got).changes == c.changes);
	}
}

TEST_CASE("reload: the summary the reload event carries")
{
	CHECK(reload_summary({}) == "nothing changed");
	ReloadPlan p{.open_sockets = {"api"}, .add_services = {"web2", "web3"}, .removed_sockets = {"old"}};
	p.changes.push_back({"web", "instances", "1", "2", config::Effect::NextUpgrade});
	CHECK(reload_summary(p) == "added sockets api; added services web2, web3; removed sockets old; 1 setting(s) changed");
}
