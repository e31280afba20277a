// Integration: each example worker serves HTTP through brokered sockets with exactly the fds it should hold.
#include "harness.hpp"

#include <doctest/doctest.h>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <sstream>
#include <set>

using namespace itest;

namespace {

struct WorkerKind {
	const char *name;
	std::vector<std::string> exec;
	const char *ready;
	const char *suffix; // what this variant appends to the body
};

// "hello from web gen 1 pid 1234 (C)"
struct Hello {
	std::string service;
	int generation = 0;
	pid_t pid = 0;
	std::string rest;
};

std::optional<Hello> parse_hello(std::string body)
{
	while (!body.empty() && (body.back() == '\n' || body.back() == '\r'))
		body.pop_back();
	// Parsed by hand: std::regex trips g++ 12's -Wmaybe-uninitialized under the sanitizers.
	std::istringstream in(body);
	std::string hello, from, gen, pid;
	Hello h;
	if (!(in >> hello >> from >> h.service >> gen >> h.generation >> pid >> h.pid) || hello != "hello" ||
	    from != "from" || gen != "gen" || pid != "pid")
		return std::nullopt;
	std::getline(in, h.rest);
	return h;
}

std::string join(const std::vector<std::string> &v)
{
	std::string s;
	for (const auto &e : v)
		s += (s.empty() ? "" : " ") + e;
	return s;
}

void serve_http(const WorkerKind &kind)
{
	Broker b;
	BROKER_CONTEXT(b);
	INFO("worker: ", kind.name);

	std::vector<std::string> exec = {fd_probe(), b.path("probe-web")};
	exec.insert(exec.end(), kind.exec.begin(), kind.exec.end());
	b.start({{"sockets", {{"http", tcp_socket()}}}, {"services", {{"web", service(exec, {"http"}, 2, kind.ready)}}}});

	json st = b.status();
	INFO("Status: ", st.dump());
	auto insts = instances(st, "web");
	REQUIRE(insts.size() == 2);
	std::set<pid_t> pids;
	for (const auto &i : insts) {
		CHECK(i.value("state", "") == "ready");
		CHECK(i.value("id", "").rfind("web/1/", 0) == 0);
		pids.insert(i.value("pid", 0));
	}
	REQUIRE(pids.size() == 2);
	REQUIRE(*pids.begin() > 0);
	std::uint16_t port = socket_port(st, "http");
	const json *sock = find_named(st["sockets"], "http");
	REQUIRE(sock);
	CHECK((*sock)["address"] == "tcp://127.0.0.1:" + std::to_string(port));
	CHECK((*sock)["kind"] == "tcp");
	CHECK((*sock)["origin"] == "bound");

	// Status reports the real worker processes: alive, and running the worker program.
	for (pid_t pid : pids) {
		CHECK(process_exists(pid));
		auto cmd = proc_cmdline(pid);
		INFO("cmdline of ", pid, ": ", join(cmd));
		const std::string &program = kind.exec.back();
		bool found = std::any_of(cmd.begin(), cmd.end(), [&](const std::string &a) { return a == program; });
		CHECK(found);
		CHECK(std::find(cmd.begin(), cmd.end(), fd_probe()) == cmd.end()); // the probe exec'ed the worker
	}

	// What each worker held at exec: stdio and its one socket at fd 3, nothing more.
	auto listeners = tcp_listeners();
	auto broker_sockets = socket_inodes(b.pid());
	auto records = probe_records(b.dir().path(), "probe-web");
	REQUIRE(records.size() == 2);
	std::set<std::uint64_t> inodes;
	for (const auto &rec : records) {
		INFO("probe record of pid ", rec.pid);
		CHECK(pids.count(rec.pid));
		std::set<int> fds;
		for (const auto &[fd, target] : rec.fds)
			fds.insert(fd);
		CHECK(fds == std::set<int>{0, 1, 2, 3});
		auto ino = socket_inode(rec.fds.count(3) ? rec.fds.at(3) : "");
		REQUIRE(ino);
		inodes.insert(*ino);
		CHECK(broker_sockets.count(*ino)); // the same socket object as brokerd's listener
		CHECK(listeners[*ino] == port);
		CHECK(rec.sockname.at(3) == "127.0.0.1:" + std::to_string(port));
		CHECK(rec.env.at("LISTEN_FDS") == "1");
		CHECK(rec.env.at("LISTEN_PID") == std::to_string(rec.pid));
		CHECK(rec.env.at("LISTEN_FDNAMES") == "http");
		CHECK(rec.env.count("NOTIFY_SOCKET"));
		CHECK(rec.env.count("BROKER_SOCKET"));
		CHECK(rec.env.at("BROKER_SERVICE") == "web");
		CHECK(rec.env.at("BROKER_GENERATION") == "1");
	}
	CHECK(inodes.size() == 1); // both instances share one listener

	// And while serving, fd 3 still is that listener.
	for (pid_t pid : pids) {
		auto fds = proc_fds(pid);
		INFO("fds of running worker ", pid);
		CHECK(fds.count(0));
		CHECK(fds.count(1));
		CHECK(fds.count(2));
		REQUIRE(fds.count(3));
		CHECK(socket_inode(fds[3]) == std::optional<std::uint64_t>(*inodes.begin()));
	}

	// HTTP on a fresh connection each time, then several requests on one kept-alive connection.
	for (int i = 0; i < 4; ++i) {
		HttpResponse r = http_get(port);
		INFO("body: ", r.body);
		CHECK(r.status == 200);
		auto h = parse_hello(r.body);
		REQUIRE(h);
		CHECK(h->service == "web");
		CHECK(h->generation == 1);
		CHECK(pids.count(h->pid));
		CHECK(h->rest == kind.suffix);
	}
	{
		// Closed before the stop: an idle keep-alive client would only stretch the drain.
		HttpConnection conn(port);
		for (int i = 0; i < 5; ++i) {
			HttpResponse r = conn.get("/");
			INFO("keep-alive request ", i, ", body: ", r.body);
			CHECK(r.status == 200);
			CHECK(r.headers["connection"] != "close");
			auto h = parse_hello(r.body);
			REQUIRE(h);
			CHECK(h->service == "web");
			CHECK(pids.count(h->pid));
		}
	}

	b.stop();
}

} // namespace

TEST_CASE("C++ example worker (libbroker-client) serves HTTP through brokerd")
{
	serve_http({"C++", {env("EXAMPLE_HTTP")}, "broker", ""});
}

TEST_CASE("C example worker (C API) serves HTTP through brokerd")
{
	serve_http({"C", {env("EXAMPLE_C")}, "broker", " (C)"});
}

TEST_CASE("Python example worker (LISTEN_FDS + READY=1) serves HTTP through brokerd")
{
	serve_http({"Python", {"python3", env("EXAMPLE_PYTHON")}, "notify", " (python)"});
}

TEST_CASE("a worker gets its service's sockets in order, and no other service's")
{
	Broker b;
	BROKER_CONTEXT(b);
	json sockets = {{"http", tcp_socket()}, {"alpha", tcp_socket()}, {"beta", tcp_socket()}};
	json services = {
		{"web", service({fd_probe(), b.path("probe-web"), env("EXAMPLE_HTTP")}, {"http"}, 1, "broker")},
		// An unmodified program, ready once exec'ed; its sockets deliberately not in name order.
		{"multi", service({fd_probe(), b.path("probe-multi"), "sleep", "infinity"}, {"beta", "alpha"}, 1, "exec")},
	};
	b.start({{"sockets", sockets}, {"services", services}});
	json st = b.status();
	INFO("Status: ", st.dump());

	// Ready at exec means ready when the probe ran, maybe before it wrote its record.
	std::vector<ProbeRecord> multi;
	REQUIRE(wait_until([&] { return (multi = probe_records(b.dir().path(), "probe-multi")).size() == 1; }, 10s));
	const auto &rec = multi[0];
	std::set<int> fds;
	for (const auto &[fd, target] : rec.fds)
		fds.insert(fd);
	CHECK(fds == std::set<int>{0, 1, 2, 3, 4});
	CHECK(rec.sockname.at(3) == "127.0.0.1:" + std::to_string(socket_port(st, "beta")));
	CHECK(rec.sockname.at(4) == "127.0.0.1:" + std::to_string(socket_port(st, "alpha")));
	CHECK(rec.env.at("LISTEN_FDS") == "2");
	CHECK(rec.env.at("LISTEN_FDNAMES") == "beta:alpha");
	CHECK(worker_pids(st, "multi") == std::vector<pid_t>{rec.pid});

	auto web = probe_records(b.dir().path(), "probe-web");
	REQUIRE(web.size() == 1);
	CHECK(web[0].sockname.size() == 1);
	CHECK(web[0].sockname.at(3) == "127.0.0.1:" + std::to_string(socket_port(st, "http")));

	b.stop();
}

TEST_CASE("a unix-socket listener serves HTTP and its file is removed at shutdown")
{
	Broker b;
	BROKER_CONTEXT(b);
	std::string path = b.path("api.sock");
	b.start({{"sockets", {{"api", {{"listen", "unix:" + path}}}}},
	         {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"api"}, 1, "broker")}}}});
	json st = b.status();
	INFO("Status: ", st.dump());
	const json *sock = find_named(st["sockets"], "api");
	REQUIRE(sock);
	CHECK((*sock)["address"] == "unix:" + path);
	CHECK((*sock)["kind"] == "unix");
	struct stat sb {};
	REQUIRE(::stat(path.c_str(), &sb) == 0);
	CHECK(S_ISSOCK(sb.st_mode));

	RunResult r = run({"curl", "-sS", "--max-time", "5", "--unix-socket", path, "http://localhost/"});
	INFO("curl: ", r.describe());
	CHECK(r.exit_code == 0);
	auto h = parse_hello(r.out);
	REQUIRE(h);
	CHECK(h->service == "web");
	CHECK(worker_pids(st, "web") == std::vector<pid_t>{h->pid});

	auto fds = proc_fds(h->pid);
	REQUIRE(fds.count(3));
	auto ino = socket_inode(fds[3]);
	REQUIRE(ino);
	CHECK(socket_inodes(b.pid()).count(*ino));

	b.stop();
	CHECK_MESSAGE(::access(path.c_str(), F_OK) != 0, "socket file ", path, " left behind");
}

// README: "Each worker runs in its own session, so none is left orphaned": brokerd signals and
// kills a worker's whole session, which must hold nothing of brokerd's (or the test's).
TEST_CASE("every spawned worker leads its own session and process group, apart from brokerd's")
{
	Broker b;
	BROKER_CONTEXT(b);
	b.start({{"sockets", {{"http", tcp_socket()}}},
	         {"services",
	          {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 2, "broker")},
	           {"plain", service({"sleep", "infinity"}, {}, 2, "exec")}}}});
	const pid_t broker_sid = ::getsid(b.pid());
	const pid_t broker_pgid = ::getpgid(b.pid());
	REQUIRE(broker_sid > 0);
	REQUIRE(broker_pgid > 0);

	auto check_own_session = [&](pid_t pid) {
		INFO("worker ", pid, " (brokerd ", b.pid(), ": sid ", broker_sid, ", pgid ", broker_pgid, ")");
		CHECK(::getsid(pid) == pid);
		CHECK(::getpgid(pid) == pid);
		CHECK(::getsid(pid) != broker_sid);
		CHECK(::getpgid(pid) != broker_pgid);
	};
	json st = b.status();
	INFO("Status: ", st.dump());
	std::vector<pid_t> pids = worker_pids(st, "web");
	std::vector<pid_t> plain = worker_pids(st, "plain");
	pids.insert(pids.end(), plain.begin(), plain.end());
	REQUIRE(pids.size() == 4);
	for (pid_t pid : pids)
		check_own_session(pid);

	// A worker brokerd restarts after it was killed gets its own session too.
	REQUIRE(::kill(plain.at(0), SIGKILL) == 0);
	pid_t restarted = 0;
	REQUIRE_MESSAGE(wait_until(
				[&] {
					for (const json &i : instances(b.status("plain"), "plain"))
						if (i.value("state", "") == "ready" && i.value("pid", 0) > 0 &&
						    i.value("pid", 0) != plain[0] && i.value("pid", 0) != plain[1])
							restarted = i.value("pid", 0);
					return restarted > 0;
				},
				20s),
	                "brokerd did not restart the killed worker");
	check_own_session(restarted);
	b.stop();
}
