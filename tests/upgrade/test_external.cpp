// Registered workers of an external service: each new version takes over under load; strangers are denied.
#include "support.hpp"
#include "../skip.hpp"

#include <doctest/doctest.h>

#include <pwd.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace utest;

namespace {

// Exit codes of the child that says Hello as nobody.
enum : int { kDeniedNoFd = 10, kAllowed = 11, kOtherError = 12 };

int hello_as_nobody(const std::string &control)
{
	proto::varlink::SyncClient c(control, 5s);
	c.send(proto::varlink::make_call("io.brokerd.Worker.Hello",
	                                  {{"service", "ext"}, {"version", "intruder"}, {"want_fds", true}}));
	proto::varlink::Message m = c.receive();
	std::fprintf(stderr, "Hello as uid %d: %s, %zu fds\n", static_cast<int>(::getuid()), m.body.dump().c_str(),
	             m.fds.size());
	if (m.body.value("error", "") == "org.varlink.service.PermissionDenied")
		return m.fds.empty() ? kDeniedNoFd : kOtherError;
	return m.body.contains("error") ? kOtherError : kAllowed;
}

std::string user_name()
{
	passwd *pw = ::getpwuid(::geteuid());
	REQUIRE(pw);
	return pw->pw_name;
}

// broker-example-http started by the test, registering as version `version` of "ext".
Process start_worker(const Broker &b, const std::string &version, std::string log = {})
{
	if (log.empty())
		log = "worker-" + version + ".log";
	SpawnOptions so;
	so.env = {"BROKER_SOCKET=" + b.control_path(), "BROKER_SERVICE=ext", "BROKER_VERSION=" + version};
	so.unset_env = {"BROKER_TOKEN", "BROKER_INSTANCE", "BROKER_GENERATION", "LISTEN_FDS", "LISTEN_PID"};
	so.stderr_path = b.path(log);
	return Process::spawn({env("EXAMPLE_HTTP")}, so);
}

// The one instance of "ext" once `pid` alone serves it, ready, with no takeover in progress.
std::optional<json> serving_alone(Broker &b, pid_t pid)
{
	json st = b.status("ext");
	const json *svc = service_of(st, "ext");
	if (!svc || (svc->contains("upgrade") && !(*svc)["upgrade"].is_null()))
		return std::nullopt;
	std::optional<json> found;
	for (const auto &g : member(*svc, "generations"))
		for (const auto &i : member(g, "instances")) {
			if (i.value("pid", 0) == 0)
				continue;
			if (i.value("pid", 0) != pid || i.value("state", "") != "ready")
				return std::nullopt;
			found = json{{"generation", g.value("number", 0)}, {"version", g.value("version", "")}, {"instance", i}};
		}
	return found;
}

// The pids of the ready workers of `version` of "ext".
std::set<pid_t> ready_pids(Broker &b, const std::string &version)
{
	std::set<pid_t> out;
	json st = b.status("ext");
	const json *svc = service_of(st, "ext");
	for (const auto &g : svc ? member(*svc, "generations") : json::array())
		if (g.value("version", "") == version)
			for (const auto &i : member(g, "instances"))
				if (i.value("state", "") == "ready")
					out.insert(i.value("pid", 0));
	return out;
}

// The generation number of `version` of "ext" (0 when none).
int generation_of(Broker &b, const std::string &version)
{
	json st = b.status("ext");
	const json *svc = service_of(st, "ext");
	for (const auto &g : svc ? member(*svc, "generations") : json::array())
		if (g.value("version", "") == version)
			return g.value("number", 0);
	return 0;
}

// Whether brokerd counts no running worker of "ext".
bool no_worker_left(Broker &b)
{
	for (pid_t p : worker_pids(b.status("ext"), "ext"))
		if (p != 0)
			return false;
	return true;
}

} // namespace

TEST_CASE("external: five versions of a registered worker take over in turn under load")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json ext = {{"sockets", {"http"}}, {"instances", 1}, {"ready", "broker"},
	            {"drain", {{"timeout", "20s"}}}, {"register", {{"users", {user_name()}}}}};
	tb.start(config_with({{"ext", ext}}));
	std::uint16_t port = socket_port(b.status(), "http");

	Process current = start_worker(b, "v1");
	std::optional<json> serving;
	REQUIRE_MESSAGE(wait_until([&] { return (serving = serving_alone(b, current.pid())).has_value(); }, 20s),
	                "v1 did not register and get ready: ", read_file(b.path("worker-v1.log")));
	CHECK((*serving)["version"] == "v1");
	int first_generation = (*serving)["generation"].get<int>();
	CHECK(generation_answering(port) == first_generation);

	Load load(b, port, "hello from ext gen ");
	for (int v = 2; v <= 5; ++v) {
		std::string version = "v" + std::to_string(v);
		CAPTURE(version);
		load.begin_upgrade();
		Process next = start_worker(b, version);
		// The older process drains and exits by itself once the new one is ready.
		auto st = current.wait(kRolloutDeadline);
		load.end_upgrade();
		INFO("older worker's log: ", read_file(b.path("worker-v" + std::to_string(v - 1) + ".log")));
		INFO("new worker's log: ", read_file(b.path("worker-" + version + ".log")));
		REQUIRE_MESSAGE(st.has_value(), "the older worker did not exit");
		CHECK(describe_status(*st) == "exited with 0");
		REQUIRE(wait_until([&] { return (serving = serving_alone(b, next.pid())).has_value(); }, 20s));
		CHECK((*serving)["version"] == version);
		CHECK((*serving)["generation"].get<int>() == first_generation + v - 1);
		CHECK(generation_answering(port) == first_generation + v - 1);
		current = std::move(next);
	}
	std::set<int> seen = load.finish_and_check();
	for (int g = first_generation; g < first_generation + 5; ++g)
		CHECK(seen.count(g) == 1);

	// A peer the register rule does not name: PermissionDenied, no fd, and nothing changes.
	if (::geteuid() != 0) {
		record_skip("the Hello of a peer the register rule does not name: needs root to run it as nobody");
	} else {
		SpawnOptions so;
		so.as_nobody = true;
		so.stderr_path = b.path("nobody.log");
		Process p = Process::fork_run([&] { return hello_as_nobody(b.control_path()); }, so);
		auto st = p.wait(20s);
		INFO("as nobody: ", read_file(b.path("nobody.log")));
		REQUIRE(st.has_value());
		CHECK(describe_status(*st) == "exited with " + std::to_string(kDeniedNoFd));
		CHECK(serving_alone(b, current.pid()).has_value());
		CHECK(b.log().find("denied") != std::string::npos);
	}

	// Its owner stops the last version (SIGTERM drains it); brokerd lets the service go empty.
	// (brokerd counts a registered worker as gone when its connection closes, which can come a
	// moment before the process is: so the worker is not left for brokerd's shutdown to drain.)
	current.signal(SIGTERM);
	auto st = current.wait(20s);
	REQUIRE(st.has_value());
	CHECK(describe_status(*st) == "exited with 0");
	CHECK(wait_until([&] { return no_worker_left(b); }, 20s));
	b.stop();
}

TEST_CASE("external: a takeover whose other instances never register fails at the start timeout")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json ext = {{"sockets", {"http"}}, {"instances", 2}, {"ready", "broker"}, {"start_timeout", "1s"},
	            {"drain", {{"timeout", "20s"}}}, {"register", {{"users", {user_name()}}}}};
	tb.start(config_with({{"ext", ext}}));
	std::uint16_t port = socket_port(b.status(), "http");

	// Two workers of v1 serve; one of v2 registers and is ready, the second of v2 never comes.
	Process a = start_worker(b, "v1");
	Process b1 = start_worker(b, "v1", "worker-v1-b.log");
	REQUIRE_MESSAGE(wait_until([&] { return ready_pids(b, "v1") == std::set<pid_t>{a.pid(), b1.pid()}; }, 20s),
	                "v1 did not get two ready instances: ", b.status("ext").dump());
	int first_generation = generation_answering(port);

	Process c = start_worker(b, "v2");
	// v2's one instance takes over half: an old worker drains and exits by itself. Then the
	// takeover waits for a second v2 registration that never comes.
	auto old_exit = [&]() -> Process * {
		for (Process *p : {&a, &b1})
			if (!process_exists(p->pid()))
				return p;
		return nullptr;
	};
	REQUIRE_MESSAGE(wait_until([&] { return old_exit() != nullptr; }, kRolloutDeadline),
	                "no v1 worker drained behind the ready v2 worker");
	Process *survivor = old_exit() == &a ? &b1 : &a;

	// At the start timeout the takeover fails: the v2 worker drains and exits, the v1 worker left
	// serves alone, and the service is free for the next version.
	auto st = c.wait(kRolloutDeadline);
	INFO("v2 worker's log: ", read_file(b.path("worker-v2.log")));
	REQUIRE_MESSAGE(st.has_value(), "the v2 worker was not drained when its takeover failed");
	CHECK(describe_status(*st) == "exited with 0");
	CHECK(b.log().find("1 of 2 instance(s) of version \"v2\" registered, none more within the start timeout (1000ms)") !=
	      std::string::npos);
	std::optional<json> serving;
	REQUIRE(wait_until([&] { return (serving = serving_alone(b, survivor->pid())).has_value(); }, 20s));
	CHECK((*serving)["version"] == "v1");
	CHECK(generation_answering(port) == first_generation);

	Process d = start_worker(b, "v3");
	CHECK_MESSAGE(wait_until([&] { return ready_pids(b, "v3") == std::set<pid_t>{d.pid()}; }, 20s),
	              "a later version could not register: ", read_file(b.path("worker-v3.log")));

	// Their owner stops them (as in the test above: not left for brokerd's shutdown to drain).
	for (Process *p : {survivor, &d}) {
		p->signal(SIGTERM);
		auto s = p->wait(20s);
		REQUIRE(s.has_value());
	}
	CHECK(wait_until([&] { return no_worker_left(b); }, 20s));
	b.stop();
}

TEST_CASE("external: an old worker that exits on its own during a takeover is not waited for")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json ext = {{"sockets", {"http"}}, {"instances", 2}, {"ready", "broker"}, {"upgrade", {{"batch", 1}}},
	            {"drain", {{"timeout", "20s"}}}, {"register", {{"users", {user_name()}}}}};
	tb.start(config_with({{"ext", ext}}));
	std::uint16_t port = socket_port(b.status(), "http");
	Process a = start_worker(b, "v1");
	Process a2 = start_worker(b, "v1", "worker-v1-b.log");
	REQUIRE(wait_until([&] { return ready_pids(b, "v1") == std::set<pid_t>{a.pid(), a2.pid()}; }, 20s));

	// v2's first worker takes over one slot: one v1 worker drains and exits; the other then dies
	// on its own, never drained.
	Process c = start_worker(b, "v2");
	Process *drained = nullptr;
	REQUIRE_MESSAGE(wait_until(
				[&] {
					for (Process *p : {&a, &a2})
						if (!process_exists(p->pid()))
							drained = p;
					return drained != nullptr;
				},
				kRolloutDeadline),
	                "no v1 worker drained behind the ready v2 worker");
	Process &lost = drained == &a ? a2 : a;
	lost.signal(SIGKILL);
	REQUIRE(lost.wait(20s).has_value());

	// v2's second worker completes the takeover: nothing old is left to wait for.
	Process d = start_worker(b, "v2", "worker-v2-b.log");
	bool done = wait_until(
		[&] {
			json st = b.status("ext");
			const json *svc = service_of(st, "ext");
			return svc && (!svc->contains("upgrade") || (*svc)["upgrade"].is_null()) &&
			       ready_pids(b, "v2") == std::set<pid_t>{c.pid(), d.pid()};
		},
		20s);
	INFO("status: ", b.status("ext").dump());
	CHECK_MESSAGE(done, "the takeover did not finish once both v2 workers were ready");
	CHECK(generation_answering(port) == generation_of(b, "v2"));

	for (Process *p : {&c, &d}) {
		p->signal(SIGTERM);
		REQUIRE(p->wait(20s).has_value());
	}
	CHECK(wait_until([&] { return no_worker_left(b); }, 20s));
	b.stop();
}
