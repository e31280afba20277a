// Integration: how a worker proves who it is. A registration holds the process that connected,
// a token works only for its own instance's processes, and an instance has one Events stream.
#include "harness.hpp"
#include "../skip.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

using namespace itest;
using proto::varlink::SyncClient;

namespace {

// The error a Hello got, or "ok".
std::string hello_outcome(SyncClient &c, const json &params)
{
	try {
		c.call("io.brokerd.Worker.Hello", params);
		return "ok";
	} catch (const proto::varlink::Error &e) {
		MESSAGE("Hello ", params.dump(), ": ", std::string(e.what()));
		return e.varlink_error().empty() ? std::string("error: ") + e.what() : e.varlink_error();
	}
}

// A socket connected to brokerd by a child that has exited (and was reaped) since: its
// SO_PEERCRED names the child's pid.
UniqueFd connected_by_a_dead_child(const Broker &b, pid_t &child)
{
	UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	REQUIRE(fd);
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::strncpy(sa.sun_path, b.control_path().c_str(), sizeof sa.sun_path - 1);
	Process p = Process::fork_run([&] { return ::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0 ? 0 : 1; });
	auto st = p.wait(10s);
	REQUIRE(st);
	REQUIRE(WIFEXITED(*st));
	REQUIRE(WEXITSTATUS(*st) == 0);
	child = p.pid();
	return fd;
}

// A process that has exactly pid `pid` (clone3 with set_tid, which root may ask for), blocked
// until the write end of the `release` pipe closes. Returns its pid, or -1 when another process
// took the pid first.
pid_t process_with_pid(pid_t pid, const int release[2])
{
	clone_args args{};
	args.exit_signal = SIGCHLD;
	args.set_tid = reinterpret_cast<std::uintptr_t>(&pid);
	args.set_tid_size = 1;
	long r = ::syscall(SYS_clone3, &args, sizeof args);
	if (r == 0) {
		::close(release[1]);
		char c;
		(void)!::read(release[0], &c, 1);
		::_exit(0);
	}
	return static_cast<pid_t>(r);
}

const json *ext_instance_with_pid(Broker &b, pid_t pid)
{
	static json last;
	last = b.status("ext");
	for (const json &i : instances(last, "ext"))
		if (i.value("pid", 0) == pid)
			return &i;
	return nullptr;
}

std::string environ_value(pid_t pid, const std::string &name)
{
	std::string env = read_file("/proc/" + std::to_string(pid) + "/environ");
	std::string key = name + "=";
	for (std::size_t at = 0; at < env.size();) {
		std::size_t end = env.find('\0', at);
		std::string entry = env.substr(at, end - at);
		if (entry.rfind(key, 0) == 0)
			return entry.substr(key.size());
		at = end == std::string::npos ? env.size() : end + 1;
	}
	return {};
}

} // namespace

TEST_CASE("a registration whose process has exited, or whose pid names another process by now, is refused")
{
	Broker b;
	BROKER_CONTEXT(b);
	json ext = {{"sockets", json::array()}, {"instances", 1}, {"ready", "exec"}, {"register", {{"users", {"root"}}}}};
	b.start({{"services", {{"ext", ext}}}});

	SUBCASE("gone")
	{
		pid_t child = 0;
		SyncClient c(connected_by_a_dead_child(b, child), 10s);
		CHECK(hello_outcome(c, {{"service", "ext"}, {"want_fds", false}}) == "io.brokerd.Worker.PeerExited");
		CHECK(instances(b.status("ext"), "ext").empty());
	}
	SUBCASE("recycled")
	{
		if (::geteuid() != 0)
			TEST_SKIP("needs root to create a process with a given pid (clone3 set_tid)");
		// The registrant exits and a new process gets its pid before brokerd reads the Hello:
		// brokerd must not take the newcomer for the worker (it would later SIGTERM and SIGKILL it).
		pid_t child = 0;
		UniqueFd conn;
		pid_t newcomer = -1;
		int release[2];
		REQUIRE(::pipe2(release, O_CLOEXEC) == 0);
		UniqueFd release_r(release[0]), release_w(release[1]);
		for (int attempt = 0; attempt < 20 && newcomer < 0; attempt++) {
			conn = connected_by_a_dead_child(b, child);
			newcomer = process_with_pid(child, release);
			INFO("clone3 with set_tid ", child, ": ", std::strerror(errno));
			REQUIRE((newcomer >= 0 || errno == EEXIST));
		}
		REQUIRE(newcomer == child);
		SyncClient c(std::move(conn), 10s);
		CHECK(hello_outcome(c, {{"service", "ext"}, {"want_fds", false}}) == "io.brokerd.Worker.PeerExited");
		CHECK(ext_instance_with_pid(b, newcomer) == nullptr);
		CHECK(process_exists(newcomer));
		release_w.reset();
		int st = 0;
		REQUIRE(::waitpid(newcomer, &st, 0) == newcomer);
		CHECK(WIFEXITED(st)); // it ended as it meant to, not by a signal of brokerd's
	}
	b.stop();
}

TEST_CASE("a token works only for its instance's processes, and an instance has one Events stream")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root to run a client as nobody");
	Broker b;
	BROKER_CONTEXT(b);
	std::string results = b.path("token-results.json");
	json tok = service({"python3", env("SOURCE_ROOT") + "/tests/integration/token_worker.py", results}, {}, 1, "broker");
	tok["drain"] = {{"timeout", "10s"}};
	b.start({{"services", {{"tok", tok}}}});

	REQUIRE_MESSAGE(wait_until([&] {
		                auto is = instances(b.status("tok"), "tok");
		                return is.size() == 1 && is[0].value("state", "") == "ready";
	                }, 20s),
	                "the token worker did not get ready");
	json r = json::parse(read_file(results));
	INFO("the worker's results: ", r.dump());
	CHECK(r["first_hello"] == "ok");
	CHECK(r["second_hello"] == "ok");                          // a second connection of its own
	CHECK(r["second_events"] == "io.brokerd.Worker.EventsInUse"); // but not a second stream
	CHECK(r["child"] == "ok");                                 // a process it forked
	CHECK(r["orphan"] == "ok");                                // double-forked, still in its session
	CHECK(r["own_session"] == "org.varlink.service.PermissionDenied"); // left both

	pid_t worker = worker_pids(b.status("tok"), "tok").at(0);
	std::string token = environ_value(worker, "BROKER_TOKEN");
	REQUIRE(token.size() == 32);
	json stolen = {{"token", token}, {"want_fds", false}};

	// The same uid (root), but not the instance's process, child or session.
	SyncClient outsider(b.control_path(), 10s);
	CHECK(hello_outcome(outsider, stolen) == "org.varlink.service.PermissionDenied");

	// Another user.
	SpawnOptions nobody;
	nobody.as_nobody = true;
	nobody.stderr_path = b.path("nobody.log");
	Process thief = Process::fork_run(
		[&] {
			SyncClient c(b.control_path(), 10s);
			return hello_outcome(c, stolen) == "org.varlink.service.PermissionDenied" ? 0 : 1;
		},
		nobody);
	auto st = thief.wait(10s);
	INFO("as nobody: ", read_file(b.path("nobody.log")));
	REQUIRE(st);
	CHECK(WIFEXITED(*st));
	CHECK(WEXITSTATUS(*st) == 0);

	// The drain reaches the first stream, which brokerd kept.
	SyncClient op(b.control_path(), 20s);
	op.call("io.brokerd.Control.Stop", {{"service", "tok"}});
	CHECK(json::parse(read_file(results)).value("drained_on", "") == "first");
	b.stop();
}

// A worker's own process is the one a token could work for: every token brokerd did not give its
// instance, or gave an instance that is gone, is refused there with the documented error, and the
// connection stays unauthenticated (its Events call is refused too).
TEST_CASE("a worker's own process is refused every token but its instance's, and gets nothing for one")
{
	Broker b;
	BROKER_CONTEXT(b);
	std::string cases_fifo = b.path("cases.fifo"), results = b.path("results.json");
	REQUIRE(::mkfifo(cases_fifo.c_str(), 0600) == 0);
	json probe = service({"python3", env("SOURCE_ROOT") + "/tests/integration/token_probe.py", cases_fifo, results}, {}, 1, "exec");
	json other = service({"sleep", "infinity"}, {}, 1, "exec");
	b.start({{"services", {{"probe", probe}, {"other", other}}}});

	pid_t other_pid = worker_pids(b.status("other"), "other").at(0);
	std::string retired = environ_value(other_pid, "BROKER_TOKEN");
	// Restart replies once the new instance serves and the old one is gone.
	SyncClient op(b.control_path(), 30s);
	op.call("io.brokerd.Control.Restart", {{"service", "other"}});
	json st = b.status();
	INFO("Status: ", st.dump());
	std::vector<pid_t> others = worker_pids(st, "other");
	REQUIRE(others.size() == 1);
	REQUIRE(others[0] != other_pid);
	std::string other_token = environ_value(others[0], "BROKER_TOKEN");
	std::string own = environ_value(worker_pids(st, "probe").at(0), "BROKER_TOKEN");
	// A live instance's token, given by another brokerd.
	Broker second;
	second.start({{"services", {{"probe", other}}}});
	std::string elsewhere = environ_value(worker_pids(second.status("probe"), "probe").at(0), "BROKER_TOKEN");
	for (const std::string &t : {retired, other_token, own, elsewhere})
		REQUIRE(t.find_first_not_of("0123456789abcdef") == std::string::npos);
	REQUIRE(own.size() == 32);
	std::string upper = own;
	std::transform(upper.begin(), upper.end(), upper.begin(), ::toupper);
	REQUIRE(upper != own);

	struct Case {
		std::string name;
		json token;
		std::string hello; // the error Hello gets, or "ok"
	};
	const Case cases[] = {
		{"own", own, "ok"},
		{"unknown", "00112233445566778899aabbccddeeff", "io.brokerd.Worker.InvalidToken"},
		{"retired", retired, "io.brokerd.Worker.InvalidToken"},
		{"another instance's", other_token, "org.varlink.service.PermissionDenied"},
		{"another brokerd's", elsewhere, "io.brokerd.Worker.InvalidToken"},
		{"truncated", own.substr(0, 31), "io.brokerd.Worker.InvalidToken"},
		{"extended", own + "0", "io.brokerd.Worker.InvalidToken"},
		{"upper case", upper, "io.brokerd.Worker.InvalidToken"},
		{"with a NUL", own + std::string(1, '\0'), "io.brokerd.Worker.InvalidToken"},
		{"a number", 42, "org.varlink.service.InvalidParameter"},
		{"empty", "", "org.varlink.service.InvalidParameter"},
	};
	json sent = json::object();
	for (const Case &c : cases)
		sent[c.name] = {{"token", c.token}, {"want_fds", true}};
	{
		// The worker opened the FIFO for reading at its start: the open waits for it.
		UniqueFd w;
		REQUIRE(wait_until([&] { return (w = UniqueFd(::open(cases_fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC))).valid(); }, 20s));
		std::string text = sent.dump();
		REQUIRE(::write(w.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size()));
	}
	REQUIRE_MESSAGE(wait_until([&] { return ::access(results.c_str(), F_OK) == 0; }, 60s), "the probe wrote no results");
	json got = json::parse(read_file(results));
	INFO("the probe's results: ", got.dump());
	for (const Case &c : cases) {
		CAPTURE(c.name);
		REQUIRE(got.contains(c.name));
		CHECK(got[c.name][0] == c.hello);
		if (c.hello != "ok")
			CHECK(got[c.name][1] == "io.brokerd.Worker.NotAuthenticated");
	}
	second.stop();
	CHECK(b.log().find("Hello with the token of instance " + instances(st, "other").at(0).value("id", "") +
	                   " from pid " + std::to_string(worker_pids(st, "probe").at(0))) != std::string::npos);
	b.stop();
}
