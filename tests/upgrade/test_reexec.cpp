// brokerctl reexec: brokerd upgrades itself under load, keeping its pid, listeners, workers and
// their connections; an exec that cannot work leaves it serving as it was.
#include "handoff_clients.hpp"
#include "support.hpp"

#include "broker_config.h"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

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

namespace vl = proto::varlink;

// Reads a registered worker's Events stream until an event named `name`; its message, or one
// with an empty body when the stream ended or the deadline passed.
vl::Message next_event(vl::SyncClient &c, const std::string &name)
{
	c.set_timeout(60s);
	try {
		for (;;) {
			vl::Message m = c.receive();
			if (member(m.body, "parameters").value("event", "") == name)
				return m;
		}
	} catch (const std::exception &e) {
		std::fprintf(stderr, "waiting for a %s event: %s\n", name.c_str(), e.what());
		return {};
	}
}

// The pids of the running instances of "ext".
std::vector<pid_t> live_pids(const json &status)
{
	std::vector<pid_t> out;
	for (pid_t p : worker_pids(status, "ext"))
		if (p > 0)
			out.push_back(p);
	return out;
}

// Hello for service "ext" as `version`, then Events and Ready: a registered worker, ready.
vl::Message register_worker(vl::SyncClient &c, const std::string &version, bool accept_handoff)
{
	c.send(vl::make_call("io.brokerd.Worker.Hello", {{"service", "ext"},
	                                                 {"version", version},
	                                                 {"want_fds", !accept_handoff},
	                                                 {"accept_handoff", accept_handoff}}));
	vl::Message hello = c.receive();
	c.send(vl::make_call("io.brokerd.Worker.Events", json::object(), true));
	c.send(vl::make_call("io.brokerd.Worker.Ready", json::object(), false, true));
	return hello;
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
	RunResult up = brokerctl(b, {"upgrade", "web", "--no-wait", "--start-timeout", "1m", "--exec", "--", "/bin/sleep", "60"});
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

// A handoff whose receiver has not acknowledged it lives only in brokerd's router: a re-exec then
// would lose it (the receiver's acknowledgement would name a batch the new brokerd never sent).
// So Reexec is refused until it settles, and then carries the receiver and its connection over.
TEST_CASE("reexec: refused while a handoff is in flight; done once it settles; no connection lost")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json ext = {{"sockets", {"http"}}, {"instances", 1}, {"ready", "broker"},
	            {"drain", {{"timeout", "60s"}}}, {"register", {{"users", {"root"}}}}};
	tb.start(config_with({{"ext", ext}}));
	const std::string control = b.control_path();
	std::uint16_t port = socket_port(b.status(), "http");

	// The sender: version 1, which takes one client connection, and on its drain hands it off
	// (with state) and exits at once, leaving brokerd's copy the only one in flight.
	SpawnOptions so;
	so.stderr_path = b.path("sender.log");
	Process sender = Process::fork_run(
		[&] {
			vl::SyncClient c(control, 20s);
			vl::Message hello = register_worker(c, "v1", false);
			if (hello.fds.size() != 1)
				return 10;
			pollfd p{hello.fds[0].get(), POLLIN, 0};
			if (::poll(&p, 1, 20000) != 1)
				return 11;
			UniqueFd conn(::accept4(hello.fds[0].get(), nullptr, nullptr, SOCK_CLOEXEC));
			if (!conn || next_event(c, "drain").body.is_null())
				return 12;
			std::vector<UniqueFd> fds;
			fds.push_back(std::move(conn));
			c.send(vl::make_call("io.brokerd.Worker.Handoff",
			                     {{"batch", 1}, {"remaining", 0}, {"connections", {{{"fd", 0}, {"state", "aGk="}}}}},
			                     false, true),
			       std::move(fds));
			return 0;
		},
		so);
	REQUIRE_MESSAGE(wait_until([&] { return live_pids(b.status("ext")) == std::vector<pid_t>{sender.pid()}; }, 20s),
	                read_file(b.path("sender.log")));
	UniqueFd client = tcp_connect(port);

	// The receiver: version 2, which takes over, receives the connection and holds its
	// acknowledgement until told; then, told again, answers on the connection.
	Beacon received, acknowledge, answer;
	so.stderr_path = b.path("receiver.log");
	Process receiver = Process::fork_run(
		[&] {
			vl::SyncClient c(control, 20s);
			if (register_worker(c, "v2", true).body.contains("error"))
				return 20;
			vl::Message m = next_event(c, "connections");
			const json &conns = member(member(m.body, "parameters"), "connections");
			if (m.fds.size() != 1 || conns.size() != 1 || conns[0].value("state", "") != "aGk=")
				return 21;
			received.send();
			if (!acknowledge.receive(60s))
				return 22;
			std::uint64_t batch = m.body["parameters"]["batch"].get<std::uint64_t>();
			c.send(vl::make_call("io.brokerd.Worker.Received", {{"batch", batch}, {"refused", json::array()}}, false,
			                     true));
			if (!answer.receive(60s))
				return 23;
			const std::string line = "served by the successor\n";
			if (::send(m.fds[0].get(), line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size()))
				return 24;
			// Its Events stream came through the re-exec: brokerd's stop drains it there.
			return next_event(c, "drain").body.is_null() ? 25 : 0;
		},
		so);
	INFO("receiver: ", read_file(b.path("receiver.log")));
	REQUIRE(received.receive(60s));
	auto sent = sender.wait(30s);
	INFO("sender: ", read_file(b.path("sender.log")));
	REQUIRE(sent);
	REQUIRE(describe_status(*sent) == "exited with 0");

	// At rest but for the handoff: the receiver serves alone, and the connection is in flight.
	json st;
	REQUIRE_MESSAGE(wait_until(
				[&] {
					st = b.status("ext");
					const json *svc = service_of(st, "ext");
					return svc && (!svc->contains("upgrade") || svc->at("upgrade").is_null()) &&
					       live_pids(st) == std::vector<pid_t>{receiver.pid()};
				},
				20s),
	                "the takeover did not end: ", st.dump());
	auto counts = handoff::handoff_counts(st, "ext");
	CHECK(counts.handed == 1);
	CHECK(counts.received == 0);
	RunResult busy = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", busy.describe());
	CHECK(busy.exit_code == 7);
	CHECK(busy.err.find("not now: connections are being handed off") != std::string::npos);

	acknowledge.send();
	CHECK(wait_until([&] { return handoff::handoff_counts(b.status("ext"), "ext").received == 1; }, 20s));
	RunResult done = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", done.describe());
	CHECK(done.exit_code == 0);
	CHECK(b.status().value("pid", 0) == b.pid());

	// The connection the sender took lives on in the receiver.
	answer.send();
	std::string got;
	auto deadline = Clock::now() + 20s;
	while (got.find('\n') == std::string::npos && Clock::now() < deadline) {
		pollfd p{client.get(), POLLIN, 0};
		char buf[256];
		if (::poll(&p, 1, 1000) == 1) {
			ssize_t n = ::recv(client.get(), buf, sizeof buf, 0);
			if (n <= 0)
				break;
			got.append(buf, static_cast<std::size_t>(n));
		}
	}
	CHECK(got == "served by the successor\n");
	b.stop();
	auto st_receiver = receiver.wait(10s);
	REQUIRE(st_receiver);
	CHECK(describe_status(*st_receiver) == "exited with 0");
}

// Reexec carries only what is at rest: an instance that drains (its worker ignores the drain,
// 30 s to go) or starts (its worker holds READY=1 until told) makes it refuse with exit 7 and
// what is busy, and brokerd keeps its pid and serves on; once it is quiet, the reexec is done.
TEST_CASE("reexec: refused while an instance drains or while one starts and done once it is quiet")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json stubborn = stubborn_service("30s");
	json cfg = config_with({{"web", http_service(1)}, {"stubborn", stubborn}});
	tb.start(cfg);
	std::uint16_t port = socket_port(b.status(), "http");
	std::vector<pid_t> web = sorted_pids(b);
	std::vector<pid_t> held = worker_pids(b.status(), "stubborn");
	REQUIRE(held.size() == 1);
	REQUIRE(wait_until([&] { return ignores(held[0], SIGTERM); }, 20s));
	auto state_of = [&](const std::string &svc) {
		auto insts = instances(b.status(), svc);
		return insts.size() == 1 ? insts[0].value("state", "") : std::string("none");
	};
	auto refused = [&](const std::string &why) {
		RunResult r = brokerctl(b, {"reexec"});
		INFO("brokerctl reexec: ", r.describe());
		CHECK(r.exit_code == 7);
		CHECK(r.err.find("not now: " + why + "; try again once it is done") != std::string::npos);
		CHECK(b.process().running());
		CHECK(b.status().value("pid", 0) == b.pid());
		CHECK(generation_answering(port) == 1);
		CHECK(sorted_pids(b) == web);
	};
	auto done = [&] {
		RunResult r = brokerctl(b, {"reexec"});
		INFO("brokerctl reexec: ", r.describe());
		CHECK(r.exit_code == 0);
		CHECK(r.out.find("pid " + std::to_string(b.pid())) != std::string::npos);
		CHECK(b.status().value("pid", 0) == b.pid());
		CHECK(generation_answering(port) == 1);
		CHECK(sorted_pids(b) == web);
	};

	// Draining: brokerctl stop waits for the drain, which the worker ignores.
	Process stop = Process::fork_run([&] { return brokerctl(b, {"stop", "stubborn"}).exit_code; });
	REQUIRE(wait_until([&] { return state_of("stubborn") == "draining"; }, 20s));
	refused("instance stubborn/1/0 is draining");
	CHECK(worker_pids(b.status(), "stubborn") == held);
	REQUIRE(kill9(held[0]));
	auto stopped = stop.wait(20s);
	REQUIRE(stopped);
	CHECK(describe_status(*stopped) == "exited with 0");
	done();

	// Starting: a reload adds a service whose worker sends READY=1 only once the test writes
	// to its FIFO.
	const std::string fifo = b.path("go");
	REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
	const char *slow_script = R"(
import os, socket, sys, time
with open(sys.argv[1], "rb") as f:
    f.read(1)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", addr)
while True:
    time.sleep(1000)
)";
	json slow = service({"python3", "-c", slow_script, fifo}, {"http"}, 1, "notify");
	slow["start_timeout"] = "60s";
	cfg["services"]["slow"] = slow;
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump(2));
	RunResult r = brokerctl(b, {"reload"});
	INFO("brokerctl reload: ", r.describe());
	REQUIRE(r.exit_code == 0);
	REQUIRE(state_of("slow") == "starting");
	refused("instance slow/1/0 is starting");
	// The worker opens the FIFO to read it: until then, a non-blocking open for writing fails.
	UniqueFd go;
	REQUIRE(wait_until(
		[&] {
			go.reset(::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
			return bool(go);
		},
		20s));
	REQUIRE(::write(go.get(), "x", 1) == 1);
	REQUIRE(wait_until([&] { return state_of("slow") == "ready"; }, 20s));
	std::vector<pid_t> slow_pids = worker_pids(b.status(), "slow");
	done();
	CHECK(worker_pids(b.status(), "slow") == slow_pids);
	b.stop();
}

namespace {

// The pid a check script wrote to `path` ($$: the check itself), once it is there; 0 if not in 20 s.
pid_t check_pid(const std::string &path)
{
	pid_t pid = 0;
	wait_until(
		[&] {
			std::string text = read_file(path);
			if (text.find('\n') == std::string::npos)
				return false;
			pid = static_cast<pid_t>(std::stoi(text));
			return true;
		},
		20s);
	return pid;
}

// Killed and reaped: not even a zombie is left.
bool gone(pid_t pid)
{
	return ::kill(pid, 0) < 0 && errno == ESRCH;
}

// The pipes and pidfds brokerd holds: a check adds its output pipe and its pidfd.
std::size_t pipes_and_pidfds(pid_t pid)
{
	std::size_t n = 0;
	for (const auto &[fd, target] : proc_fds(pid))
		if (target.starts_with("pipe:") || target.starts_with("anon_inode:[pidfd]") || target.starts_with("pidfd:"))
			++n;
	return n;
}

} // namespace

// The check of the new binary runs off brokerd's loop: a binary that takes 3 s to answer it
// leaves Status answered at once, and a second Reexec refused at once; then the reexec is done.
TEST_CASE("reexec: brokerd serves on while the new binary is checked and refuses a second reexec meanwhile")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(1)}}));
	std::uint16_t port = socket_port(b.status(), "http");
	std::vector<pid_t> workers = sorted_pids(b);
	const std::string checking = b.path("checking");
	std::string slow = write_program(b, "slow-brokerd",
	                                 "#!/bin/sh\nif [ \"$1\" = --check-state ]; then\n  echo $$ > " + checking +
	                                         "\n  /bin/sleep 3\nfi\nexec " + env("BROKERD") + " \"$@\"\n");

	const std::string out = b.path("reexec.out");
	Process reexec = Process::fork_run([&] {
		RunResult r = brokerctl(b, {"reexec", "--binary", slow});
		write_file(out, r.describe());
		return r.exit_code;
	});
	REQUIRE(check_pid(checking) > 0);

	auto t0 = Clock::now();
	json st = b.status();
	auto took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0);
	CHECK_MESSAGE(took < 1s, "Status took ", took.count(), " ms while the binary was being checked");
	CHECK(reexec.running()); // the check was still going on
	RunResult second = brokerctl(b, {"reexec"});
	INFO("second brokerctl reexec: ", second.describe());
	CHECK(second.exit_code == 7);
	CHECK(second.err.find("a reexec is already being checked") != std::string::npos);
	CHECK(reexec.running());

	auto done = reexec.wait(30s);
	INFO("brokerctl reexec: ", read_file(out));
	REQUIRE(done);
	CHECK(describe_status(*done) == "exited with 0");
	CHECK(read_file(out).find("pid " + std::to_string(b.pid())) != std::string::npos);
	st = b.status();
	CHECK(st.value("pid", 0) == b.pid());
	CHECK(sorted_pids(b) == workers);
	CHECK(generation_answering(port) == 1);
	CHECK(b.log().find("re-executed: brokerd") != std::string::npos);
	b.stop();
}

// A check that never answers: its caller going away drops the reexec (the check is killed and
// reaped at once, and the next reexec goes ahead); a SIGTERM during it makes brokerd shut down
// at once, the caller told so, the check killed and reaped.
TEST_CASE("reexec: a check whose caller goes away is dropped and a shutdown kills the check")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(1)}}));
	std::vector<pid_t> workers = sorted_pids(b);
	const std::string checking = b.path("checking");
	std::string hang = write_program(b, "hanging-brokerd", "#!/bin/sh\necho $$ > " + checking + "\nexec /bin/sleep 60\n");

	// The caller goes away: the check is killed and reaped, and its pipe and pidfd closed.
	const std::size_t fds = pipes_and_pidfds(b.pid());
	std::optional<vl::SyncClient> caller(std::in_place, b.control_path(), 10s);
	caller->send(vl::make_call("io.brokerd.Control.Reexec", {{"binary", hang}}));
	pid_t check = check_pid(checking);
	REQUIRE(check > 0);
	CHECK(pipes_and_pidfds(b.pid()) == fds + 2);
	caller.reset();
	CHECK(wait_until([&] { return b.log().find("its caller went away") != std::string::npos; }, 3s));
	CHECK(gone(check));
	CHECK(pipes_and_pidfds(b.pid()) == fds);
	CHECK(b.status().value("pid", 0) == b.pid());
	RunResult next = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", next.describe());
	CHECK(next.exit_code == 0);
	CHECK(sorted_pids(b) == workers);

	// SIGTERM during the check.
	REQUIRE(::unlink(checking.c_str()) == 0);
	const std::string err = b.path("reexec.err");
	Process reexec = Process::fork_run([&] {
		RunResult r = brokerctl(b, {"reexec", "--binary", hang});
		write_file(err, r.err);
		return r.exit_code;
	});
	check = check_pid(checking);
	REQUIRE(check > 0);
	CHECK(b.shut_down());
	CHECK(gone(check));
	b.check_strays();
	auto told = reexec.wait(20s);
	INFO("brokerctl reexec: ", read_file(err));
	REQUIRE(told);
	CHECK(describe_status(*told) == "exited with 7");
	CHECK(read_file(err).find("brokerd is shutting down") != std::string::npos);
}

// The loop runs during the check, so something may begin meanwhile: a drain that starts while
// the binary is checked makes the reexec refuse once the check is done, as it would have at once.
TEST_CASE("reexec: a drain that begins while the binary is checked makes the reexec refuse")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(1)}, {"stubborn", stubborn_service("30s")}}));
	std::vector<pid_t> held = worker_pids(b.status(), "stubborn");
	REQUIRE(held.size() == 1);
	REQUIRE(wait_until([&] { return ignores(held[0], SIGTERM); }, 20s));
	// The check waits for a line on a FIFO: it answers once the drain has begun.
	const std::string checking = b.path("checking"), go = b.path("go");
	REQUIRE(::mkfifo(go.c_str(), 0600) == 0);
	std::string held_back = write_program(b, "held-brokerd",
	                                      "#!/bin/sh\nif [ \"$1\" = --check-state ]; then\n  echo $$ > " + checking +
	                                              "\n  read line < " + go + "\nfi\nexec " + env("BROKERD") + " \"$@\"\n");

	const std::string err = b.path("reexec.err");
	Process reexec = Process::fork_run([&] {
		RunResult r = brokerctl(b, {"reexec", "--binary", held_back});
		write_file(err, r.err);
		return r.exit_code;
	});
	REQUIRE(check_pid(checking) > 0);
	Process stop = Process::fork_run([&] { return brokerctl(b, {"stop", "stubborn"}).exit_code; });
	REQUIRE(wait_until([&] { return instances(b.status(), "stubborn").at(0).value("state", "") == "draining"; }, 20s));
	UniqueFd fifo;
	REQUIRE(wait_until(
		[&] {
			fifo.reset(::open(go.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
			return bool(fifo);
		},
		20s));
	REQUIRE(::write(fifo.get(), "go\n", 3) == 3);

	auto refused = reexec.wait(30s);
	INFO("brokerctl reexec: ", read_file(err));
	REQUIRE(refused);
	CHECK(describe_status(*refused) == "exited with 7");
	CHECK(read_file(err).find("not now: instance stubborn/1/0 is draining; try again once it is done") !=
	      std::string::npos);
	CHECK(b.status().value("pid", 0) == b.pid());
	CHECK(b.log().find("re-executing") == std::string::npos);
	REQUIRE(kill9(held[0]));
	auto stopped = stop.wait(20s);
	REQUIRE(stopped);
	CHECK(describe_status(*stopped) == "exited with 0");
	b.stop();
}
