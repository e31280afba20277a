// One upgrade at a time (a second is refused, an abort rolls back), and crash loops stop restarts.
#include "support.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <regex>

using namespace utest;

namespace {

// A new version whose instances wait on `fifo` before they exec the worker, until `go` exists.
std::vector<std::string> held_exec(const std::string &fifo, const std::string &go)
{
	REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
	std::string http = shell_quote(env("EXAMPLE_HTTP"));
	return {"/bin/sh", "-c", "test -e " + shell_quote(go) + " || read line < " + shell_quote(fifo) + "; exec " + http};
}

// Lets every held instance go: the file for those to come, a line in the FIFO for one that
// waits. O_RDWR opens a FIFO without waiting for a reader; the fd keeps the line there until
// the reader arrives.
UniqueFd release(const std::string &fifo, const std::string &go)
{
	write_file(go, "");
	UniqueFd fd(::open(fifo.c_str(), O_RDWR | O_CLOEXEC));
	REQUIRE(fd);
	REQUIRE(::write(fd.get(), "go\n", 3) == 3);
	return fd;
}

Process brokerctl_background(const Broker &b, const std::vector<std::string> &args, const std::string &name)
{
	std::vector<std::string> argv = {env("BROKERCTL"), "--socket", b.control_path()};
	argv.insert(argv.end(), args.begin(), args.end());
	SpawnOptions so;
	so.stdout_path = b.path(name + ".out");
	so.stderr_path = b.path(name + ".err");
	return Process::spawn(argv, so);
}

// Waits until Status shows an upgrade of "web" to `generation` with a new instance started.
void wait_in_progress(Broker &b, int generation)
{
	json st;
	bool running = wait_until(
		[&] {
			st = b.status("web");
			const json *svc = service_of(st, "web");
			if (!svc || !svc->contains("upgrade") || (*svc)["upgrade"].is_null())
				return false;
			const json &up = (*svc)["upgrade"];
			return up.value("generation", 0) == generation && up.value("started", 0) >= 1;
		},
		20s);
	INFO("Status: ", st.dump());
	REQUIRE(running);
}

int exit_code_of(Process &p)
{
	auto st = p.wait(kRolloutDeadline);
	REQUIRE_MESSAGE(st.has_value(), "brokerctl did not finish");
	return WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
}

} // namespace

TEST_CASE("control: a second upgrade is refused while one runs; abort rolls back")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(2)}}));

	std::string fifo = b.path("hold"), go = b.path("go");
	std::vector<std::string> args = {"upgrade", "web", "--exec", "--"};
	for (const auto &a : held_exec(fifo, go))
		args.push_back(a);
	Process first = brokerctl_background(b, args, "first");
	wait_in_progress(b, 2);

	struct Refused {
		std::vector<std::string> args;
	};
	for (const auto &r : {Refused{{"upgrade", "web"}}, Refused{{"upgrade", "web", "--all-at-once"}},
	                      Refused{{"restart", "web"}}}) {
		RunResult second = brokerctl(b, r.args);
		INFO("brokerctl ", r.args[0], " during the upgrade: ", second.describe());
		CHECK(second.exit_code == 7);
		CHECK(second.err.find("upgrade of web to gen 2 is in progress") != std::string::npos);
	}
	// The Varlink error names the upgrade that runs.
	proto::varlink::SyncClient c(b.control_path(), 10s);
	c.send(proto::varlink::make_call("io.brokerd.Control.Upgrade", {{"service", "web"}}));
	proto::varlink::Message m = c.receive();
	INFO("second Upgrade: ", m.body.dump());
	CHECK(m.body.value("error", "") == "io.brokerd.Control.UpgradeInProgress");
	CHECK(m.body["parameters"].value("service", "") == "web");
	CHECK(m.body["parameters"].value("generation", 0) == 2);

	// The refusals left the first upgrade alone: once its instances may start, it completes.
	UniqueFd held = release(fifo, go);
	int code = exit_code_of(first);
	INFO("first upgrade: ", read_file(b.path("first.out")), read_file(b.path("first.err")));
	CHECK(code == 0);
	check_serves_alone(b, "web", 2, 2);
	CHECK(newest_generation(b.status("web"), "web") == 2);

	// Abort: the upgrade in progress ends as failed and rolled back.
	std::string fifo2 = b.path("hold2"), go2 = b.path("go2");
	args = {"upgrade", "web", "--exec", "--"};
	for (const auto &a : held_exec(fifo2, go2))
		args.push_back(a);
	Process third = brokerctl_background(b, args, "third");
	wait_in_progress(b, 3);
	RunResult abort = brokerctl(b, {"abort", "web"});
	INFO("brokerctl abort: ", abort.describe());
	CHECK(abort.exit_code == 0);
	code = exit_code_of(third);
	std::string third_err = read_file(b.path("third.err"));
	INFO("aborted upgrade: ", read_file(b.path("third.out")), third_err);
	CHECK(code == 6);
	CHECK(third_err.find("aborted by the operator") != std::string::npos);
	check_serves_alone(b, "web", 2, 2);
	RunResult again = brokerctl(b, {"abort", "web"});
	CHECK(again.exit_code == 7);
	b.stop();
}

// A worker that exits at once is restarted with backoff (100 ms doubling) until more than 5
// failures within 60 s; then it stays failed. A healthy sentinel service proves the Watch
// stream was live all along: its event arrives, and no "started" of the crashing one before it.
TEST_CASE("control: a crash loop is detected and not restarted")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json crashy = service({"/bin/sh", "-c", "echo 'crashing on purpose' >&2; exit 1"}, {"http"}, 1, "notify");
	crashy["restart"] = "on-failure";
	json sentinel = service({"sleep", "1000"}, {}, 1, "exec");
	tb.start(config_with({{"crashy", crashy}, {"sentinel", sentinel}}));

	json st;
	json inst;
	bool failed = wait_until(
		[&] {
			st = b.status();
			auto insts = instances(st, "crashy");
			if (insts.size() != 1)
				return false;
			inst = insts[0];
			return inst.value("state", "") == "failed" && inst.value("pid", -1) == 0;
		},
		30s);
	INFO("Status: ", st.dump());
	REQUIRE(failed);
	CHECK(service_of(st, "crashy")->value("state", "") == "failed");
	CHECK(service_of(st, "sentinel")->value("state", "") == "running");

	// 1 start and 5 restarts; the 6th failure is the loop.
	std::string log = b.log();
	static const std::regex started(R"(instance crashy/1/0: started pid)");
	auto starts = std::distance(std::sregex_iterator(log.begin(), log.end(), started), std::sregex_iterator());
	CHECK(starts == 6);
	CHECK(log.find("crash loop") != std::string::npos);

	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", json::object());
	auto is_crashy_start = [](const StreamCall::Reply &r) {
		return r.parameters.value("service", "") == "crashy" && r.parameters.value("event", "") == "started";
	};
	// The next restart would have come 3.2 s after the last failure.
	auto restarted = watch.until(is_crashy_start, 4s);
	INFO("watch: ", watch.transcript());
	CHECK(!restarted.has_value());

	pid_t sentinel_pid = worker_pids(b.status("sentinel"), "sentinel").at(0);
	REQUIRE(kill9(sentinel_pid));
	auto seen = watch.until(
		[&](const StreamCall::Reply &r) {
			return r.parameters.value("service", "") == "sentinel" && r.parameters.value("pid", 0) == sentinel_pid &&
			       r.parameters.value("event", "") == "failed";
		},
		20s);
	REQUIRE(seen.has_value());
	for (const auto &r : watch.seen())
		CHECK(!is_crashy_start(r));

	json after = instances(b.status("crashy"), "crashy").at(0);
	CHECK(after.value("state", "") == "failed");
	CHECK(after.value("pid", -1) == 0);
	CHECK(after.value("since", 0) == inst.value("since", 1));
	b.stop();
}

namespace {

std::int64_t realtime_usec()
{
	return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
	        .count();
}

// The first `event` a Watch stream sends (that `also` accepts), within 30 s.
json watch_until(StreamCall &watch, const std::string &event,
                 const std::function<bool(const json &)> &also = [](const json &) { return true; })
{
	auto r = watch.until(
		[&](const StreamCall::Reply &r) { return r.parameters.value("event", "") == event && also(r.parameters); },
		30s);
	INFO("Watch:\n", watch.transcript());
	REQUIRE_MESSAGE(r.has_value(), "no \"", event, "\" event");
	return r->parameters;
}

// Returns once brokerd has taken each stream's Watch call: a Watch has no first reply, so reloads
// of the unchanged config file are made until each stream has seen one (each waited for with a
// deadline, as the call may reach brokerd after the reload did).
void wait_watching(Broker &b, const std::vector<StreamCall *> &streams)
{
	std::vector<StreamCall *> waiting = streams;
	const auto deadline = std::chrono::steady_clock::now() + 30s;
	while (!waiting.empty() && std::chrono::steady_clock::now() < deadline) {
		RunResult r = brokerctl(b, {"reload"});
		INFO("brokerctl reload: ", r.describe());
		REQUIRE(r.exit_code == 0);
		std::erase_if(waiting, [](StreamCall *watch) {
			return watch
				->until([](const StreamCall::Reply &r) { return r.parameters.value("event", "") == "reload"; }, 2s)
				.has_value();
		});
	}
	REQUIRE_MESSAGE(waiting.empty(), "a Watch saw no reload within 30 s");
}

// An event's time: CLOCK_REALTIME in microseconds, between `after` and now.
void check_time(const json &event, std::int64_t after)
{
	INFO("event: ", event.dump());
	REQUIRE(event.contains("time"));
	REQUIRE(event["time"].is_number_integer());
	std::int64_t t = event["time"].get<std::int64_t>();
	CHECK(t >= after);
	CHECK(t <= realtime_usec());
}

} // namespace

// brokerd's own events reach every Watch stream, one narrowed to a service too: a reload with its
// changes, the reexec from the brokerd that carries on, and the shutdown before the stream ends.
TEST_CASE("control: Watch sees reload and reexec and shutdown with their time whether narrowed or not")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json cfg = config_with({{"web", http_service(1)}});
	tb.start(cfg);
	const std::int64_t began = realtime_usec();
	StreamCall all(b.control_path(), "io.brokerd.Control.Watch", json::object());
	StreamCall web(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	wait_watching(b, {&all, &web});

	cfg["services"]["web"]["instances"] = 2;
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump(2));
	RunResult r = brokerctl(b, {"reload"});
	INFO("brokerctl reload: ", r.describe());
	REQUIRE(r.exit_code == 0);
	for (StreamCall *watch : {&all, &web}) {
		// Past the reloads that waited for the streams, which changed nothing.
		json e = watch_until(*watch, "reload", [](const json &e) { return !e.value("changed", json::array()).empty(); });
		check_time(e, began);
		CHECK(!e.contains("service"));
		CHECK(e.value("message", "").find(": 1 setting(s) changed") != std::string::npos);
		CHECK(e["changed"] == json::parse(R"([{"service":"web","key":"instances","from":"1","to":"2",
		                                       "when":"next-upgrade"}])"));
	}

	r = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", r.describe());
	REQUIRE(r.exit_code == 0);
	for (StreamCall *watch : {&all, &web}) {
		json e = watch_until(*watch, "reexec");
		check_time(e, began);
		CHECK(!e.contains("service"));
		CHECK(e.value("pid", 0) == b.pid());
		CHECK(!e.value("version", "").empty());
	}

	b.process().signal(SIGTERM);
	for (StreamCall *watch : {&all, &web}) {
		json e = watch_until(*watch, "shutdown");
		check_time(e, began);
		CHECK(!e.contains("service"));
		CHECK(e.value("message", "").find("received SIGTERM, shutting down") != std::string::npos);
	}
	auto exit = b.process().wait(30s);
	REQUIRE(exit.has_value());
	CHECK(describe_status(*exit) == "exited with 0");
}

// One JSON shape for every event: each step of an upgrade's and a restart's progress, and each
// Watch event, has its time; their done says which kind of rollout ended and how long it took.
TEST_CASE("control: every Progress and Watch event has its time and done its kind and duration_usec")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(2)}}));
	const std::int64_t began = realtime_usec();
	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", json::object());
	wait_watching(b, {&watch});

	const std::pair<const char *, const char *> rollouts[] = {{"io.brokerd.Control.Upgrade", "upgrade"},
	                                                          {"io.brokerd.Control.Restart", "restart"}};
	for (const auto &rollout : rollouts) {
		const std::string kind = rollout.second;
		INFO("rollout: ", kind);
		StreamCall call(b.control_path(), rollout.first, {{"service", "web"}});
		StreamCall::Reply end = final_reply(call);
		INFO("progress:\n", call.transcript());
		REQUIRE(end.error.empty());
		REQUIRE(call.seen().size() >= 2);
		for (const auto &reply : call.seen())
			check_time(reply.parameters.at("progress"), began);
		const json &done = end.parameters.at("progress");
		CHECK(done.value("event", "") == "done");
		CHECK(done.value("kind", "") == kind);
		CHECK(done.value("duration_usec", std::int64_t{0}) > 0);
		CHECK(done.value("duration_usec", std::int64_t{0}) <= done.value("time", std::int64_t{0}) - began);

		json watched = watch_until(watch, "done");
		CHECK(watched.value("kind", "") == kind);
		CHECK(watched.value("duration_usec", std::int64_t{0}) > 0);
	}
	REQUIRE(!watch.seen().empty());
	for (const auto &reply : watch.seen())
		check_time(reply.parameters, began);
	b.stop();
}
