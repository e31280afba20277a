// Integration: a forking server names its main process with MAINPID=; brokerd follows it, restarts
// the slot when it dies, and takes the rest of its session with it.
#include "harness.hpp"

#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <sstream>

using namespace itest;

namespace {

std::string forking_worker()
{
	return (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "itest-forking-worker").string();
}

struct Daemon {
	pid_t pid = 0;
	pid_t helper = 0;
};

// What the daemon wrote once it was ready, when it names a process other than `previous`.
std::optional<Daemon> read_daemon(const std::string &path, pid_t previous)
{
	std::istringstream in(read_file(path));
	Daemon d;
	if (!(in >> d.pid >> d.helper) || d.pid == previous)
		return std::nullopt;
	return d;
}

// The one line a connection to `port` is answered with.
std::string answer(std::uint16_t port)
{
	UniqueFd fd = tcp_connect(port);
	std::string out;
	char buf[64];
	for (;;) {
		pollfd p{fd.get(), POLLIN, 0};
		REQUIRE_MESSAGE(::poll(&p, 1, 5000) == 1, "no answer within 5s");
		ssize_t n = ::read(fd.get(), buf, sizeof buf);
		if (n <= 0)
			return out;
		out.append(buf, static_cast<std::size_t>(n));
	}
}

// Whether the one instance is ready with `pid` as its process (once the first one is gone).
bool ready_as(Broker &b, pid_t pid)
{
	auto list = instances(b.status(), "fork");
	return list.size() == 1 && list[0].value("state", "") == "ready" && list[0].value("pid", 0) == pid;
}

} // namespace

TEST_CASE("a forking server: brokerd follows MAINPID, restarts it when it dies and cleans up its session")
{
	Broker b;
	BROKER_CONTEXT(b);
	std::string pid_file = b.path("daemon.pids");
	json config = {{"sockets", {{"tcp", tcp_socket()}}},
	               {"services", {{"fork", service({forking_worker(), pid_file}, {"tcp"}, 1, "notify")}}}};
	config["services"]["fork"]["restart"] = "on-failure";
	b.start(config);
	std::uint16_t port = socket_port(b.status(), "tcp");

	// The first process is gone; the daemon it named serves, as the instance's pid.
	std::optional<Daemon> first;
	REQUIRE(wait_until([&] { return (first = read_daemon(pid_file, 0)).has_value(); }, 20s));
	CHECK(wait_until([&] { return ready_as(b, first->pid); }, 20s));
	CHECK(answer(port) == "pid " + std::to_string(first->pid) + "\n");
	CHECK(b.log().find("main pid " + std::to_string(first->pid) + " continues") != std::string::npos);

	// Its death is seen through its pidfd: the helper left in its session goes with it, and the
	// slot starts again under its restart policy. Returns the daemon that replaced `old`.
	auto kill_and_restart = [&](const Daemon &old) {
		UniqueFd helper = pidfd_of(old.helper);
		REQUIRE(helper);
		REQUIRE(::kill(old.pid, SIGKILL) == 0);
		std::optional<Daemon> next;
		REQUIRE_MESSAGE(wait_until([&] { return (next = read_daemon(pid_file, old.pid)).has_value(); }, 20s),
		                "the forking server was not restarted after its main process died");
		CHECK(wait_until([&] { return ready_as(b, next->pid); }, 20s));
		CHECK(exits_within(helper.get(), 20s));
		CHECK(b.log().find("pid " + std::to_string(old.pid) + " exited unexpectedly") != std::string::npos);
		CHECK(answer(port) == "pid " + std::to_string(next->pid) + "\n");
		return *next;
	};
	Daemon second = kill_and_restart(*first);

	// A re-exec carries the daemon over, pidfd and all: it is still followed, and still restarted.
	RunResult r = run({env("BROKERCTL"), "--socket", b.control_path(), "reexec"});
	INFO("brokerctl reexec: ", r.describe());
	REQUIRE(r.exit_code == 0);
	CHECK(ready_as(b, second.pid));
	Daemon third = kill_and_restart(second);

	// brokerd's shutdown drains it through its pidfd and leaves nothing of its session behind:
	// the daemon is gone before brokerd exits, the helper at once (its SIGKILL may be pending),
	// both seen before the harness kills anything.
	UniqueFd daemon = pidfd_of(third.pid), helper = pidfd_of(third.helper);
	REQUIRE(daemon);
	REQUIRE(helper);
	REQUIRE(b.shut_down());
	CHECK(exits_within(daemon.get(), 0ms));
	CHECK(exits_within(helper.get(), 5s));
	b.check_strays();
}

TEST_CASE("forking servers with exec readiness are ready once their first process is gone")
{
	// Whichever the event loop sees first, the first process's exit or the end of its exec
	// status, each instance ends up ready with the daemon as its pid.
	constexpr int kInstances = 8;
	Broker b;
	BROKER_CONTEXT(b);
	json svc = service({forking_worker()}, {"tcp"}, kInstances, "exec");
	svc["env"] = {{"FORKING_WORKER_NO_READY", "1"}};
	b.start({{"sockets", {{"tcp", tcp_socket()}}}, {"services", {{"fork", svc}}}});
	std::vector<json> list;
	bool ready = wait_until(
		[&] {
			list = instances(b.status(), "fork");
			std::string log = b.log();
			return std::count_if(list.begin(), list.end(), [&](const json &i) {
				       std::string daemon = "main pid " + std::to_string(i.value("pid", 0)) + " continues";
				       return i.value("state", "") == "ready" && log.find(daemon) != std::string::npos;
			       }) == kInstances;
		},
		20s);
	INFO("instances: ", json(list).dump());
	CHECK(ready);
	b.stop();
}

// A second SIGTERM reaches the daemon MAINPID= named through its pidfd, and its session with it:
// brokerd does not wait for a drain the daemon ignores.
TEST_CASE("a forking server that ignores its drain is killed, session and all, by a second SIGTERM")
{
	Broker b;
	BROKER_CONTEXT(b);
	std::string pid_file = b.path("daemon.pids");
	json svc = service({forking_worker(), pid_file}, {"tcp"}, 1, "notify");
	svc["env"] = {{"FORKING_WORKER_IGNORE_TERM", "1"}};
	svc["drain"] = {{"timeout", "8760h"}};
	b.start({{"sockets", {{"tcp", tcp_socket()}}}, {"services", {{"fork", svc}}}});
	std::optional<Daemon> daemon;
	REQUIRE(wait_until([&] { return (daemon = read_daemon(pid_file, 0)).has_value(); }, 20s));
	REQUIRE(wait_until([&] { return ready_as(b, daemon->pid); }, 20s));
	UniqueFd daemon_fd = pidfd_of(daemon->pid), helper_fd = pidfd_of(daemon->helper);
	REQUIRE(daemon_fd);
	REQUIRE(helper_fd);

	b.process().signal(SIGTERM);
	REQUIRE(wait_until(
		[&] {
			auto list = instances(b.status(), "fork");
			return list.size() == 1 && list[0].value("state", "") == "draining";
		},
		20s));
	CHECK(process_exists(daemon->pid));
	b.process().signal(SIGTERM);
	auto st = b.process().wait(10s);
	REQUIRE_MESSAGE(st, "brokerd still runs 10s after the second SIGTERM");
	CHECK(describe_status(*st) == "exited with 0");
	CHECK(exits_within(daemon_fd.get(), 0ms));
	CHECK(exits_within(helper_fd.get(), 5s));
	b.check_strays();
}
