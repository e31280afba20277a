// Reload's plan as a table: the running state and a new config in, the changes or the refusal
// (with the exact message brokerctl reload shows) out.
#include "daemon/reload.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

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
