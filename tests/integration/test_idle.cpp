// Integration: an idle brokerd wakes up only to feed a watchdog, and stays small (docs/design.md, "What works means").
#include "harness.hpp"

#include <doctest/doctest.h>

#include <dirent.h>
#include <poll.h>

#include <algorithm>
#include <sstream>

using namespace itest;

namespace {

// What an idle brokerd may cost, as docs/design.md states it: no wake-up at all over the window
// (brokerd runs without a watchdog here, its one periodic timer), and its resident memory.
constexpr auto kWindow = 3s;
constexpr std::uint64_t kMaxRssKb = 8 * 1024;

// AddressSanitizer's own memory (shadow, quarantine, allocator caches) counts in brokerd's RSS: the
// bound is the plain build's.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// One thread's line of /proc/PID/task/TID/status, by name ("voluntary_ctxt_switches").
std::uint64_t status_value(const std::string &status, const std::string &key)
{
	std::istringstream in(status);
	std::string line;
	while (std::getline(in, line))
		if (line.starts_with(key + ":"))
			return std::stoull(line.substr(key.size() + 1));
	FAIL("no ", key, " in ", status);
	return 0;
}

std::vector<std::string> tasks(pid_t pid)
{
	std::vector<std::string> out;
	std::string dir = "/proc/" + std::to_string(pid) + "/task";
	DIR *d = ::opendir(dir.c_str());
	REQUIRE(d != nullptr);
	while (dirent *e = ::readdir(d))
		if (e->d_name[0] != '.')
			out.emplace_back(e->d_name);
	::closedir(d);
	return out;
}

// Every thread's context switches, voluntary and not: each is a wake-up (or a preemption of one).
// voluntary_only: one each time the thread goes back to sleep, its wake-ups without preemptions.
std::map<std::string, std::uint64_t> switches(pid_t pid, bool voluntary_only = false)
{
	std::map<std::string, std::uint64_t> out;
	for (const std::string &tid : tasks(pid)) {
		std::string st = read_file("/proc/" + std::to_string(pid) + "/task/" + tid + "/status");
		out[tid] = status_value(st, "voluntary_ctxt_switches") +
		           (voluntary_only ? 0 : status_value(st, "nonvoluntary_ctxt_switches"));
	}
	return out;
}

std::uint64_t woken(const std::map<std::string, std::uint64_t> &before,
                    const std::map<std::string, std::uint64_t> &after)
{
	std::uint64_t n = 0;
	for (const auto &[tid, v] : after) {
		auto was = before.find(tid);
		n += v - (was == before.end() ? 0 : was->second);
	}
	return n;
}

// Whether every thread sleeps in a system call (/proc/PID/task/TID/syscall says "running" for one
// that runs).
bool all_asleep(pid_t pid)
{
	for (const std::string &tid : tasks(pid)) {
		std::string sc = read_file("/proc/" + std::to_string(pid) + "/task/" + tid + "/syscall");
		if (sc.empty() || sc.starts_with("running"))
			return false;
	}
	return true;
}

// Waits until brokerd holds no socket beyond `sockets` (a Status call's connection is closed) and
// every thread sleeps.
void wait_asleep(pid_t pid, const std::set<std::uint64_t> &sockets)
{
	REQUIRE(wait_until(
		[&] {
			auto now = socket_inodes(pid);
			return std::includes(sockets.begin(), sockets.end(), now.begin(), now.end()) && all_asleep(pid);
		},
		10s));
}

// Whether every timerfd of `pid` is disarmed (/proc/PID/fdinfo: "it_value: (0, 0)"): no timer of
// its loop is pending, such as the crash state's write of a worker's last output lines, 100 ms
// after them.
bool timers_disarmed(pid_t pid)
{
	for (const auto &[fd, target] : proc_fds(pid)) {
		if (target != "anon_inode:[timerfd]")
			continue;
		std::string info = read_file("/proc/" + std::to_string(pid) + "/fdinfo/" + std::to_string(fd));
		if (info.find("it_value: (0, 0)") == std::string::npos)
			return false;
	}
	return true;
}

// How many times brokerd's log holds `line`. Each worker logs once it is ready, through brokerd's
// pipe: a line relayed after the window opens is a wake-up, so the tests wait for them.
std::size_t logged(const Broker &b, const std::string &line)
{
	std::string log = b.log();
	std::size_t n = 0;
	for (auto at = log.find(line); at != std::string::npos; at = log.find(line, at + 1))
		++n;
	return n;
}

std::string describe(const std::map<std::string, std::uint64_t> &before, const std::map<std::string, std::uint64_t> &after)
{
	std::string out;
	for (const auto &[tid, n] : after) {
		auto was = before.find(tid);
		out += "thread " + tid + ": " + (was == before.end() ? "new" : std::to_string(was->second)) + " -> " +
		       std::to_string(n) + "\n";
	}
	return out;
}

} // namespace

TEST_CASE("idle: brokerd with two ready instances does not wake up and stays small")
{
	Broker b;
	BROKER_CONTEXT(b);
	// Both readiness paths that hold a connection or a socket open: the client library's Events
	// stream (web) and sd_notify (py); and the metrics endpoint, scraped once before the window.
	std::uint16_t metrics_port = free_port();
	b.start({{"sockets", {{"http", tcp_socket()}, {"py", tcp_socket()}}},
	         {"services",
	          {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 2, "broker")},
	           {"py", service({"python3", env("EXAMPLE_PYTHON")}, {"py"}, 2, "notify")}}},
	         {"metrics", {{"listen", "tcp://127.0.0.1:" + std::to_string(metrics_port)}}}});
	std::set<std::uint64_t> sockets = socket_inodes(b.pid());
	CHECK(http_get(metrics_port, "/metrics").status == 200);
	json st = b.status();
	for (const char *svc : {"web", "py"}) {
		auto insts = instances(st, svc);
		REQUIRE(insts.size() == 2);
		for (const json &i : insts)
			CHECK(i.value("state", "") == "ready");
	}
	REQUIRE(wait_until(
		[&] {
			return logged(b, "broker-example-http: listening on") == 2 &&
			       logged(b, "broker-example-python: listening on") == 2;
		},
		10s));
	// The Status call's connection is closed, and brokerd is back asleep, with no timer pending.
	wait_asleep(b.pid(), sockets);
	REQUIRE(wait_until([&] { return timers_disarmed(b.pid()); }, 10s));
	wait_asleep(b.pid(), sockets);

	auto before = switches(b.pid());
	pollfd p{b.process().pidfd(), POLLIN, 0};
	// The window is the thing measured; brokerd exiting would end it early.
	REQUIRE(::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kWindow).count())) == 0);
	auto after = switches(b.pid());
	std::uint64_t woke = woken(before, after);
	std::uint64_t rss = status_value(read_file("/proc/" + std::to_string(b.pid()) + "/status"), "VmRSS");
	MESSAGE("over ", std::chrono::milliseconds(kWindow).count(), " ms: ", woke, " wake-ups in ", after.size(),
	        " threads; VmRSS ", rss, " kB");
	INFO(describe(before, after));
	CHECK(after.size() == before.size());
	CHECK(woke == 0);
	if (!kSanitized)
		CHECK(rss <= kMaxRssKb);
	b.stop();
}

// With WATCHDOG_USEC, the one timer an idle brokerd runs: WATCHDOG=1 every half period, and not one
// wake-up besides. The window opens on a ping, once brokerd sleeps again, and closes after the
// pings sent until then are read: each voluntary context switch in it (brokerd going back to sleep)
// belongs to a ping read, so wake-ups <= pings, and >= pings - 1 (a tick cut by the close). A tick
// comes a half period after the last one, late by up to sd-event's accuracy (a tenth of it, asked
// by brokerd) and by scheduling: over 4.5 half periods, 4 pings, at most the window's whole half
// periods, and at least one fewer than its whole 1.1 half periods.
TEST_CASE("idle: with a watchdog, brokerd wakes up only to feed it, at each half period")
{
	constexpr std::uint64_t kWatchdogUsec = 2'000'000;
	constexpr std::int64_t kHalfPeriodMs = kWatchdogUsec / 2 / 1000;
	constexpr auto kWatchdogWindow = std::chrono::milliseconds(kHalfPeriodMs * 9 / 2);
	Broker b;
	BROKER_CONTEXT(b);
	BrokerOptions opts;
	opts.env = {"WATCHDOG_USEC=" + std::to_string(kWatchdogUsec)};
	b.start({{"sockets", {{"http", tcp_socket()}}},
	         {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 1, "broker")}}}},
	        opts);
	std::set<std::uint64_t> sockets = socket_inodes(b.pid());
	auto insts = instances(b.status(), "web");
	REQUIRE(insts.size() == 1);
	CHECK(insts[0].value("state", "") == "ready");
	REQUIRE(wait_until([&] { return logged(b, "broker-example-http: listening on") == 1; }, 10s));
	wait_asleep(b.pid(), sockets);

	std::uint64_t pings = 0;
	std::vector<std::string> other;
	auto next = [&](Clock::time_point until) -> bool {
		auto m = b.next_notify(std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()));
		if (m)
			*m == "WATCHDOG=1" ? ++pings : (other.push_back(*m), 0);
		return m.has_value();
	};
	// Everything sent so far, then the next ping: the window opens on it.
	while (b.next_notify(0ms)) {
	}
	REQUIRE(b.next_notify(std::chrono::milliseconds(3 * kHalfPeriodMs)) == std::optional<std::string>("WATCHDOG=1"));
	auto start = Clock::now();
	wait_asleep(b.pid(), sockets);
	auto before = switches(b.pid(), true);

	auto deadline = start + kWatchdogWindow;
	while (Clock::now() < deadline && next(deadline)) {
	}
	wait_asleep(b.pid(), sockets);
	auto after = switches(b.pid(), true);
	while (next(Clock::now())) {
	}
	auto window = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
	pollfd p{b.process().pidfd(), POLLIN, 0};
	REQUIRE(::poll(&p, 1, 0) == 0);
	std::uint64_t woke = woken(before, after);
	MESSAGE("over ", window, " ms: ", pings, " WATCHDOG=1, ", woke, " wake-ups in ", after.size(), " threads");
	INFO(describe(before, after));
	CHECK(other == std::vector<std::string>{});
	CHECK(after.size() == before.size());
	CHECK(pings <= static_cast<std::uint64_t>(window / kHalfPeriodMs));
	CHECK(pings + 1 >= static_cast<std::uint64_t>(window * 10 / (kHalfPeriodMs * 11)));
	CHECK(woke <= pings);
	CHECK(woke + 1 >= pings);
	b.stop();
}
