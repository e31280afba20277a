// Integration: an idle brokerd does not wake up and stays small (docs/design.md, "What works means").
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
std::map<std::string, std::uint64_t> switches(pid_t pid)
{
	std::map<std::string, std::uint64_t> out;
	for (const std::string &tid : tasks(pid)) {
		std::string st = read_file("/proc/" + std::to_string(pid) + "/task/" + tid + "/status");
		out[tid] = status_value(st, "voluntary_ctxt_switches") + status_value(st, "nonvoluntary_ctxt_switches");
	}
	return out;
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
	// stream (web) and sd_notify (py).
	b.start({{"sockets", {{"http", tcp_socket()}, {"py", tcp_socket()}}},
	         {"services",
	          {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 2, "broker")},
	           {"py", service({"python3", env("EXAMPLE_PYTHON")}, {"py"}, 2, "notify")}}}});
	std::set<std::uint64_t> sockets = socket_inodes(b.pid());
	json st = b.status();
	for (const char *svc : {"web", "py"}) {
		auto insts = instances(st, svc);
		REQUIRE(insts.size() == 2);
		for (const json &i : insts)
			CHECK(i.value("state", "") == "ready");
	}
	// The Status call's connection is closed, and brokerd is back asleep.
	REQUIRE(wait_until(
		[&] {
			auto now = socket_inodes(b.pid());
			return std::includes(sockets.begin(), sockets.end(), now.begin(), now.end()) && all_asleep(b.pid());
		},
		10s));

	auto before = switches(b.pid());
	pollfd p{b.process().pidfd(), POLLIN, 0};
	// The window is the thing measured; brokerd exiting would end it early.
	REQUIRE(::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kWindow).count())) == 0);
	auto after = switches(b.pid());
	std::uint64_t woke = 0;
	for (const auto &[tid, n] : after)
		woke += n - (before.count(tid) ? before[tid] : 0);
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
