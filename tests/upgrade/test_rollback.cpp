// Failed upgrades roll back under load: the new version exits, never gets ready, or is killed mid-upgrade.
#include "support.hpp"

#include <doctest/doctest.h>

#include <sys/stat.h>

#include <regex>
#include <sstream>

using namespace utest;

namespace {

// A failing new version, as brokerctl upgrade's --exec and what its message must name.
struct Failing {
	const char *what;
	std::vector<std::string> exec;
	std::vector<std::string> options; // before --exec
	std::string reason;               // in brokerctl's message
	// The new instance that fails: 0, before any old instance drained, or 1, once the first new
	// one replaced an old one, which the rollback must then start again (the refill).
	int failing_index = 0;
};

// The old generation's instances that became ready during the call: those a rollback restored.
int restored_ready(const std::string &out, int generation)
{
	// "web/1/2 ready (pid 4849)", then the counts when stdout is not a terminal.
	static const std::regex ready(R"(^web/(\d+)/\d+ ready \(pid \d+\)(;.*)?$)");
	int n = 0;
	std::istringstream lines(out);
	std::smatch m;
	for (std::string line; std::getline(lines, line);)
		n += std::regex_match(line, m, ready) && std::stoi(m[1]) == generation;
	return n;
}

// Each case must end in exit 6 with the reason, the failed instance, the old instances it had
// drained started again, the old generation serving alone at full capacity, and no request
// failing. A last, good upgrade shows the service is not stuck.
void rollbacks_under_load(const json &web, int rate, const std::vector<Failing> &cases)
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", web}}));
	const std::size_t count = web["instances"].get<std::size_t>();
	std::uint16_t port = socket_port(b.status(), "http");
	Load load(b, port, "hello from web gen ", rate);

	int generation = 1;
	int failed_gen = generation; // each failed upgrade takes a generation number
	for (const auto &c : cases) {
		failed_gen++;
		INFO("new version: ", std::string(c.what));
		std::vector<std::string> args = {"upgrade", "web"};
		args.insert(args.end(), c.options.begin(), c.options.end());
		args.push_back("--exec");
		args.push_back("--");
		args.insert(args.end(), c.exec.begin(), c.exec.end());
		load.begin_upgrade();
		RunResult r = brokerctl(b, args);
		load.end_upgrade();
		INFO("brokerctl upgrade: ", r.describe());
		CHECK(r.exit_code == 6);
		CHECK(r.err.find("rolled back") != std::string::npos);
		CHECK(r.err.find(c.reason) != std::string::npos);
		// Which instance failed decides the path: a failure of the second one must have gone
		// through the refill of the old instance the first one replaced.
		std::string failed = "web/" + std::to_string(failed_gen) + "/" + std::to_string(c.failing_index);
		CHECK_MESSAGE(r.err.find("failed instance: " + failed + "\n") != std::string::npos, "expected ", failed,
		              " to fail");
		CHECK(restored_ready(r.out, generation) == c.failing_index);
		// The error reply comes once the old generation is back at full capacity.
		json st = b.status("web");
		INFO("Status: ", st.dump());
		std::size_t ready = 0;
		for (const auto &inst : generation_instances(st, "web", generation))
			ready += inst.value("state", "") == "ready";
		CHECK(ready == count);
		// New instances that served keep serving until a restored one replaces each, then drain.
		check_serves_alone(b, "web", generation, count, std::chrono::seconds(10));
		CHECK(generation_answering(port) == generation);
	}

	// Still upgradable: the next generation number follows the failed ones.
	load.begin_upgrade();
	RunResult r = brokerctl(b, {"upgrade", "web"});
	load.end_upgrade();
	INFO("brokerctl upgrade: ", r.describe());
	REQUIRE(r.exit_code == 0);
	generation = newest_generation(b.status("web"), "web");
	CHECK(generation == static_cast<int>(cases.size()) + 2);
	check_serves_alone(b, "web", generation, count);

	load.finish_and_check();
	b.stop();
}

// Runs the real worker the first time only: the first new instance replaces an old one, the
// second fails, so the rollback must bring a drained old instance back.
std::vector<std::string> works_once(const std::string &marker, const std::string &worker, const std::string &then)
{
	return {"/bin/sh", "-c",
	        "if mkdir " + shell_quote(marker) + " 2>/dev/null; then exec " + worker + "; fi; " + then};
}

} // namespace

TEST_CASE("rollback: client-lib worker whose new version fails")
{
	TempDir scratch;
	std::string http = shell_quote(env("EXAMPLE_HTTP"));
	rollbacks_under_load(http_service(2), 0, {
		{"/bin/false", {"/bin/false"}, {}, "exited with status 1"},
		{"a missing program", {scratch / "no-such-program"}, {}, "exec " + (scratch / "no-such-program") + ": No such file or directory"},
		{"a shell that prints and exits 3", {"/bin/sh", "-c", "echo 'cannot open database' >&2; exit 3"}, {},
		 "cannot open database"},
		{"second new instance exits 4", works_once(scratch / "once", http, "exit 4"), {}, "exited with status 4", 1},
	});
}

TEST_CASE("rollback: notify worker whose new version never gets ready")
{
	TempDir scratch;
	std::string python = "python3 " + shell_quote(env("EXAMPLE_PYTHON"));
	rollbacks_under_load(python_service(2), 1000, {
		{"never sends READY=1", {"sleep", "1000"}, {"--start-timeout", "1s"}, "start timeout"},
		{"exits at once", {"/bin/sh", "-c", "exit 1"}, {}, "exited with status 1"},
		// The start timeout is the first new instance's too: generous, so that a slow Python
		// start does not fail it first (which the checks above would report).
		{"second new instance never ready", works_once(scratch / "once", python, "exec sleep 1000"),
		 {"--start-timeout", "5s"}, "start timeout", 1},
	});
}

// kill -9 of a new instance mid-upgrade: the second new instance is held before it execs the
// worker (on a FIFO nobody writes), so it has accepted no connection when it dies; the first
// one already replaced an old instance, so the rollback must restore it and drain the new one.
// The held instance leaves a process in its session (a sleep in the background), which brokerd
// takes with it.
TEST_CASE("rollback: kill -9 of a new instance mid-upgrade")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(2)}}));
	std::uint16_t port = socket_port(b.status(), "http");
	std::string fifo = b.path("hold");
	REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
	std::string http = shell_quote(env("EXAMPLE_HTTP"));
	std::vector<std::string> exec =
		works_once(b.path("once"), http, "sleep 1000 & read line < " + shell_quote(fifo) + "; exec " + http);

	Load load(b, port, "hello from web gen ");
	load.begin_upgrade();
	StreamCall up(b.control_path(), "io.brokerd.Control.Upgrade", {{"service", "web"}, {"exec", exec}});
	auto started = up.until(
		[](const StreamCall::Reply &r) {
			const json &p = member(r.parameters, "progress");
			return p.value("event", "") == "started" && p.value("instance", "") == "web/2/1";
		},
		kRolloutDeadline);
	INFO("progress: ", up.transcript());
	REQUIRE(started.has_value());
	pid_t victim = started->parameters["progress"].value("pid", 0);
	REQUIRE(victim > 0);
	pid_t sleeper = 0;
	REQUIRE(wait_until(
		[&] {
			for (pid_t p : session_members(victim))
				if (proc_cmdline(p) == std::vector<std::string>{"sleep", "1000"})
					sleeper = p;
			return sleeper > 0;
		},
		20s));
	UniqueFd victim_fd = pidfd_of(victim);
	UniqueFd left_fd = pidfd_of(sleeper);
	REQUIRE(victim_fd);
	REQUIRE(left_fd);
	REQUIRE(kill9(victim));

	StreamCall::Reply end = final_reply(up);
	load.end_upgrade();
	CHECK(end.error == "io.brokerd.Control.UpgradeFailed");
	CHECK(end.parameters.value("instance", "") == "web/2/1");
	CHECK(end.parameters.value("generation", 0) == 2);
	CHECK(end.parameters.value("reason", "").find("SIGKILL") != std::string::npos);
	// On the way: the rollback, and a restored old instance that became ready.
	bool rollback = false, restored = false;
	for (const auto &r : up.seen()) {
		const json &p = member(r.parameters, "progress");
		rollback = rollback || p.value("event", "") == "rollback";
		restored = restored || (p.value("event", "") == "ready" && p.value("instance", "").rfind("web/1/", 0) == 0);
	}
	CHECK(rollback);
	CHECK(restored);
	check_serves_alone(b, "web", 1, 2);
	// brokerd reaped the instance it judged, and the rest of its session went with it, seen
	// before anything of the harness kills.
	CHECK(reaped(victim_fd.get()));
	CHECK(exits_within(left_fd.get(), 10s));
	CHECK(generation_answering(port) == 1);

	load.finish_and_check();
	b.stop();
}
