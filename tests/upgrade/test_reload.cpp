// brokerctl reload: sockets and services come and go, kept services take their new settings, and
// what cannot change is refused with the key path, leaving the running config as it was.
#include "support.hpp"

#include <doctest/doctest.h>

#include <cerrno>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

using namespace utest;

namespace {

// Says Hello for the registered service "edge" from a short-lived process of its own (a
// registered worker is drained through its pid, which must not be the test's), and returns the
// error name, or "ok".
std::string register_edge(Broker &b)
{
	const char *script = R"(
import json, signal, socket, sys
# Its disconnect counts as its exit, and brokerd drains it with SIGTERM as it goes.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"method": "io.brokerd.Worker.Hello",
                      "parameters": {"service": "edge", "version": "1"}}).encode() + b"\0")
data = b""
while not data.endswith(b"\0"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(json.loads(data[:-1]).get("error", "ok"))
)";
	RunResult r = run({"python3", "-c", script, b.control_path()});
	INFO("register: ", r.describe());
	REQUIRE(r.exit_code == 0);
	std::string out = r.out;
	while (!out.empty() && out.back() == '\n')
		out.pop_back();
	return out;
}

} // namespace

TEST_CASE("reload: sockets and services come and go and kept services take their new settings")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json cfg = config_with({{"web", http_service(1)}});
	cfg["services"]["edge"] = {{"sockets", {"http"}}, {"ready", "exec"}, {"register", {{"users", {"nobody"}}}}};
	tb.start(cfg);
	CHECK(register_edge(b) == "org.varlink.service.PermissionDenied");

	// Added: a socket and a service on it; the kept registered service lets root register now.
	cfg["sockets"]["api"] = tcp_socket();
	cfg["services"]["web2"] = http_service(1, {{"sockets", {"api"}}});
	cfg["services"]["edge"]["register"]["users"] = {"root"};
	write_config(b, cfg);
	RunResult r = brokerctl(b, {"reload", "--json"});
	INFO("brokerctl reload: ", r.describe());
	REQUIRE(r.exit_code == 0);
	json added = json::parse(r.out);
	CHECK(added["added_sockets"] == json::array({"api"}));
	CHECK(added["added_services"] == json::array({"web2"}));
	check_serves_alone(b, "web2", 1, 1);
	std::uint16_t api = socket_port(b.status(), "api");
	CHECK(http_get(api).body.rfind("hello from web2 gen 1", 0) == 0);
	CHECK(register_edge(b) == "ok");

	// Refused, with the key path, and nothing changes: a running service's sockets, and a
	// socket's address.
	json bad = cfg;
	bad["services"]["web"]["sockets"] = {"http", "api"};
	write_config(b, bad);
	r = brokerctl(b, {"reload"});
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("services.web.sockets: a running service's sockets cannot change") != std::string::npos);
	bad = cfg;
	bad["sockets"]["api"] = {{"listen", "tcp://127.0.0.1:" + std::to_string(free_port())}};
	write_config(b, bad);
	r = brokerctl(b, {"reload"});
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("sockets.api: changed address") != std::string::npos);
	CHECK(socket_port(b.status(), "api") == api);

	// A registered service given an exec, and a spawned one losing it: refused by reload, and by
	// an upgrade, which reads the file again.
	bad = cfg;
	bad["services"]["edge"]["exec"] = {env("EXAMPLE_HTTP")};
	bad["services"]["edge"].erase("register");
	bad["services"]["web"].erase("exec");
	bad["services"]["web"]["register"] = {{"users", {"root"}}};
	write_config(b, bad);
	r = brokerctl(b, {"reload"});
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("services.edge.exec: a running service cannot switch between workers brokerd starts and "
	                 "registered ones") != std::string::npos);
	const std::pair<std::string, std::string> upgrades[] = {
		{"edge", "edge is a registered service: a new version takes over by registering"},
		{"web", "services.web: without exec, it would become a registered service"},
	};
	// Not structured bindings: INFO captures them, which clang before 16 cannot.
	for (const auto &upgrade : upgrades) {
		const std::string &name = upgrade.first, &message = upgrade.second;
		r = brokerctl(b, {"upgrade", name});
		INFO("brokerctl upgrade ", name, ": ", r.describe());
		CHECK(r.exit_code == 7);
		CHECK(r.err.find(message) != std::string::npos);
	}
	CHECK(generation_answering(socket_port(b.status(), "http")) == 1);

	// Removed: the service drains, then its socket closes.
	cfg["sockets"].erase("api");
	cfg["services"].erase("web2");
	write_config(b, cfg);
	r = brokerctl(b, {"reload", "--json"});
	INFO("brokerctl reload: ", r.describe());
	REQUIRE(r.exit_code == 0);
	json removed = json::parse(r.out);
	CHECK(removed["removed_sockets"] == json::array({"api"}));
	CHECK(removed["removed_services"] == json::array({"web2"}));
	CHECK(wait_until([&] { return !find_named(b.status()["sockets"], "api"); }, 30s));
	CHECK(!service_of(b.status(), "web2"));
	CHECK(generation_answering(socket_port(b.status(), "http")) == 1);

	// What an upgrade's options may not say is refused with the reason, and nothing starts.
	const std::pair<std::vector<std::string>, std::string> refused[] = {
		{{"--env", "LISTEN_X=1"}, "LISTEN_X: BROKER_*, LISTEN_* and NOTIFY_SOCKET are set by brokerd"},
		{{"--batch", "2000"}, "expected a number of instances from 1 to 1024"},
	};
	for (const auto &refusal : refused) {
		const auto &options = refusal.first;
		const std::string &message = refusal.second;
		std::vector<std::string> args = {"upgrade", "web"};
		args.insert(args.end(), options.begin(), options.end());
		r = brokerctl(b, args);
		INFO("brokerctl upgrade web ", options[0], ": ", r.describe());
		CHECK(r.exit_code != 0);
		CHECK(r.err.find(message) != std::string::npos);
	}
	CHECK(generation_answering(socket_port(b.status(), "http")) == 1);
	b.stop();
}

TEST_CASE("reload: refused once brokerd is shutting down")
{
	// A worker that ignores SIGTERM holds the shutdown open until its drain deadline.
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json stubborn = stubborn_service("60s");
	json cfg = config_with({{"stubborn", stubborn}});
	tb.start(cfg);
	std::vector<pid_t> pids = worker_pids(b.status(), "stubborn");
	REQUIRE(pids.size() == 1);
	REQUIRE(wait_until([&] { return ignores(pids[0], SIGTERM); }, 20s));

	// Draining on SIGTERM, brokerd still answers, but neither binds a socket nor starts a service.
	cfg["sockets"]["api"] = tcp_socket();
	cfg["services"]["web2"] = http_service(1, {{"sockets", {"api"}}});
	write_config(b, cfg);
	b.process().signal(SIGTERM);
	REQUIRE(wait_until([&] { return b.log().find("shutting down") != std::string::npos; }, 20s));
	RunResult r = brokerctl(b, {"reload"});
	INFO("brokerctl reload: ", r.describe());
	CHECK(r.exit_code == 7);
	CHECK(r.err.find("brokerd is shutting down") != std::string::npos);
	json st = b.status();
	CHECK(!find_named(st["sockets"], "api"));
	CHECK(!service_of(st, "web2"));

	// The worker goes, and brokerd with it.
	REQUIRE(kill9(pids[0]));
	auto exit = b.process().wait(20s);
	REQUIRE(exit.has_value());
	CHECK(describe_status(*exit) == "exited with 0");
}

// A removed socket stays open, the same listener still accepting, while a removed service that
// uses it drains, and closes as the last of its workers goes: checked at these two moments, by
// Status, by a connection the old worker answers, and by the inode brokerd holds.
TEST_CASE("reload: a removed socket stays open while a draining worker uses it and closes right after")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	// Ignores its drain and answers every connection on fd 3 until it is killed.
	const char *answer = R"(
import signal, socket
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(b"old worker\n")
    c.close()
)";
	json slow = service({"python3", "-c", answer}, {"api"}, 1, "exec");
	slow["drain"] = {{"timeout", "30s"}};
	json cfg = config_with({{"web", http_service(1)}});
	cfg["sockets"]["api"] = tcp_socket();
	cfg["services"]["slow"] = slow;
	tb.start(cfg);
	std::vector<pid_t> pids = worker_pids(b.status(), "slow");
	REQUIRE(pids.size() == 1);
	REQUIRE(wait_until([&] { return ignores(pids[0], SIGTERM); }, 20s));
	std::uint16_t port = socket_port(b.status(), "api");
	std::optional<std::uint64_t> inode;
	for (const auto &[ino, p] : tcp_listeners())
		if (p == port)
			inode = ino;
	REQUIRE(inode.has_value());
	REQUIRE(socket_inodes(b.pid()).count(*inode) == 1);

	// Removed, with its only service, which drains and holds it.
	cfg["sockets"].erase("api");
	cfg["services"].erase("slow");
	write_config(b, cfg);
	RunResult r = brokerctl(b, {"reload", "--json"});
	INFO("brokerctl reload: ", r.describe());
	REQUIRE(r.exit_code == 0);
	CHECK(json::parse(r.out)["removed_sockets"] == json::array({"api"}));
	json st;
	REQUIRE_MESSAGE(wait_until(
				[&] {
					st = b.status();
					auto insts = instances(st, "slow");
					return insts.size() == 1 && insts[0].value("state", "") == "draining";
				},
				20s),
	                st.dump());
	CHECK(find_named(st["sockets"], "api"));
	CHECK(socket_inodes(b.pid()).count(*inode) == 1);
	CHECK(tcp_listeners().count(*inode) == 1);
	{
		UniqueFd c = tcp_connect(port);
		std::string got;
		char buf[64];
		ssize_t n;
		pollfd p{c.get(), POLLIN, 0};
		while (got.find('\n') == std::string::npos && ::poll(&p, 1, 10000) == 1 &&
		       (n = ::recv(c.get(), buf, sizeof buf, 0)) > 0)
			got.append(buf, static_cast<std::size_t>(n));
		CHECK(got == "old worker\n");
	}

	// The last user goes: the Status that no longer shows the service no longer shows the
	// socket either, and nothing listens on its port.
	REQUIRE(kill9(pids[0]));
	REQUIRE_MESSAGE(wait_until(
				[&] {
					st = b.status();
					return !service_of(st, "slow");
				},
				20s),
	                st.dump());
	CHECK(!find_named(st["sockets"], "api"));
	CHECK(socket_inodes(b.pid()).count(*inode) == 0);
	CHECK(tcp_listeners().count(*inode) == 0);
	UniqueFd refused(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	sockaddr_in sa{};
	sa.sin_family = AF_INET;
	sa.sin_port = htons(port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int rc = ::connect(refused.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa);
	int err = errno;
	CHECK(rc == -1);
	CHECK(err == ECONNREFUSED);
	CHECK(generation_answering(socket_port(st, "http")) == 1);
	b.stop();
}

// What a reload changed in a kept service, in the reply and in brokerctl's words: each setting
// with when it takes effect, an env variable by name only, and the running instances untouched
// until the next upgrade, which takes the new settings.
TEST_CASE("reload: the reply and brokerctl list each changed setting and when it takes effect")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json cfg = config_with({{"web", http_service(2)}});
	tb.start(cfg);

	cfg["services"]["web"]["instances"] = 3;
	cfg["services"]["web"]["env"] = {{"API_TOKEN", "s3cret-value"}};
	cfg["shutdown"] = {{"timeout", "30s"}};
	write_config(b, cfg);
	RunResult r = brokerctl(b, {"reload", "--json"});
	INFO("brokerctl reload --json: ", r.describe());
	REQUIRE(r.exit_code == 0);
	json reply = json::parse(r.out);
	CHECK(reply["changed"] ==
	      json::parse(R"([{"service":"","key":"shutdown.timeout","from":"1m30s","to":"30s","when":"now"},
	                      {"service":"web","key":"instances","from":"2","to":"3","when":"next-upgrade"},
	                      {"service":"web","key":"env","from":"","to":"API_TOKEN added","when":"next-upgrade"}])"));
	CHECK(r.out.find("s3cret") == std::string::npos);
	// At the next upgrade: gen 1 still runs its 2 instances.
	check_serves_alone(b, "web", 1, 2);

	cfg["services"]["web"]["instances"] = 2;
	cfg["services"]["web"]["env"]["API_TOKEN"] = "other-s3cret";
	write_config(b, cfg);
	r = brokerctl(b, {"reload"});
	INFO("brokerctl reload: ", r.describe());
	REQUIRE(r.exit_code == 0);
	CHECK(r.out == "web: instances 3\u21922, at the next upgrade\n"
	               "web: env: API_TOKEN changed, at the next upgrade\n");

	// The next upgrade takes them.
	cfg["services"]["web"]["instances"] = 3;
	write_config(b, cfg);
	r = brokerctl(b, {"reload"});
	REQUIRE(r.exit_code == 0);
	CHECK(r.out == "web: instances 2\u21923, at the next upgrade\n");
	r = brokerctl(b, {"upgrade", "web"});
	INFO("brokerctl upgrade: ", r.describe());
	REQUIRE(r.exit_code == 0);
	check_serves_alone(b, "web", 2, 3);
	b.stop();
}
