// SIGKILL of brokerd under load, then a restart as systemd does it (Restart=on-failure): the new
// brokerd gets the fd store its predecessor filled, serves on the very same listener, and carries
// on with the same workers.
#include "support.hpp"

#include <doctest/doctest.h>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

using namespace utest;

namespace {

// How much a restarted brokerd's RSS may exceed the first one's: both are fresh processes that
// serve the same config, so this is the allocator's slack (larger under AddressSanitizer).
#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kRssMarginKb = 8 * 1024;
#else
constexpr std::size_t kRssMarginKb = 2 * 1024;
#endif

// A connection to 127.0.0.1:port with a whole request written and nothing read yet.
UniqueFd send_request(std::uint16_t port)
{
	UniqueFd fd = tcp_connect(port);
	std::string req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
	REQUIRE(::send(fd.get(), req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
	return fd;
}

// Everything the server sends on `fd` until it closes, or what came by the deadline.
std::string read_to_end(int fd, std::chrono::milliseconds timeout)
{
	std::string out;
	auto deadline = Clock::now() + timeout;
	for (;;) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
		pollfd p{fd, POLLIN, 0};
		if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0)
			return out;
		char buf[4096];
		ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return out;
		if (n > 0)
			out.append(buf, static_cast<std::size_t>(n));
	}
}

// The sockets among the store's names: brokerd also keeps its crash state ("state"), the
// workers' notify socket ("notify"), their output pipes ("pipe.<inode>") and its stop sentinel's
// pipe ("sentinel") there.
std::string stored_sockets(const ServiceManager &manager)
{
	std::vector<std::string> sockets;
	for (const auto &n : manager.names())
		if (n != "state" && n != "notify" && n != "sentinel" && !n.starts_with("pipe."))
			sockets.push_back(n);
	std::sort(sockets.begin(), sockets.end());
	return joined(sockets);
}

std::size_t stored_pipes(const ServiceManager &manager)
{
	std::size_t n = 0;
	for (const auto &name : manager.names())
		n += name.starts_with("pipe.");
	return n;
}

std::vector<pid_t> pids_of(const std::vector<StrayProcess> &procs)
{
	std::vector<pid_t> out;
	for (const auto &p : procs)
		out.push_back(p.pid);
	std::sort(out.begin(), out.end());
	return out;
}

} // namespace

TEST_CASE("crash: SIGKILL of brokerd at rest under load; restarted with its fd store it serves on the same listener with the same workers")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", python_service(2)}}));
	// Before any control connection: brokerd's fds and memory as it serves.
	auto idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	const std::map<int, std::string> start_fds = *idle;
	std::size_t start_rss = rss_kb(b.pid());

	check_serves_alone(b, "web", 1, 2);
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	std::set<std::uint64_t> on = listening_on(port);
	REQUIRE_MESSAGE(on.size() == 1, "listeners on port ", port, ": ", on.size());
	const std::uint64_t listener = *on.begin();
	std::vector<pid_t> workers = running_pids(st, "web");
	REQUIRE(workers.size() == 2);
	// What brokerd bound is in the store, with its crash state, the notify socket and the two
	// workers' stdout and stderr.
	tb.notify.sync();
	REQUIRE(stored_sockets(tb.notify) == "control, http");
	CHECK(stored_pipes(tb.notify) == 4);
	CHECK(inode_of(tb.notify.dup("http").get()) == listener);
	const std::vector<std::string> stored_before = tb.notify.names();
	const std::string events = joined(tb.notify.store_events());

	Load load(b, port, "hello from web gen ", 200);
	// The crash is a window of its own in the load's report: requests must succeed in it too.
	load.begin_upgrade();
	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("survivors of brokerd:\n", describe(survivors));
	// Only the workers ran below brokerd, and they outlive it.
	CHECK(pids_of(survivors) == workers);
	// The store keeps what brokerd put there; nothing else holds the control socket now.
	CHECK(tb.notify.names() == stored_before);

	// A client connecting while no brokerd runs reaches the kept listener, the only one on the
	// port: the kernel queues its connection there until someone accepts it.
	UniqueFd queued = send_request(port);
	CHECK(listening_on(port) == std::set<std::uint64_t>{listener});

	tb.restart();
	load.end_upgrade();
	// Measured as at the first start.
	idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	const std::map<int, std::string> restart_fds = *idle;
	std::size_t restart_rss = rss_kb(b.pid());
	// No more than the first one: that one also held a pidfd for its stop sentinel, its child,
	// which the restarted brokerd carries on with but does not reap.
	CHECK_MESSAGE(restart_fds.size() + 1 == start_fds.size(), "brokerd holds ", restart_fds.size(),
	              " fds after the restart, not ", start_fds.size() - 1, " (the first start's less its sentinel's pidfd):\n",
	              listing(start_fds), "after the restart:\n", listing(restart_fds));
	MESSAGE("brokerd's VmRSS: ", start_rss, " kB at the first start, ", restart_rss, " kB after the restart");
	CHECK(restart_rss <= start_rss + kRssMarginKb);

	// The restarted brokerd took the stored listener back: same socket, origin "fdstore", and it
	// released nothing and stored nothing again.
	st = b.status();
	const json *http = find_named(member(st, "sockets"), "http");
	REQUIRE(http);
	CHECK(http->value("origin", "") == "fdstore");
	CHECK(socket_port(st, "http") == port);
	CHECK(listening_on(port) == std::set<std::uint64_t>{listener});
	CHECK(socket_inodes(b.pid()).count(listener) == 1);
	tb.notify.sync();
	CHECK(tb.notify.names() == stored_before);
	CHECK(joined(tb.notify.store_events()) == events);

	// The request made while brokerd was dead is answered.
	std::string answer = read_to_end(queued.get(), 10s);
	CHECK_MESSAGE(answer.starts_with("HTTP/1.1 200 "), "the request queued while brokerd was dead got: '", answer, "'");
	CHECK(answer.find("hello from web gen 1 ") != std::string::npos);

	check_serves_alone(b, "web", 1, 2);
	// The workers brokerd started before the crash still run, and they are the ones it reports.
	for (pid_t w : workers)
		CHECK_MESSAGE(process_exists(w), "worker ", w, " of the killed brokerd is gone");
	st = b.status();
	CHECK(running_pids(st, "web") == workers);
	CHECK(member(member(st, "recovered"), "kept") == 2);

	// An upgrade after the restart works, under load.
	load.begin_upgrade();
	RunResult up = brokerctl(b, {"upgrade", "web"});
	load.end_upgrade();
	INFO("brokerctl upgrade: ", up.describe());
	CHECK(up.exit_code == 0);
	check_serves_alone(b, "web", 2, 2);
	// Once the old instances are gone, brokerd's fds are what they were after the restart.
	bool settled = wait_until([&] { return (idle = idle_fds(b.pid(), 1s)) && idle->size() == restart_fds.size(); }, 10s);
	CHECK_MESSAGE(settled, "brokerd holds ", idle ? idle->size() : 0, " fds after the upgrade, not ",
	              restart_fds.size(), ":\n", idle ? listing(*idle) : std::string("(never idle)"));

	std::set<int> gens = load.finish_and_check();
	std::vector<std::string> answered;
	for (int g : gens)
		answered.push_back(std::to_string(g));
	// The upgrade drained the re-adopted workers, so gen 2 answered after it.
	CHECK(joined(answered) == "1, 2");

	// None of the killed brokerd's workers is left for the test to end: the new one drained them.
	std::vector<StrayProcess> orphans = b.end_survivors();
	INFO("left of the killed brokerd's workers:\n", describe(orphans));
	CHECK(orphans.empty());
	// stop() checks that the control socket's file is gone: the crash state says the first
	// brokerd bound it, so the restarted one removes it.
	b.stop();
}
