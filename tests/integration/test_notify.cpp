// Integration: what workers report (STATUS=, MAINPID=, Worker.Status) is checked as docs/protocol.md says.
#include "harness.hpp"
#include "../skip.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <cstdio>
#include <string>

#include <fcntl.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace itest;
using proto::varlink::SyncClient;

namespace {

// Forks a child that waits in the instance's session, sends the datagram given in hex (with
// {child} and {child32} for the child's pid and that pid plus 2^32), then READY=1, and waits.
const char *const kNotifier = R"(
import os, signal, socket, sys
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
child = os.fork()
if child == 0:
    while True:
        signal.pause()
msg = bytes.fromhex(sys.argv[1])
msg = msg.replace(b"{child32}", str(child + 2**32).encode()).replace(b"{child}", str(child).encode())
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(msg, addr)
s.sendto(b"READY=1", addr)
while True:
    signal.pause()
)";

// Sends one datagram to an abstract "@name" and waits until brokerd has read it (until then it
// counts against the sender's send buffer). Returns 0, or which step failed.
int send_notify(const std::string &address, const std::string &message)
{
	UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path + 1, address.data() + 1, address.size() - 1);
	auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
	if (::sendto(s.get(), message.data(), message.size(), 0, reinterpret_cast<sockaddr *>(&sa), len) < 0)
		return 1;
	int unread = -1;
	return wait_until([&] { return ::ioctl(s.get(), SIOCOUTQ, &unread) == 0 && unread == 0; }, 20s) ? 0 : 2;
}

// A notify worker that never speaks for itself until told: a child it forked (in its session, not
// its main process) sends READY=1 and STATUS=, and once brokerd has read that the worker writes
// "CHILD-PID WAIT-STATUS" to argv[1]; it sends READY=1 itself once the fifo argv[2] is opened
// and closed by the test.
const char *const kQuietWorker = R"(
import fcntl, os, signal, socket, struct, sys, termios, time
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
def send(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg, addr)
    deadline = time.monotonic() + 20
    while struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\0" * 4))[0] != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
child = os.fork()
if child == 0:
    os._exit(0 if send(b"READY=1\nSTATUS=from a child") else 1)
_, st = os.waitpid(child, 0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d %d" % (child, st))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
with open(sys.argv[2]) as f:
    f.read()
send(b"READY=1")
while True:
    signal.pause()
)";

std::string hex(const std::string &bytes)
{
	static const char digits[] = "0123456789abcdef";
	std::string out;
	for (unsigned char c : bytes) {
		out += digits[c >> 4];
		out += digits[c & 15];
	}
	return out;
}

} // namespace

TEST_CASE("notify socket: MAINPID= is a whole pid of the session; STATUS= is one line of valid UTF-8, cut on a character")
{
	std::string two_byte = "a";
	for (int i = 0; i < 300; i++)
		two_byte += "\xC3\xA9";
	struct Case {
		std::string name;
		std::string message;
		bool adopted;                      // the child became the main process (integration-forking
		                                   // has the cases where it does)
		std::optional<std::string> status; // what Status shows
	};
	const Case cases[] = {
		{"MAINPID= with a suffix", "MAINPID={child}xyz", false, {}},
		{"MAINPID= beyond pid_t", "MAINPID={child32}", false, {}},
		{"MAINPID= with a sign", "MAINPID=+{child}", false, {}},
		{"STATUS= plain", "STATUS=serving", false, "serving"},
		{"STATUS= longer than 512 bytes", "STATUS=" + two_byte, false, two_byte.substr(0, 511)},
		{"STATUS= not UTF-8", "STATUS=caf\xC3", false, {}},
		{"STATUS= with an escape sequence", "STATUS=\x1B[31mred", false, {}},
	};
	for (const Case &c : cases) {
		SUBCASE(c.name.c_str()) {
		Broker b;
		BROKER_CONTEXT(b);
		b.start({{"sockets", {{"http", tcp_socket()}}},
		         {"services", {{"w", service({"python3", "-c", kNotifier, hex(c.message)}, {"http"}, 1, "notify")}}}});
		json inst = instances(b.status("w"), "w").at(0);
		CHECK(inst.value("state", "") == "ready");
		if (c.status)
			CHECK(inst.value("status", "") == *c.status);
		else
			CHECK(!inst.contains("status"));
		bool adopted = b.log().find("main pid is now") != std::string::npos;
		CHECK(adopted == c.adopted);
		if (!c.adopted && !c.status)
			CHECK(b.log().find("ignoring") != std::string::npos);
		b.stop();
		}
	}
}

TEST_CASE("Worker.Status refuses a text that is not one line of valid UTF-8")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root: the service's register rule names root");
	Broker b;
	BROKER_CONTEXT(b);
	json ext = {{"instances", 1}, {"ready", "broker"}, {"register", {{"users", {"root"}}}}};
	b.start({{"services", {{"ext", ext}}}});
	struct Case {
		const char *name;
		std::string text;
		bool taken;
	};
	const Case cases[] = {
		{"plain", "serving", true},
		{"escape sequence", "\x1B[31mred", false},
		{"newline", "one\ntwo", false},
	};
	// A worker of its own: brokerd stops a registered worker when the service stops.
	SpawnOptions so;
	so.stderr_path = b.path("worker.log");
	Process worker = Process::fork_run(
		[&] {
			::signal(SIGTERM, SIG_DFL); // how brokerd stops it, not a crash of the test
			SyncClient c(b.control_path(), std::chrono::seconds(10));
			c.call("io.brokerd.Worker.Hello", {{"service", "ext"}, {"version", "1"}});
			int wrong = 0;
			for (const Case &t : cases) {
				std::string error;
				try {
					c.call("io.brokerd.Worker.Status", {{"text", t.text}});
				} catch (const proto::varlink::Error &e) {
					error = e.varlink_error();
				}
				bool ok = error == (t.taken ? "" : "org.varlink.service.InvalidParameter");
				std::fprintf(stderr, "%s: %s%s\n", t.name, error.empty() ? "taken" : error.c_str(), ok ? "" : " (wrong)");
				wrong += !ok;
			}
			// Stays registered until brokerd stops it.
			pollfd p{c.stream().fd(), POLLIN, 0};
			return ::poll(&p, 1, -1) >= 0 ? wrong : 100;
		},
		so);
	CHECK(wait_until([&] { return read_file(b.path("worker.log")).find("newline") != std::string::npos; }, 10s));
	INFO("worker: ", read_file(b.path("worker.log")));
	CHECK(read_file(b.path("worker.log")).find("wrong") == std::string::npos);
	CHECK(instances(b.status("ext"), "ext").at(0).value("status", "") == "serving");
	b.stop();
}

TEST_CASE("a notify message from a process that took a main pid over is not the instance's")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root to choose the next pid (ns_last_pid)");
	Broker b;
	BROKER_CONTEXT(b);
	std::string pid_file = b.path("daemon.pids");
	std::string worker = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "itest-forking-worker").string();
	b.start({{"sockets", {{"tcp", tcp_socket()}}},
	         {"services", {{"fork", service({worker, pid_file}, {"tcp"}, 1, "notify")}}}});
	pid_t daemon = 0;
	REQUIRE(wait_until([&] { return (std::istringstream(read_file(pid_file)) >> daemon) && daemon > 0; }, 20s));
	REQUIRE(wait_until([&] { return instances(b.status("fork"), "fork").at(0).value("pid", 0) == daemon; }, 20s));
	std::string notify = notify_address(daemon);
	REQUIRE(notify.starts_with("@"));

	// While brokerd is stopped, the main process dies and another process gets its pid (the
	// daemon was reparented to this test, which reaps it), and reports as if it were it.
	REQUIRE(::kill(b.pid(), SIGSTOP) == 0);
	REQUIRE(::kill(daemon, SIGKILL) == 0);
	REQUIRE(::waitpid(daemon, nullptr, 0) == daemon);
	bool sent = false;
	for (int attempt = 0; attempt < 5 && !sent; attempt++) {
		std::ofstream("/proc/sys/kernel/ns_last_pid") << daemon - 1;
		int ready[2];
		REQUIRE(::pipe2(ready, O_CLOEXEC) == 0);
		UniqueFd ready_rd(ready[0]), ready_wr(ready[1]);
		Process impostor = Process::fork_run([&] {
			::signal(SIGTERM, SIG_DFL);
			if (::getpid() != daemon)
				return 3;
			UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
			sockaddr_un sa{};
			sa.sun_family = AF_UNIX;
			std::memcpy(sa.sun_path + 1, notify.data() + 1, notify.size() - 1);
			auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + notify.size());
			const char msg[] = "STATUS=taken over";
			if (::sendto(s.get(), msg, sizeof msg - 1, 0, reinterpret_cast<sockaddr *>(&sa), len) < 0)
				return 4;
			char byte = 1;
			if (::write(ready_wr.get(), &byte, 1) != 1)
				return 5;
			// Until brokerd has read it.
			int unread = -1;
			return wait_until([&] { return ::ioctl(s.get(), SIOCOUTQ, &unread) == 0 && unread == 0; }, 20s) ? 0 : 6;
		});
		ready_wr.reset();
		char byte = 0;
		sent = ::read(ready_rd.get(), &byte, 1) == 1;
		if (sent) {
			REQUIRE(::kill(b.pid(), SIGCONT) == 0);
			auto st = impostor.wait(20s);
			CHECK((st && WIFEXITED(*st) && WEXITSTATUS(*st) == 0));
		}
	}
	::kill(b.pid(), SIGCONT);
	REQUIRE_MESSAGE(sent, "could not get pid ", daemon, " again");
	for (const json &i : instances(b.status("fork"), "fork"))
		CHECK(i.value("status", "") != "taken over");
	MESSAGE("brokerd on the impostor: ", [&] {
		std::string log = b.log();
		std::size_t at = log.find("pid " + std::to_string(daemon) + ",");
		return at == std::string::npos ? std::string("(nothing)") : log.substr(at, log.find('\n', at) - at);
	}());
	b.stop();
}

TEST_CASE("notify socket: READY=1 from a process that is not the instance's own does not make it ready")
{
	if (::geteuid() != 0)
		TEST_SKIP("sends as nobody: needs root");
	Broker b;
	BROKER_CONTEXT(b);
	std::string child_file = b.path("child"), go = b.path("go");
	REQUIRE(::mkfifo(go.c_str(), 0600) == 0);
	BrokerOptions opts;
	opts.wait_ready = false; // brokerd says READY=1 once its instance is ready
	b.start({{"sockets", {{"http", tcp_socket()}}},
	         {"services", {{"w", service({"python3", "-c", kQuietWorker, child_file, go}, {"http"}, 1, "notify")}}}},
	        opts);
	pid_t child = 0;
	int child_status = -1;
	REQUIRE(wait_until([&] { return static_cast<bool>(std::istringstream(read_file(child_file)) >> child >> child_status); }, 20s));
	CHECK(child_status == 0);
	json inst = instances(b.status("w"), "w").at(0);
	pid_t worker = inst.value("pid", 0);
	std::string address = notify_address(worker);
	REQUIRE(address.starts_with("@"));

	// Besides the worker's own child: this test (root, outside the instance's session) and a
	// process of another user.
	CHECK(send_notify(address, "READY=1\nSTATUS=from the test") == 0);
	SpawnOptions nobody;
	nobody.as_nobody = true;
	pid_t stranger = 0;
	Process p = Process::fork_run([&] { return send_notify(address, "READY=1\nSTATUS=from nobody"); }, nobody);
	stranger = p.pid();
	auto st = p.wait(20s);
	CHECK((st && WIFEXITED(*st) && WEXITSTATUS(*st) == 0));

	inst = instances(b.status("w"), "w").at(0);
	CHECK(inst.value("state", "") == "starting");
	CHECK(!inst.contains("status"));
	for (pid_t sender : {child, ::getpid(), stranger}) {
		CAPTURE(sender);
		CHECK(b.log().find("notify socket: message from pid " + std::to_string(sender) + ", which is no instance, ignoring") !=
		      std::string::npos);
	}

	// The worker itself: ready.
	REQUIRE(wait_until([&] { return UniqueFd(::open(go.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)).get() >= 0; }, 20s));
	b.wait_ready(20s);
	inst = instances(b.status("w"), "w").at(0);
	CHECK(inst.value("state", "") == "ready");
	CHECK(inst.value("pid", 0) == worker);
	b.stop();
}
