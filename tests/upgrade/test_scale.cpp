// brokerctl scale and signal: the operator's instance count, which later upgrades keep until the
// config file's count changes, and a signal to every instance.
#include "support.hpp"

#include <doctest/doctest.h>

#include <algorithm>

using namespace utest;

namespace {

bool scaled(Broker &b)
{
	json st = b.status();
	const json *svc = service_of(st, "web");
	return svc && svc->value("scaled", false);
}

// A worker that notes each SIGUSR1 in usr1.<its pid> and ignores SIGTERM, so that an instance
// scaled away keeps draining until its drain timeout.
json recording_service(const Broker &b, int instances)
{
	std::string script = "trap 'echo USR1 >> " + shell_quote(b.path("usr1")) + ".$$' USR1; trap '' TERM; " +
	                     "while :; do sleep 1 & wait $!; done";
	json s = service({"/bin/sh", "-c", script}, {"http"}, instances, "exec");
	s["drain"] = {{"timeout", "20s"}};
	return s;
}

} // namespace

TEST_CASE("scale: up and down under load and kept by upgrades and reexec and a crash until the count in the file changes")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json cfg = config_with({{"web", http_service(2)}});
	tb.start(cfg);
	std::uint16_t port = socket_port(b.status(), "http");
	check_serves_alone(b, "web", 1, 2);
	CHECK(!scaled(b));

	// Up: the reply comes once the new instances are ready, each a live process.
	RunResult r = brokerctl_ok(b, {"scale", "web", "4", "--json"});
	json reply = json::parse(r.out);
	CHECK(reply.value("from", 0) == 2);
	CHECK(reply.value("to", 0) == 4);
	json st = b.status();
	std::string why;
	CHECK_MESSAGE(serves_alone(st, "web", 1, 4, why), why);
	CHECK(scaled(b));

	// Down under light load: the three highest drain as Stop drains them, and the reply comes
	// once their processes are gone; no client on them sees a reset.
	std::vector<pid_t> drained;
	for (const char *id : {"web/1/1", "web/1/2", "web/1/3"})
		drained.push_back(instance_pid(st, "web", id));
	pid_t kept = instance_pid(st, "web", "web/1/0");
	Load load(b, port, "hello from web gen ", 100);
	load.begin_upgrade();
	r = brokerctl_ok(b, {"scale", "web", "1"});
	load.end_upgrade();
	CHECK(r.out == "web: scaled from 4 to 1 instances\n");
	for (pid_t pid : drained)
		CHECK_MESSAGE(!process_exists(pid), "drained worker ", pid, " still runs after the reply");
	st = b.status();
	CHECK_MESSAGE(serves_alone(st, "web", 1, 1, why), why);
	CHECK(instance_pid(st, "web", "web/1/0") == kept);
	load.finish_and_check();

	// An upgrade starts the scaled count, not the file's; a reload that leaves the file's count
	// as it was keeps it.
	brokerctl_ok(b, {"upgrade", "web"});
	check_serves_alone(b, "web", 2, 1);
	brokerctl_ok(b, {"reload"});
	CHECK(scaled(b));

	// A re-exec and a crash of brokerd keep it.
	brokerctl_ok(b, {"reexec"});
	CHECK(scaled(b));
	brokerctl_ok(b, {"upgrade", "web"});
	check_serves_alone(b, "web", 3, 1);
	tb.kill9();
	tb.restart();
	CHECK(scaled(b));
	brokerctl_ok(b, {"restart", "web"});
	check_serves_alone(b, "web", 4, 1);
	brokerctl_ok(b, {"upgrade", "web"});
	check_serves_alone(b, "web", 5, 1);

	// A reload that changes the file's count changes nothing that runs; the next upgrade starts
	// the file's.
	cfg["services"]["web"]["instances"] = 3;
	write_config(b, cfg);
	brokerctl_ok(b, {"reload"});
	CHECK(!scaled(b));
	st = b.status();
	CHECK_MESSAGE(serves_alone(st, "web", 5, 1, why), why);
	brokerctl_ok(b, {"upgrade", "web"});
	check_serves_alone(b, "web", 6, 3);
	b.stop();
}

TEST_CASE("scale: refused out of range or during an upgrade or for a stopped or registered service")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json cfg = config_with({{"web", http_service(2)}});
	cfg["services"]["edge"] = {{"sockets", {"http"}}, {"ready", "exec"}, {"register", {{"users", {"root"}}}}};
	tb.start(cfg);

	struct Refused {
		std::vector<std::string> args;
		int exit_code;
		std::string message;
	};
	const Refused out_of_range[] = {
		{{"scale", "web", "0"}, 2, "brokerd refused N of scale: expected a number of instances from 1 to 1024"},
		{{"scale", "web", "1025"}, 2, "brokerd refused N of scale: expected a number of instances from 1 to 1024"},
		{{"scale", "edge", "2"}, 7, "edge is a registered service"},
	};
	for (const Refused &c : out_of_range) {
		RunResult r = brokerctl(b, c.args);
		INFO("brokerctl ", joined(c.args), ": ", r.describe());
		CHECK(r.exit_code == c.exit_code);
		CHECK(r.err.find(c.message) != std::string::npos);
	}

	// An upgrade whose new instance never gets ready is in progress until aborted.
	brokerctl_ok(b, {"upgrade", "web", "--no-wait", "--start-timeout", "60s", "--exec", "--", "/bin/sh", "-c",
	                 "exec sleep 1000"});
	RunResult r = brokerctl(b, {"scale", "web", "3"});
	INFO("brokerctl scale during an upgrade: ", r.describe());
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("an upgrade of web to gen 2 is in progress") != std::string::npos);
	proto::varlink::SyncClient c(b.control_path(), 10s);
	c.send(proto::varlink::make_call("io.brokerd.Control.Scale", {{"service", "web"}, {"instances", 3}}));
	proto::varlink::Message m = c.receive();
	INFO("Scale during an upgrade: ", m.body.dump());
	CHECK(m.body.value("error", "") == "io.brokerd.Control.UpgradeInProgress");
	brokerctl_ok(b, {"abort", "web"});
	check_serves_alone(b, "web", 1, 2);

	brokerctl_ok(b, {"stop", "web"});
	r = brokerctl(b, {"scale", "web", "3"});
	INFO("brokerctl scale of a stopped service: ", r.describe());
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("web is stopped") != std::string::npos);
	// None of the refusals changed the count.
	brokerctl_ok(b, {"start", "web"});
	check_serves_alone(b, "web", 3, 2);
	b.stop();
}

TEST_CASE("signal: every instance gets it and draining ones too; an exit it causes goes under the restart policy")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", recording_service(b, 3)}}));
	check_serves_alone(b, "web", 1, 3);

	// web/1/2 drains, ignoring SIGTERM, for its 20 s.
	RunResult r = brokerctl_ok(b, {"scale", "web", "2", "--no-wait"});
	CHECK(r.out == "web: scaling from 3 to 2 instances\n");
	json st = b.status();
	std::vector<pid_t> pids = running_pids(st, "web");
	REQUIRE(pids.size() == 3);

	r = brokerctl_ok(b, {"signal", "web", "SIGusr1", "--json"});
	json reply = json::parse(r.out);
	CHECK(reply["signalled"] == json::array({"web/1/0", "web/1/1", "web/1/2"}));
	for (pid_t pid : pids) {
		std::string file = b.path("usr1." + std::to_string(pid));
		CHECK_MESSAGE(wait_until([&] { return read_file(file) == "USR1\n"; }, 10s), "worker ", pid,
		              " did not note SIGUSR1");
	}
	// It changed no state.
	std::string why;
	st = b.status();
	for (const json &i : instances(st, "web"))
		CHECK(i.value("state", "") == (i.value("id", "") == "web/1/2" ? "draining" : "ready"));

	const std::string names = "HUP, INT, QUIT, USR1, USR2, TERM, KILL, CONT, STOP, WINCH, TTIN, TTOU";
	for (const char *bad : {"BOGUS", "32", "0", "RTMIN"}) {
		r = brokerctl(b, {"signal", "web", bad});
		INFO("brokerctl signal web ", bad, ": ", r.describe());
		CHECK(r.exit_code == 2);
		CHECK(r.err.find("brokerd refused SIG of signal: expected a signal name (" + names) != std::string::npos);
	}

	// KILL: the serving ones restart under their policy, the draining one is gone.
	r = brokerctl_ok(b, {"signal", "web", "9"});
	CHECK(r.out == "web: 9 sent to 3 instances: web/1/0, web/1/1, web/1/2\n");
	bool restarted = wait_until(
		[&] {
			json now = b.status();
			std::vector<pid_t> running = running_pids(now, "web");
			return serves_alone(now, "web", 1, 2, why) && running.size() == 2 &&
			       std::none_of(running.begin(), running.end(),
			                    [&](pid_t p) { return std::find(pids.begin(), pids.end(), p) != pids.end(); });
		},
		30s);
	CHECK_MESSAGE(restarted, why);
	for (pid_t pid : pids)
		CHECK(!process_exists(pid));
	// Stopping waits out the drain timeout of workers that ignore SIGTERM.
	b.stop(60s);
}

// A scale-up whose new instance never becomes ready: exit 7, said as such, and the count stays,
// as Status shows it.
TEST_CASE("scale: an added instance that fails says so and the count stays")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	// The third slot's worker exits before it is ready; the first two serve.
	json web = service({"/bin/sh", "-c", "case $BROKER_INSTANCE in */2) exit 1;; esac; exec \"$0\"", env("EXAMPLE_HTTP")},
	                   {"http"}, 2, "broker");
	web["restart"] = "no";
	tb.start(config_with({{"web", web}}));
	RunResult r = brokerctl(b, {"scale", "web", "3"});
	INFO("brokerctl scale web 3: ", r.describe());
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("web is scaled, and the count stays, but an instance did not become ready") != std::string::npos);
	json st = b.status();
	const json *svc = service_of(st, "web");
	REQUIRE(svc);
	CHECK(svc->value("instances", 0) == 3);
	CHECK(svc->value("scaled", false));
	b.stop();
}
