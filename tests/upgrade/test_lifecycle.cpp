// brokerd's own start and stop: a bounded shutdown, the second SIGTERM, and READY=1 beside a service that cannot start.
#include "support.hpp"

#include <doctest/doctest.h>

#include <csignal>
#include <regex>
#include <sstream>

#include <sys/wait.h>

using namespace utest;

namespace {

// A worker that ignores SIGTERM, its drain signal.
// Far beyond any test's patience, as an operator's "drain for as long as it takes".
constexpr const char *kForever = "8760h";
constexpr std::uint64_t kForeverMs = 365ull * 24 * 3600 * 1000;

// Gone for good: not running, and not a zombie either, which brokerd would have left unreaped
// (the test process is a subreaper, so an orphan would be its child now).
bool gone(pid_t pid)
{
	return ::kill(pid, 0) < 0 && errno == ESRCH;
}

// Starts two stubborn instances and waits until both ignore SIGTERM; returns their pids.
std::vector<pid_t> start_stubborn(TestBroker &tb, const json &extra)
{
	json stubborn = service(kIgnoresTerm, {"http"}, 2, "exec");
	stubborn["drain"] = {{"timeout", kForever}};
	json config = config_with({{"stubborn", stubborn}});
	config.update(extra, /*merge_objects=*/true);
	tb.start(config);
	std::vector<pid_t> pids = worker_pids(tb.b.status(), "stubborn");
	REQUIRE(pids.size() == 2);
	// Ready "exec" means exec'ed, not yet ignoring SIGTERM: wait until they do.
	REQUIRE(wait_until([&] { return ignores(pids[0], SIGTERM) && ignores(pids[1], SIGTERM); }, 20s));
	return pids;
}

// `sig` to brokerd; it must exit with 0 within `within`, its workers reaped.
void check_stops(Broker &b, int sig, std::chrono::milliseconds within, const std::vector<pid_t> &workers)
{
	auto begin = Clock::now();
	b.process().signal(sig);
	auto st = b.process().wait(within);
	auto took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - begin);
	REQUIRE_MESSAGE(st, "brokerd still runs ", within.count(), " ms after the signal");
	MESSAGE("brokerd exited ", took.count(), " ms after the signal");
	CHECK(describe_status(*st) == "exited with 0");
	for (pid_t w : workers)
		CHECK_MESSAGE(gone(w), "worker ", w, " outlived brokerd, or was left unreaped");
}

} // namespace

// The shutdown budget bounds the whole stop, whatever each instance's drain timeout, and cuts
// the deadline of instances that were already draining (an upgrade's old ones).
TEST_CASE("shutdown: instances that ignore their drain are killed at the shutdown timeout")
{
	constexpr auto kBudget = 1000ms;
	const json shutdown = {{"shutdown", {{"timeout", "1s"}}}};
	for (bool upgrading : {false, true}) {
		INFO(std::string(upgrading ? "draining in an upgrade with a 365-day --drain-timeout when SIGTERM comes"
		                           : "drained by the shutdown with a 365-day drain.timeout"));
		TestBroker tb;
		Broker &b = tb.b;
		BROKER_CONTEXT(b);
		// Beside them, a libbroker-client worker, told its (cut) deadline in the drain event.
		json extra = shutdown;
		extra["services"]["web"] = http_service(1, {{"drain", {{"timeout", kForever}}}});
		std::vector<pid_t> workers = start_stubborn(tb, extra);
		std::optional<StreamCall> up;
		if (upgrading) {
			up.emplace(b.control_path(), "io.brokerd.Control.Upgrade",
			           json{{"service", "stubborn"}, {"drain_timeout_ms", kForeverMs}});
			auto draining = up->until(
				[](const StreamCall::Reply &r) {
					return member(r.parameters, "progress").value("event", "") == "draining";
				},
				kRolloutDeadline);
			INFO("progress: ", up->transcript());
			REQUIRE(draining.has_value());
			workers = worker_pids(b.status(), "stubborn");
			REQUIRE(workers.size() >= 3);
		}
		std::vector<pid_t> web = worker_pids(b.status(), "web");
		REQUIRE(web.size() == 1);
		workers.push_back(web[0]);
		auto begin = Clock::now();
		check_stops(b, SIGTERM, 20s, workers);
		CHECK(Clock::now() - begin >= kBudget);
		std::string log = b.log();
		CHECK(log.find("shutdown timeout, sending SIGKILL") != std::string::npos);
		static const std::regex told(R"(web/1/0: broker-example-http: draining .*deadline in (\d+) ms)");
		std::smatch m;
		REQUIRE(std::regex_search(log, m, told));
		CHECK(std::stoi(m[1]) <= 1000);
		if (up) {
			auto end = final_reply(*up, 10s);
			CHECK(end.error == "io.brokerd.Control.UpgradeFailed");
		}
	}
}

// Spawned instances lose their whole session, and a registered one (not brokerd's child) its
// process, through the pidfd brokerd took at Hello.
TEST_CASE("shutdown: a second SIGTERM or SIGINT kills every instance at once")
{
	for (int second : {SIGTERM, SIGINT}) {
		INFO("second signal: ", std::string(sigabbrev_np(second)));
		TestBroker tb;
		Broker &b = tb.b;
		BROKER_CONTEXT(b);
		// The default budget (90 s) and 365-day drains: only the second signal ends this soon.
		json ext = {{"register", {{"users", {"root"}}}}, {"drain", {{"timeout", kForever}}}};
		std::vector<pid_t> workers = start_stubborn(tb, {{"services", {{"ext", ext}}}});
		// A registered worker that ignores SIGTERM, its drain signal (it reads no Events).
		Process registered = Process::fork_run([&] {
			::signal(SIGTERM, SIG_IGN);
			proto::varlink::SyncClient c(b.control_path(), 5s);
			c.send(proto::varlink::make_call("io.brokerd.Worker.Hello", {{"service", "ext"}, {"version", "v1"}}));
			if (c.receive().body.contains("error"))
				return 1;
			for (;;)
				::pause();
		});
		REQUIRE(wait_until([&] { return !worker_pids(b.status(), "ext").empty() || !registered.running(); }, 20s));
		REQUIRE(worker_pids(b.status(), "ext") == std::vector<pid_t>{registered.pid()});

		b.process().signal(SIGTERM);
		bool draining = wait_until(
			[&] {
				json st = b.status();
				auto insts = instances(st, "stubborn");
				auto more = instances(st, "ext");
				insts.insert(insts.end(), more.begin(), more.end());
				return insts.size() == 3 && std::all_of(insts.begin(), insts.end(), [](const json &i) {
					       return i.value("state", "") == "draining";
				       });
			},
			20s);
		REQUIRE(draining);
		check_stops(b, second, 10s, workers);
		auto st = registered.wait(5s);
		REQUIRE(st);
		CHECK((WIFSIGNALED(*st) && WTERMSIG(*st) == SIGKILL));
		CHECK(b.log().find(std::string("received SIG") + sigabbrev_np(second) + " again, killing every instance") !=
		      std::string::npos);
	}
}

// A service that never becomes ready (the audit's: one "notify" service, SIGKILLed at each
// start timeout) does not hold READY=1 back, nor every other service with it: READY=1 comes
// once each service had its first attempt, its STATUS= names the one that is not ready, the
// crash-loop rule stops the restarts with the start timeouts counted, and the healthy service
// beside it serves throughout.
TEST_CASE("startup: a service that never gets ready holds neither READY=1 nor the others")
{
	Broker b;
	BROKER_CONTEXT(b);
	json never = service({"sleep", "1000"}, {}, 1, "notify");
	never["start_timeout"] = "300ms";
	BrokerOptions opts;
	opts.wait_ready = false;
	b.start({{"sockets", {{"http", tcp_socket()}}}, {"services", {{"never", never}, {"web", http_service(1)}}}},
	        opts);

	// Everything brokerd tells its service manager, line by line, until READY=1.
	std::vector<std::string> lines;
	std::string ready_status;
	auto begin = Clock::now();
	while (ready_status.empty()) {
		auto m = b.next_notify(10s);
		REQUIRE_MESSAGE(m, "no READY=1 within 10s; got: ", json(lines).dump());
		std::istringstream in(*m);
		std::string line;
		bool ready = false;
		while (std::getline(in, line)) {
			lines.push_back(line);
			ready = ready || line == "READY=1";
			if (ready && line.rfind("STATUS=", 0) == 0)
				ready_status = line;
		}
		REQUIRE_MESSAGE(ready_status.empty() == !ready, "READY=1 without STATUS=: ", *m);
	}
	auto took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - begin);
	INFO("notify: ", json(lines).dump());
	MESSAGE("READY=1 after ", took.count(), " ms");
	// Restarting, unless the machine was so slow that the healthy service took longer to get
	// ready than the other one took to reach its crash loop.
	CHECK((ready_status.find("not ready: never (restarting)") != std::string::npos ||
	       ready_status.find("not ready: never (failed)") != std::string::npos));
	CHECK(ready_status.find("web") == std::string::npos);
	// Before READY=1, the service manager's start timeout was pushed past the start timeout.
	auto extend = std::find_if(lines.begin(), lines.end(),
	                           [](const std::string &l) { return l.rfind("EXTEND_TIMEOUT_USEC=", 0) == 0; });
	REQUIRE(extend != lines.end());
	std::uint64_t usec = std::stoull(extend->substr(20));
	CHECK(usec >= 300'000);
	CHECK(usec <= 60'000'000);

	// The healthy service answers at every turn while the other one is restarted, until the
	// crash-loop rule stops it.
	std::uint16_t port = socket_port(b.status(), "http");
	json st;
	int requests = 0;
	bool stopped = wait_until(
		[&] {
			while (b.next_notify(0ms)) {
			}
			HttpResponse r = http_get(port);
			REQUIRE_MESSAGE(r.status == 200, "web did not answer while never was restarting: ", r.body);
			requests++;
			st = b.status();
			auto insts = instances(st, "never");
			return insts.size() == 1 && insts[0].value("state", "") == "failed" && insts[0].value("pid", -1) == 0;
		},
		30s);
	INFO("Status: ", st.dump());
	REQUIRE(stopped);
	CHECK(service_of(st, "web")->value("state", "") == "running");
	CHECK(http_get(port).status == 200);
	MESSAGE(requests, " requests served while never was restarted");

	// 1 start and 5 restarts, each ended by its start timeout; the 6th failure is the loop.
	std::string log = b.log();
	static const std::regex started(R"(instance never/1/0: started pid)");
	static const std::regex timed_out(R"(instance never/1/0: was not ready within the start timeout)");
	auto count = [&](const std::regex &re) {
		return std::distance(std::sregex_iterator(log.begin(), log.end(), re), std::sregex_iterator());
	};
	CHECK(count(started) == 6);
	CHECK(count(timed_out) == 6);
	CHECK(log.find("instance never/1/0: crash loop (6 failures within") != std::string::npos);
	b.stop();
}
