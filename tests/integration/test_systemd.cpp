// Integration: unmodified systemd tools on both sides of brokerd (socket-proxyd as a worker, socket-activate as launcher).
#include "harness.hpp"
#include "../skip.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <signal.h>

#include <unistd.h>

#include <set>

using namespace itest;

namespace {

const std::string kSocketProxyd = "/lib/systemd/systemd-socket-proxyd";

// socket-proxyd sends READY=1 only in some systemd versions (not in Debian 12's 252): use
// "notify" where it does, so the test never waits for a message that cannot come.
std::string proxyd_ready_mode()
{
	return read_file(kSocketProxyd).find("READY=1") != std::string::npos ? "notify" : "exec";
}

} // namespace

TEST_CASE("systemd-socket-proxyd runs unmodified under brokerd (LISTEN_FDS)")
{
	if (!executable(kSocketProxyd))
		TEST_SKIP(kSocketProxyd + " is not installed (Debian package systemd)");
	Broker b;
	BROKER_CONTEXT(b);
	std::string ready = proxyd_ready_mode();
	MESSAGE("systemd-socket-proxyd ready mode: ", ready);
	// The proxy's target is fixed on its command line, so the backend's port is chosen up front.
	std::uint16_t back_port = free_port();
	json sockets = {{"front", tcp_socket()}, {"back", {{"listen", "tcp://127.0.0.1:" + std::to_string(back_port)}}}};
	json services = {
		{"backend", service({env("EXAMPLE_HTTP")}, {"back"}, 1, "broker")},
		{"proxy", service({fd_probe(), b.path("probe-proxy"), kSocketProxyd, "127.0.0.1:" + std::to_string(back_port)},
		                  {"front"}, 1, ready)},
	};
	b.start({{"sockets", sockets}, {"services", services}});
	json st = b.status();
	INFO("Status: ", st.dump());
	auto proxy = instances(st, "proxy");
	REQUIRE(proxy.size() == 1);
	CHECK(proxy[0]["state"] == "ready");
	auto backend_pids = worker_pids(st, "backend");
	REQUIRE(backend_pids.size() == 1);
	std::uint16_t front = socket_port(st, "front");
	CHECK(socket_port(st, "back") == back_port);

	// curl through the proxy reaches the backend worker.
	RunResult r = run({"curl", "-sS", "--max-time", "5", "http://127.0.0.1:" + std::to_string(front) + "/"});
	INFO("curl: ", r.describe());
	CHECK(r.exit_code == 0);
	CHECK(r.out.rfind("hello from backend gen 1 pid " + std::to_string(backend_pids[0]), 0) == 0);

	// Keep-alive through the proxy too.
	{
		HttpConnection conn(front);
		for (int i = 0; i < 3; ++i) {
			HttpResponse resp = conn.get("/");
			INFO("body: ", resp.body);
			CHECK(resp.status == 200);
			CHECK(resp.body.rfind("hello from backend gen 1", 0) == 0);
		}
	}

	// The proxy was exec'ed with stdio and its one socket, brokerd's own listener.
	auto records = probe_records(b.dir().path(), "probe-proxy");
	REQUIRE(records.size() == 1);
	const auto &rec = records[0];
	CHECK(rec.pid == proxy[0]["pid"].get<pid_t>());
	std::set<int> fds;
	for (const auto &[fd, target] : rec.fds)
		fds.insert(fd);
	CHECK(fds == std::set<int>{0, 1, 2, 3});
	CHECK(rec.sockname.at(3) == "127.0.0.1:" + std::to_string(front));
	CHECK(rec.env.at("LISTEN_FDS") == "1");
	auto ino = socket_inode(rec.fds.at(3));
	REQUIRE(ino);
	CHECK(socket_inodes(b.pid()).count(*ino));
	auto live = proc_fds(rec.pid);
	REQUIRE(live.count(3));
	CHECK(socket_inode(live[3]) == ino);
	CHECK(proc_cmdline(rec.pid).at(0) == kSocketProxyd);

	b.stop();
}

TEST_CASE("brokerd under systemd-socket-activate adopts the listener it is given")
{
	if (!executable("/usr/bin/systemd-socket-activate"))
		TEST_SKIP("/usr/bin/systemd-socket-activate is not installed (Debian package systemd)");
	Broker b;
	BROKER_CONTEXT(b);
	std::uint16_t port = free_port();
	BrokerOptions opts;
	opts.prefix = {"systemd-socket-activate", "-l", "127.0.0.1:" + std::to_string(port), "--fdname=web",
	               "-E", "NOTIFY_SOCKET"};
	opts.wait_ready = false;
	b.start({{"sockets", {{"web", {{"systemd", "web"}}}}},
	         {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"web"}, 2, "broker")}}}},
	        opts);

	// systemd-socket-activate execs brokerd (in place) on the first connection attempt; that
	// connection then waits in the accept queue of the socket brokerd adopts.
	UniqueFd first;
	bool connected = wait_until(
		[&] {
			try {
				first = tcp_connect(port, 1s);
				return true;
			} catch (const std::exception &) {
				return !b.process().running(); // refused until it listens
			}
		},
		10s);
	REQUIRE(connected);
	REQUIRE(first);
	b.wait_ready(20s);

	json st = b.status();
	INFO("Status: ", st.dump());
	CHECK(st.value("pid", 0) == b.pid());
	const json *sock = find_named(st["sockets"], "web");
	REQUIRE(sock);
	CHECK((*sock)["origin"] == "systemd");
	CHECK((*sock)["kind"] == "tcp");
	CHECK(socket_port(st, "web") == port);

	// The queued first connection is served, and new ones too.
	{
		HttpConnection conn(std::move(first));
		HttpResponse r = conn.get("/", false);
		INFO("body: ", r.body);
		CHECK(r.status == 200);
		CHECK(r.body.rfind("hello from web gen 1 pid ", 0) == 0);
	}
	CHECK(http_get(port).status == 200);

	// Each worker holds the adopted socket, the very object systemd-socket-activate bound.
	auto listeners = tcp_listeners();
	for (pid_t pid : worker_pids(st, "web")) {
		auto fds = proc_fds(pid);
		REQUIRE(fds.count(3));
		auto ino = socket_inode(fds[3]);
		REQUIRE(ino);
		CHECK(listeners[*ino] == port);
		CHECK(socket_inodes(b.pid()).count(*ino));
	}

	b.stop();
}

TEST_CASE("brokerd under systemd-socket-activate adopts its control socket")
{
	if (!executable("/usr/bin/systemd-socket-activate"))
		TEST_SKIP("/usr/bin/systemd-socket-activate is not installed (Debian package systemd)");
	Broker b;
	BROKER_CONTEXT(b);
	std::uint16_t port = free_port();
	BrokerOptions opts;
	// As brokerd.socket does: the control socket is named "control", at control.path.
	opts.prefix = {"systemd-socket-activate", "-l", b.control_path(), "-l", "127.0.0.1:" + std::to_string(port),
	               "--fdname=control:web", "-E", "NOTIFY_SOCKET"};
	opts.wait_ready = false;
	b.start({{"sockets", {{"web", {{"systemd", "web"}}}}},
	         {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"web"}, 1, "broker")}}}},
	        opts);

	// A Status call made before brokerd runs: the connection starts brokerd, waits in the
	// control socket's accept queue, and is answered by the brokerd that adopted the socket.
	REQUIRE(wait_until([&] { return ::access(b.control_path().c_str(), F_OK) == 0 || !b.process().running(); }, 10s));
	proto::varlink::SyncClient early(b.control_path());
	proto::varlink::Message reply = early.call("io.brokerd.Control.Status", json::object());
	const json &st = reply.body["parameters"];
	INFO("Status: ", st.dump());
	CHECK(st.value("pid", 0) == b.pid());
	b.wait_ready(20s);
	CHECK(b.log().find("(adopted from systemd)") != std::string::npos);
	CHECK(http_get(port).status == 200);

	// The socket file is systemd's: brokerd leaves it when it stops (so Broker::stop(), which
	// checks that brokerd removed its own, does not apply).
	b.process().signal(SIGTERM);
	auto exited = b.process().wait(20s);
	REQUIRE(exited);
	CHECK(describe_status(*exited) == "exited with 0");
	CHECK(::access(b.control_path().c_str(), F_OK) == 0);
}

TEST_CASE("an unmodified sd_notify client (systemd-notify) marks its instance ready")
{
	if (!executable("/usr/bin/systemd-notify"))
		TEST_SKIP("/usr/bin/systemd-notify is not installed (Debian package systemd)");
	if (::geteuid() != 0)
		TEST_SKIP("needs root to send another pid's credentials");
	Broker b;
	BROKER_CONTEXT(b);
	// systemd-notify runs as a child of the instance, so it sends the main pid in its credentials
	// (allowed for root); --no-block skips its barrier.
	std::string script = "systemd-notify --no-block --pid=$$ --status=serving --ready && exec sleep infinity";
	b.start({{"sockets", {{"http", tcp_socket()}}},
	         {"services", {{"notifier", service({"/bin/sh", "-c", script}, {"http"}, 2, "notify")}}}});
	json st = b.status();
	INFO("Status: ", st.dump());
	auto insts = instances(st, "notifier");
	REQUIRE(insts.size() == 2);
	for (const auto &i : insts) {
		CHECK(i["state"] == "ready");
		CHECK(i.value("status", "") == "serving");
		// The shell execs sleep in place once systemd-notify returns: same pid, new program.
		pid_t pid = i["pid"].get<pid_t>();
		CHECK(wait_until([&] { return proc_cmdline(pid) == std::vector<std::string>{"sleep", "infinity"}; }, 5s));
	}
	b.stop();
}

TEST_CASE("brokerd feeds the service manager's watchdog, and says STATUS= and STOPPING=1")
{
	Broker b;
	BROKER_CONTEXT(b);
	BrokerOptions opts;
	opts.env = {"WATCHDOG_USEC=200000"};
	b.start(json{{"sockets", {{"http", tcp_socket()}}}, {"services", json::object()}}, opts);

	// Half the period: at least three feeds arrive well within a few periods.
	int feeds = 0;
	for (int i = 0; i < 20 && feeds < 3; i++) {
		auto m = b.next_notify(std::chrono::seconds(2));
		REQUIRE_MESSAGE(m, "no notify message within 2s (", feeds, " WATCHDOG=1 so far)");
		feeds += *m == "WATCHDOG=1";
	}
	CHECK(feeds == 3);

	::kill(b.pid(), SIGTERM);
	bool stopping = false;
	for (int i = 0; i < 20 && !stopping; i++) {
		auto m = b.next_notify(std::chrono::seconds(2));
		if (!m)
			break;
		stopping = *m == "STOPPING=1";
	}
	CHECK(stopping);
	b.stop();
}
