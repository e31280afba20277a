// Integration: fds a peer gives brokerd never close on its event loop, so no local user can stop it.
#include "harness.hpp"
#include "../skip.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

using namespace itest;
using proto::varlink::SyncClient;

namespace {

#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83
#endif

// Well below the freeze (a close() lingering for 60 s), well above a Status on a loaded machine.
constexpr auto kStatusBound = 1000ms;

// A socket whose last close() blocks for 60 s: a TCP connection on loopback with SO_LINGER
// {1, 60}, its send buffer full, and a peer that never reads (held by the attacker until the end).
struct Lingering {
	UniqueFd end;
	UniqueFd listener;
	UniqueFd peer;
};

Lingering lingering_connection()
{
	Lingering l;
	l.listener.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	int small = 4096;
	::setsockopt(l.listener.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
	sockaddr_in sa{};
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof sa;
	if (::bind(l.listener.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) < 0 || ::listen(l.listener.get(), 1) < 0 ||
	    ::getsockname(l.listener.get(), reinterpret_cast<sockaddr *>(&sa), &len) < 0)
		throw std::runtime_error(std::string("tcp listener: ") + std::strerror(errno));
	l.end.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	::setsockopt(l.end.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
	if (::connect(l.end.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) < 0)
		throw std::runtime_error(std::string("tcp connect: ") + std::strerror(errno));
	l.peer.reset(::accept4(l.listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
	linger lg{1, 60};
	::setsockopt(l.end.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	char junk[4096] = {};
	std::size_t queued = 0;
	for (;;) {
		ssize_t n = ::send(l.end.get(), junk, sizeof junk, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n <= 0)
			break;
		queued += static_cast<std::size_t>(n);
	}
	if (queued == 0)
		throw std::runtime_error("the lingering socket took no data");
	return l;
}

// One message with one fd in a single sendmsg: 0, or -errno (EPERM: the receiver refuses fds).
int send_with_fd(int sock, const std::string &data, int fd, const sockaddr_un *to = nullptr, socklen_t to_len = 0)
{
	iovec iov{const_cast<char *>(data.data()), data.size()};
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
	msghdr msg{};
	msg.msg_name = const_cast<sockaddr_un *>(to);
	msg.msg_namelen = to_len;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control;
	msg.msg_controllen = sizeof control;
	cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
	return ::sendmsg(sock, &msg, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

// The lingering socket in flight inside a unix socket: whoever closes that socket last drops
// the last reference to the lingering one, and its close() blocks, whatever the order in which
// the copies close.
UniqueFd carrier_of(UniqueFd lingering)
{
	int sv[2];
	if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		throw std::runtime_error(std::string("socketpair: ") + std::strerror(errno));
	UniqueFd sender(sv[0]), carrier(sv[1]);
	if (int r = send_with_fd(sender.get(), "x", lingering.get()); r < 0)
		throw std::runtime_error(std::string("sendmsg: ") + std::strerror(-r));
	return carrier;
}

UniqueFd connect_control(const std::string &path)
{
	UniqueFd fd = unix_connect(path);
	if (!fd)
		throw std::runtime_error("connect " + path + ": " + std::strerror(errno));
	timeval tv{30, 0};
	::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	return fd;
}

void send_all(int fd, const std::string &data)
{
	for (std::size_t at = 0; at < data.size();) {
		ssize_t n = ::send(fd, data.data() + at, data.size() - at, MSG_NOSIGNAL);
		if (n < 0)
			throw std::runtime_error(std::string("send: ") + std::strerror(errno));
		at += static_cast<std::size_t>(n);
	}
}

// The next message brokerd sends, or nullopt at the end of the stream.
std::optional<json> read_message(int fd, std::string &buf)
{
	for (;;) {
		if (std::size_t nul = buf.find('\0'); nul != std::string::npos) {
			json j = json::parse(buf.substr(0, nul), nullptr, false);
			buf.erase(0, nul + 1);
			return j;
		}
		char chunk[4096];
		ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
		if (n <= 0)
			return std::nullopt;
		buf.append(chunk, static_cast<std::size_t>(n));
	}
}

std::string call(std::string_view method, const json &parameters = json::object(), bool oneway = false)
{
	json c = {{"method", method}, {"parameters", parameters}};
	if (oneway)
		c["oneway"] = true;
	return c.dump() + std::string(1, '\0');
}

// n oneway calls in one buffer: brokerd takes a few dozen a turn of its loop, so whatever comes
// after them waits.
std::string pipelined(int n)
{
	std::string calls;
	for (int i = 0; i < n; i++)
		calls += call("org.varlink.service.GetInfo", json::object(), true);
	return calls;
}

// What an attack ends with.
enum Outcome : char { kRefused = 'R', kDelivered = 'D' };

// A new carrier of a lingering socket, whose peer stays open until the attacker exits.
using NewCarrier = std::function<UniqueFd()>;

// Closes our copy of a carrier just sent, on another thread. True when that close returned at
// once: ours was not the last copy, brokerd's is. (When brokerd was first, ours lingers.)
bool closed_before_brokerd(UniqueFd carrier)
{
	auto done = std::make_shared<std::atomic<bool>>(false);
	std::thread([fd = carrier.release(), done] {
		::close(fd);
		*done = true;
	}).detach();
	return wait_until([&] { return done->load(); }, 300ms);
}

// Where brokerd closes what it received at once, our copy must be closed before brokerd reads
// the message: a race, so a few attempts, each behind pipelined calls.
Outcome attempts(const char *where, const NewCarrier &new_carrier, const std::function<int(int fd)> &send_fd)
{
	for (int attempt = 1; attempt <= 10; attempt++) {
		UniqueFd carrier = new_carrier();
		int r = send_fd(carrier.get());
		std::fprintf(stderr, "attacker: attempt %d, the fd on the %s: %s\n", attempt, where,
		             r == 0 ? "sent" : std::strerror(-r));
		if (r == -EPERM) {
			// Ours is the only copy: it stays open until we exit, where a close never lingers.
			(void)carrier.release();
			return kRefused;
		}
		if (r < 0)
			throw std::runtime_error(std::string("sendmsg: ") + std::strerror(-r));
		if (closed_before_brokerd(std::move(carrier)))
			return kDelivered;
	}
	throw std::runtime_error("brokerd closed its copy first every time");
}

// Control socket, before Hello: 2000 pipelined oneway calls, then one carrying the carrier.
Outcome attack_control(const std::string &control, const NewCarrier &new_carrier)
{
	std::vector<UniqueFd> conns;
	Outcome o = attempts("control connection", new_carrier, [&](int fd) {
		conns.push_back(connect_control(control));
		send_all(conns.back().get(), pipelined(2000));
		return send_with_fd(conns.back().get(), call("org.varlink.service.GetInfo", {{"fd", 0}}, true), fd);
	});
	std::string buf;
	if (o == kDelivered) {
		// brokerd closes the connection once it reaches the call with the fd.
		while (read_message(conns.back().get(), buf)) {
		}
		return o;
	}
	// Refused by the kernel: nothing reached brokerd, and the connection goes on.
	send_all(conns.back().get(), call("org.varlink.service.GetInfo"));
	if (!read_message(conns.back().get(), buf))
		throw std::runtime_error("no reply to GetInfo after the refused fd");
	return o;
}

// Notify socket: datagrams from a process that is no instance, then one with the carrier, while
// connections with 2000 pipelined calls each keep brokerd busy.
Outcome attack_notify(const std::string &control, const std::string &address, const NewCarrier &new_carrier)
{
	UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path + 1, address.data() + 1, address.size() - 1);
	auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
	timeval tv{30, 0};
	::setsockopt(s.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	std::vector<UniqueFd> busy;
	Outcome o = attempts("notify socket", new_carrier, [&](int fd) {
		busy.clear();
		for (int i = 0; i < 8; i++) {
			busy.push_back(connect_control(control));
			send_all(busy.back().get(), pipelined(2000));
		}
		for (int i = 0; i < 100; i++)
			if (::sendto(s.get(), "STATUS=x", 8, 0, reinterpret_cast<sockaddr *>(&sa), len) < 0)
				throw std::runtime_error(std::string("sendto: ") + std::strerror(errno));
		return send_with_fd(s.get(), "READY=1", fd, &sa, len);
	});
	// Until brokerd has read every datagram: they count against our send buffer until then.
	auto unread = [&] {
		int n = 0;
		return ::ioctl(s.get(), SIOCOUTQ, &n) == 0 ? n : -1;
	};
	if (!wait_until([&] { return unread() == 0; }, 30s))
		throw std::runtime_error("brokerd did not read the datagrams");
	return o;
}

// A registered worker: brokerd keeps the fds it sends until their message is whole, so the
// attack needs no race: the first byte carries the fd, our copy closes, the rest follows.
Outcome attack_worker(const std::string &control, UniqueFd carrier, const std::string &message)
{
	// brokerd stops a registered worker whose connection it closes; this one carries on.
	::signal(SIGTERM, SIG_IGN);
	UniqueFd c = connect_control(control);
	std::string buf;
	send_all(c.get(), call("io.brokerd.Worker.Hello", {{"service", "ext"}, {"version", "1"}}));
	auto hello = read_message(c.get(), buf);
	if (!hello || hello->contains("error"))
		throw std::runtime_error("Hello: " + (hello ? hello->dump() : std::string("no reply")));
	json events = {{"method", "io.brokerd.Worker.Events"}, {"more", true}};
	send_all(c.get(), call("io.brokerd.Worker.Ready", json::object(), true) + events.dump() + std::string(1, '\0'));
	if (int r = send_with_fd(c.get(), message.substr(0, 1), carrier.get()); r < 0)
		throw std::runtime_error(std::string("sendmsg: ") + std::strerror(-r));
	if (!closed_before_brokerd(std::move(carrier)))
		throw std::runtime_error("brokerd dropped the fd of an incomplete message");
	send_all(c.get(), message.substr(1) + call("io.brokerd.Worker.Status", {{"text", "done"}}));
	// Until brokerd has handled the message: the Status after it is answered (or, for a
	// malformed message, the connection closed).
	while (auto m = read_message(c.get(), buf)) {
		std::fprintf(stderr, "attacker: %s\n", m->dump().c_str());
		if (!m->value("continues", false))
			break;
	}
	return kDelivered;
}

// Times Status calls from root while `attack` runs as nobody, and for 20 calls after it is done
// (while the attacker still holds the lingering socket's peer). Returns the attack's outcome.
std::optional<Outcome> run_attack(Broker &b, const std::function<Outcome(const NewCarrier &)> &attack)
{
	int report[2], hold[2];
	REQUIRE(::pipe2(report, O_CLOEXEC) == 0);
	REQUIRE(::pipe2(hold, O_CLOEXEC) == 0);
	UniqueFd report_rd(report[0]), report_wr(report[1]), hold_rd(hold[0]), hold_wr(hold[1]);
	SpawnOptions nobody;
	nobody.as_nobody = true;
	nobody.stderr_path = b.path("attacker.log");
	std::fflush(nullptr); // the child flushes what it inherits
	Process attacker = Process::fork_run(
		[&] {
			hold_wr.reset();
			// Their peers stay open, unread, until the test is done measuring.
			std::vector<Lingering> lingering;
			char outcome = attack([&] {
				lingering.push_back(lingering_connection());
				return carrier_of(std::move(lingering.back().end));
			});
			if (::write(report_wr.get(), &outcome, 1) != 1)
				return 2;
			char byte;
			return ::read(hold_rd.get(), &byte, 1) == 0 ? 0 : 3; // until the test is done measuring
		},
		nobody);
	report_wr.reset();
	hold_rd.reset();

	SyncClient client(b.control_path(), std::chrono::seconds(5));
	Clock::duration worst{};
	int calls = 0, after = 0;
	std::optional<Outcome> outcome;
	auto deadline = Clock::now() + 60s;
	while (after < 20 && Clock::now() < deadline) {
		auto t0 = Clock::now();
		try {
			client.call("io.brokerd.Control.Status");
		} catch (const std::exception &e) {
			FAIL_CHECK("Status failed after ", calls, " calls: ", std::string(e.what()));
			break;
		}
		auto took = Clock::now() - t0;
		worst = std::max(worst, took);
		calls++;
		if (took > kStatusBound) {
			FAIL_CHECK("Status took ", std::chrono::duration_cast<std::chrono::milliseconds>(took).count(), " ms");
			break;
		}
		pollfd p{report_rd.get(), POLLIN, 0};
		if (outcome) {
			after++;
		} else if (::poll(&p, 1, 0) > 0) {
			char c = 0;
			if (::read(report_rd.get(), &c, 1) != 1) {
				FAIL_CHECK("the attacker failed: ", read_file(b.path("attacker.log")));
				break;
			}
			outcome = static_cast<Outcome>(c);
		}
	}
	MESSAGE("worst Status during the attack: ", std::chrono::duration<double, std::milli>(worst).count(), " ms over ",
	        calls, " calls");
	hold_wr.reset();
	auto st = attacker.wait(10s);
	INFO("attacker: ", read_file(b.path("attacker.log")));
	CHECK(outcome.has_value());
	CHECK(st.has_value());
	return outcome;
}

bool kernel_refuses_fds()
{
	UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	int zero = 0;
	return ::setsockopt(s.get(), SOL_SOCKET, SO_PASSRIGHTS, &zero, sizeof zero) == 0;
}

} // namespace

TEST_CASE("a peer's fd whose close() blocks cannot stop brokerd's event loop")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root to run the attacker as nobody");
	using Attack = std::function<Outcome(const std::string &control, const std::string &notify, const NewCarrier &)>;
	struct Case {
		std::string name;
		Attack attack;
		bool refusable; // the kernel can refuse these fds up front (SO_PASSRIGHTS)
	};
	auto worker = [](std::string message) -> Attack {
		return [message](const std::string &control, const std::string &, const NewCarrier &carrier) {
			return attack_worker(control, carrier(), message);
		};
	};
	const Case cases[] = {
		{"control socket, before Hello",
		 [](const std::string &control, const std::string &, const NewCarrier &carrier) { return attack_control(control, carrier); },
		 true},
		{"notify socket",
		 [](const std::string &control, const std::string &notify, const NewCarrier &carrier) {
			 return attack_notify(control, notify, carrier);
		 },
		 true},
		{"a worker's handoff that nobody takes",
		 worker(call("io.brokerd.Worker.Handoff", {{"batch", 1}, {"connections", {{{"fd", 0}}}}}, true)), false},
		{"a worker's call that takes no fds", worker(call("io.brokerd.Worker.Status", {{"text", "x"}, {"fd", 0}})), false},
		{"a worker's malformed message", worker("{\"method\":\"io.brokerd.Worker.Status\",\"parameters\":{\"fd\":0}"
		                                        "\"broken\"}" + std::string(1, '\0')), false},
	};
	for (const Case &c : cases) {
		SUBCASE(c.name.c_str()) {
		Broker b;
		BROKER_CONTEXT(b);
		json ext = {{"instances", 1}, {"ready", "broker"}, {"register", {{"users", {"nobody"}}}}};
		b.start({{"sockets", {{"http", tcp_socket()}}},
		         {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 1, "broker")}, {"ext", ext}}}});
		std::vector<pid_t> pids = worker_pids(b.status("web"), "web");
		REQUIRE(pids.size() == 1);
		std::string notify = notify_address(pids[0]);
		REQUIRE(notify.starts_with("@"));

		std::size_t fds_before = fd_count(b.pid());
		std::optional<Outcome> outcome = run_attack(b, [&](const NewCarrier &carrier) { return c.attack(b.control_path(), notify, carrier); });
		// Once the attacker is gone, so is its lingering socket: everything brokerd took closes.
		std::size_t fds_after = 0;
		INFO("brokerd's fds: ", fds_before, " before, ", fds_after, " after");
		CHECK(wait_until([&] { return (fds_after = fd_count(b.pid())) <= fds_before; }, 20s));
		if (c.refusable && kernel_refuses_fds())
			CHECK(outcome == kRefused);
		else if (c.refusable)
			record_skip("the kernel has no SO_PASSRIGHTS (Linux 6.16): not checked that it refused the fd up front");
		CHECK(instances(b.status(), "web").size() == 1);
		b.stop();
		}
	}
}

TEST_CASE("a flood of bad notify datagrams cannot flood brokerd's log")
{
	Broker b;
	BROKER_CONTEXT(b);
	b.start({{"sockets", {{"http", tcp_socket()}}},
	         {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 1, "broker")}}}});
	std::vector<pid_t> pids = worker_pids(b.status("web"), "web");
	REQUIRE(pids.size() == 1);
	std::string address = notify_address(pids[0]);
	REQUIRE(address.starts_with("@"));
	auto lines = [&] {
		std::string log = b.log();
		return static_cast<std::size_t>(std::count(log.begin(), log.end(), '\n'));
	};
	std::size_t before = lines();

	// From the test itself, which is no instance: every datagram is refused with a reason.
	UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path + 1, address.data() + 1, address.size() - 1);
	auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
	constexpr int kDatagrams = 5000;
	for (int i = 0; i < kDatagrams; i++)
		REQUIRE(::sendto(s.get(), "READY=1", 7, 0, reinterpret_cast<sockaddr *>(&sa), len) == 7);
	int unread = -1;
	CHECK(wait_until([&] { return ::ioctl(s.get(), SIOCOUTQ, &unread) == 0 && unread == 0; }, 20s));
	std::size_t logged = lines() - before;
	MESSAGE(logged, " lines for ", kDatagrams, " datagrams");
	CHECK(logged >= 1);
	CHECK(logged < 200);
	b.stop();
}
