// Draining old instances: one killed mid-drain, ones that ignore the drain, and the drain deadline's source.
#include "support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <map>
#include <regex>
#include <sstream>

using namespace utest;

namespace {

// broker-example-python, but slow to drain: it keeps idle keep-alive connections open while
// draining (instead of closing them after a short grace), and says in STATUS= how many it still
// holds, so that the test knows when the only one left is its own.
std::string slow_drainer(const Broker &b)
{
	std::string path = b.path("slow_drainer.py");
	write_file(path, R"(import importlib.util, sys
spec = importlib.util.spec_from_file_location("python_worker", )" + json(env("EXAMPLE_PYTHON")).dump() + R"()
w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w)
w.DRAIN_IDLE_GRACE = 3600.0
sweep = w.Server.sweep
def counting_sweep(self, now):
    sweep(self, now)
    if self.draining:
        w.notify(f"STATUS=draining, {len(self.connections)} open")
w.Server.sweep = counting_sweep
sys.exit(w.main())
)");
	return path;
}

} // namespace

TEST_CASE("drain: kill -9 of an old instance mid-drain")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = service({"python3", slow_drainer(b)}, {"http"}, 1, "notify");
	web["drain"] = {{"timeout", "120s"}};
	tb.start(config_with({{"web", web}}));
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	pid_t old = instance_pid(st, "web", "web/1/0");
	REQUIRE(old > 0);

	// The only worker answers this, and then holds the idle connection through its drain.
	HttpConnection held(port);
	HttpResponse first = held.get("/");
	REQUIRE(first.body.find("gen 1 pid " + std::to_string(old)) != std::string::npos);

	Load load(b, port, "hello from web gen ", 1000);
	load.begin_upgrade();
	StreamCall up(b.control_path(), "io.brokerd.Control.Upgrade", {{"service", "web"}});
	auto draining = up.until(
		[](const StreamCall::Reply &r) {
			const json &p = member(r.parameters, "progress");
			return p.value("event", "") == "draining" && p.value("instance", "") == "web/1/0";
		},
		kRolloutDeadline);
	INFO("progress: ", up.transcript());
	REQUIRE(draining.has_value());

	// Once the load's connections have left it, the draining instance holds only ours: killing
	// it then fails no request of the load.
	std::string text;
	bool alone = wait_until(
		[&] {
			for (const auto &i : instances(b.status("web"), "web"))
				if (i.value("id", "") == "web/1/0")
					text = i.value("status", "");
			return text == "draining, 1 open";
		},
		30s);
	INFO("status text of web/1/0: ", text);
	REQUIRE(alone);
	REQUIRE(kill9(old));

	StreamCall::Reply end = final_reply(up);
	load.end_upgrade();
	CHECK(end.error.empty());
	CHECK(member(end.parameters, "progress").value("event", "") == "done");
	check_serves_alone(b, "web", 2, 1);
	CHECK(generation_answering(port) == 2);
	load.finish_and_check();
	b.stop();
}

// Workers that ignore the drain signal are killed at the drain deadline, and the upgrade
// completes. Both bounds are taken from brokerd's own Watch event times: each worker's exit comes
// no sooner than the deadline after its drain began, and no later than the deadline plus kSlack;
// and nothing of its session outlives it.
TEST_CASE("drain: workers that ignore the drain signal are killed at the deadline")
{
	struct Case {
		const char *what;
		std::vector<std::string> exec;
		std::size_t session; // processes in each worker's session
	};
	const Case cases[] = {
		{"sh trapping TERM", {"/bin/sh", "-c", "trap '' TERM; exec sleep 1000"}, 1},
		{"python ignoring SIGTERM",
		 {"python3", "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1000)"}, 1},
		{"sh with a child in its session, both ignoring TERM", {"/bin/sh", "-c", "trap '' TERM; sleep 1000 & exec sleep 1000"}, 2},
	};
	constexpr std::int64_t kDeadlineUsec = 1'500'000;
	// Generous: the SIGKILL, the reaping and the event come from a loop that shares a busy
	// 2-core machine with other tests, maybe under AddressSanitizer.
	constexpr std::int64_t kSlackUsec = 2'000'000;
	for (const auto &c : cases) {
		INFO("worker: ", std::string(c.what));
		TestBroker tb;
		Broker &b = tb.b;
		BROKER_CONTEXT(b);
		json stubborn = service(c.exec, {"http"}, 2, "exec");
		stubborn["drain"] = {{"timeout", "1500ms"}};
		tb.start(config_with({{"stubborn", stubborn}}));
		json st = b.status();
		std::vector<pid_t> old = worker_pids(st, "stubborn");
		REQUIRE(old.size() == 2);
		// Ready "exec" means exec'ed, not yet ignoring SIGTERM: wait until every process of
		// each session does.
		auto stubborn_sessions = [&] {
			for (pid_t p : old) {
				std::vector<pid_t> members = session_members(p);
				if (members.size() != c.session)
					return false;
				for (pid_t m : members)
					if (!ignores(m, SIGTERM))
						return false;
			}
			return true;
		};
		REQUIRE(wait_until(stubborn_sessions, 20s));

		// Opened before brokerctl, a process started after, makes its call.
		StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "stubborn"}});
		RunResult r = brokerctl(b, {"upgrade", "stubborn"});
		INFO("brokerctl upgrade: ", r.describe());
		CHECK(r.exit_code == 0);
		CHECK(r.out.find("killed at the drain timeout") != std::string::npos);
		check_serves_alone(b, "stubborn", 2, 2);

		std::map<pid_t, std::int64_t> draining, exited; // brokerd's event times, in microseconds
		auto both_exited = watch.until(
			[&](const StreamCall::Reply &e) {
				const json &p = e.parameters;
				pid_t pid = p.value("pid", 0);
				if (std::find(old.begin(), old.end(), pid) == old.end())
					return false;
				std::string event = p.value("event", "");
				if (event == "draining")
					draining[pid] = p.value("time", std::int64_t{0});
				else if (event == "exited" || event == "failed")
					exited[pid] = p.value("time", std::int64_t{0});
				return exited.size() == old.size();
			},
			10s);
		INFO("Watch: ", watch.transcript());
		REQUIRE(both_exited.has_value());
		for (pid_t p : old) {
			CAPTURE(p);
			REQUIRE(draining.count(p) == 1);
			std::int64_t took = exited[p] - draining[p];
			std::printf("%s: pid %d exited %lld ms after its drain began (deadline %lld ms)\n", c.what, p,
			            static_cast<long long>(took / 1000), static_cast<long long>(kDeadlineUsec / 1000));
			CHECK(took >= kDeadlineUsec);
			CHECK_MESSAGE(took <= kDeadlineUsec + kSlackUsec, "pid ", p, " outlived its drain deadline by ",
			              (took - kDeadlineUsec) / 1000, " ms");
			CHECK(!process_exists(p));
			// The SIGKILL went to the whole session: what else it ran goes as soon as the kernel
			// delivers it.
			std::vector<pid_t> left;
			bool none = wait_until([&] { return (left = session_members(p)).empty(); }, 5s);
			CHECK_MESSAGE(none, left.size(), " processes of pid ", p, "'s session outlived it, first ",
			              left.empty() ? 0 : left[0]);
		}
		CHECK(b.log().find("drain timeout, sending SIGKILL") != std::string::npos);
		b.stop();
	}
}

// brokerctl documents --drain-timeout as "how long an old instance may take to drain": the
// instances this upgrade drains must get that deadline, not the one they were started with.
// broker-example-http logs the deadline its drain event carried.
TEST_CASE("drain: upgrade --drain-timeout applies to the instances it drains")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(2, {{"drain", {{"timeout", "30s"}}}})}}));

	RunResult r = brokerctl(b, {"upgrade", "web", "--drain-timeout", "1500ms"});
	INFO("brokerctl upgrade: ", r.describe());
	REQUIRE(r.exit_code == 0);
	check_serves_alone(b, "web", 2, 2);

	static const std::regex re(R"(web/1/\d+: broker-example-http: draining .*deadline in (\d+) ms)");
	std::string log = b.log();
	int drains = 0;
	for (auto it = std::sregex_iterator(log.begin(), log.end(), re); it != std::sregex_iterator(); ++it) {
		drains++;
		int ms = std::stoi((*it)[1]);
		CHECK_MESSAGE(ms <= 1500, "an old instance was told to drain within ", ms, " ms, not 1500 ms");
	}
	CHECK(drains == 2);
	b.stop();
}
