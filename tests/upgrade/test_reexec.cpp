// brokerctl reexec: brokerd upgrades itself under load, keeping its pid, listeners, workers and
// their connections; an exec that cannot work leaves it serving as it was.
#include "support.hpp"

#include "broker_config.h"

#include <doctest/doctest.h>

#include <sys/stat.h>

using namespace utest;

namespace {

std::vector<pid_t> sorted_pids(Broker &b)
{
	std::vector<pid_t> pids = worker_pids(b.status("web"), "web");
	std::sort(pids.begin(), pids.end());
	return pids;
}

// An executable file in the broker's directory, with `text` as its contents.
std::string write_program(Broker &b, const std::string &name, const std::string &text)
{
	std::string path = b.path(name);
	write_file(path, text);
	REQUIRE(::chmod(path.c_str(), 0755) == 0);
	return path;
}

} // namespace

TEST_CASE("reexec: three re-executions under load lose no request and keep the workers")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(2)}}));
	std::uint16_t port = socket_port(b.status(), "http");
	check_serves_alone(b, "web", 1, 2);
	std::vector<pid_t> workers = sorted_pids(b);
	std::uint64_t uptime = b.status().value("uptime_usec", std::uint64_t{0});

	// A Watch stream open across the re-execs goes on.
	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	Load load(b, port, "hello from web gen ");
	for (int i = 1; i <= 3; ++i) {
		CAPTURE(i);
		load.begin_upgrade();
		RunResult r = brokerctl(b, {"reexec"});
		load.end_upgrade();
		INFO("brokerctl reexec: ", r.describe());
		REQUIRE(r.exit_code == 0);
		CHECK(r.out.find("pid " + std::to_string(b.pid())) != std::string::npos);

		json st = b.status();
		INFO("Status: ", st.dump());
		CHECK(st.value("pid", 0) == b.pid());
		CHECK(st.value("version", "") == BROKER_VERSION);
		CHECK(st.value("uptime_usec", std::uint64_t{0}) >= uptime); // the same brokerd, carrying on
		CHECK(sorted_pids(b) == workers);
		std::string why;
		CHECK_MESSAGE(serves_alone(st, "web", 1, 2, why), why);
	}
	std::set<int> gens = load.finish_and_check();
	CHECK(gens == std::set<int>{1});

	// The workers' control connections came along: an upgrade drains them through their
	// Events streams, which only the kept connections carry.
	RunResult up = brokerctl(b, {"upgrade", "web"});
	INFO("brokerctl upgrade: ", up.describe());
	CHECK(up.exit_code == 0);
	check_serves_alone(b, "web", 2, 2);
	CHECK(b.log().find("drain requested") != std::string::npos);
	auto done = watch.until([](const StreamCall::Reply &r) { return r.parameters.value("event", "") == "done"; }, 10s);
	INFO("Watch: ", watch.transcript());
	CHECK(done);
	b.stop();
}

TEST_CASE("reexec: a binary that cannot carry on is refused and brokerd serves on")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(1)}}));
	std::uint16_t port = socket_port(b.status(), "http");
	std::vector<pid_t> workers = sorted_pids(b);

	struct Case {
		const char *what;
		std::string binary;
		const char *message;
	};
	const Case cases[] = {
		{"missing", b.path("no-such-brokerd"), "No such file or directory"},
		{"not a brokerd", "/bin/true", "reads re-exec state format \"\""},
		{"another state format", write_program(b, "future-brokerd", "#!/bin/sh\necho 999\n"),
		 "reads re-exec state format \"999\", this brokerd writes format 1"},
		{"broken", write_program(b, "broken-brokerd", "\x7f" "ELF garbage"), "did not run"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.what);
		RunResult r = brokerctl(b, {"reexec", "--binary", c.binary});
		INFO("brokerctl reexec: ", r.describe());
		CHECK(r.exit_code == 7);
		CHECK(r.err.find("did not re-execute, and serves on as it was") != std::string::npos);
		CHECK(r.err.find(c.message) != std::string::npos);
		CHECK(b.process().running());
		CHECK(generation_answering(port) == 1);
		CHECK(sorted_pids(b) == workers);
	}

	// Busy: not while a rollout runs (here, one whose new instance never gets ready).
	RunResult up = brokerctl(b, {"upgrade", "web", "--no-wait", "--start-timeout", "1m", "--exec", "/bin/sleep", "60"});
	INFO("brokerctl upgrade: ", up.describe());
	REQUIRE(up.exit_code == 0);
	RunResult busy = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", busy.describe());
	CHECK(busy.exit_code == 7);
	CHECK(busy.err.find("an upgrade of web is in progress") != std::string::npos);
	CHECK(brokerctl(b, {"abort", "web"}).exit_code == 0);
	CHECK(generation_answering(port) == 1);
	b.stop();
}
