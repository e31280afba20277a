// Connection handoff through the C API: broker-example-c's keep-alive connections, some holding half a request, carry on in the new generation.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

using namespace utest;
using namespace utest::handoff;

// The client side is handoff_clients', the same load as the C++ worker's test; here the answers
// must also come from the C worker, which raises its own fd limit and logs where its connections went.
namespace {

constexpr std::size_t kConnections = 2000;
constexpr std::size_t kHalfEvery = 10; // every 10th connection holds half a request: 200
// The soft fd limit a service manager starts services with (select()'s FD_SETSIZE). brokerd
// passes the limit it was started with to its workers, and a worker holding thousands of
// connections has to raise it itself.
constexpr rlim_t kServiceSoftLimit = 1024;

// A process's RLIMIT_NOFILE from /proc/<pid>/limits: soft and hard, "unlimited" as RLIM_INFINITY.
std::optional<std::pair<rlim_t, rlim_t>> fd_limits(pid_t pid)
{
	std::ifstream f("/proc/" + std::to_string(pid) + "/limits");
	std::string line;
	while (std::getline(f, line)) {
		if (line.rfind("Max open files", 0) != 0)
			continue;
		std::istringstream in(line.substr(std::strlen("Max open files")));
		std::string soft, hard;
		if (!(in >> soft >> hard))
			return std::nullopt;
		auto value = [](const std::string &s) {
			return s == "unlimited" ? RLIM_INFINITY : static_cast<rlim_t>(std::stoull(s));
		};
		return std::make_pair(value(soft), value(hard));
	}
	return std::nullopt;
}

// Every instance of the generation runs with its soft fd limit raised to the hard one.
void check_fd_limits_raised(const json &status, int generation)
{
	for (const auto &inst : generation_instances(status, "web", generation)) {
		pid_t pid = inst.value("pid", 0);
		auto limits = fd_limits(pid);
		INFO("instance ", inst.value("id", ""), " pid ", pid);
		REQUIRE(limits);
		CHECK(limits->first == limits->second);
		CHECK(limits->first > kServiceSoftLimit);
	}
}

} // namespace

TEST_CASE("handoff: 2000 keep-alive connections of the C worker move to the new generation in one upgrade")
{
	// brokerd and its workers start with the soft limit of a service; the test holds every
	// client connection itself and takes the hard limit once they run.
	rlimit nofile{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
	REQUIRE_MESSAGE(nofile.rlim_max >= kConnections + 1000, "RLIMIT_NOFILE hard limit ", nofile.rlim_max,
	                " is too low for ", kConnections, " connections");
	rlimit service_nofile = nofile;
	service_nofile.rlim_cur = std::min(kServiceSoftLimit, nofile.rlim_max);
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &service_nofile) == 0);

	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = service({env("EXAMPLE_C")}, {"http"}, 2, "broker");
	web["drain"] = {{"timeout", "30s"}};
	tb.start({{"sockets", {{"http", {{"listen", "tcp://127.0.0.1:0"}, {"backlog", 4096}}}}}, {"services", {{"web", web}}}});
	nofile.rlim_cur = nofile.rlim_max;
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &nofile) == 0);
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	check_serves_alone(b, "web", 1, 2);
	// With 1024 fds, one instance could not hold what it is handed below.
	check_fd_limits_raised(b.status("web"), 1);

	HandoffRun run = handoff_upgrade(
		b, port, kConnections, kHalfEvery, [](const Answer &a) { return a.from_c; },
		"connection handoff of the C worker in one upgrade", [](const json &st) { check_fd_limits_raised(st, 2); });
	const HandoffCounts &counts = run.counts;
	CHECK(run.answered == kConnections);
	CHECK(run.answering.size() == 2); // the connections were split between the new instances
	CHECK(counts.handed == kConnections);
	CHECK(counts.received == counts.handed);
	CHECK(counts.returned == 0);
	// The new instances account for every connection received (the old ones may be gone from Status).
	CHECK(counts.by_new == counts.received);
	CHECK(counts.by_old <= counts.handed);
	// Each old instance said where its connections went (its done handler) before it exited.
	SettledSum sum = wait_settled(b, "broker-example-c", 2);
	CHECK(sum.lines == 2);
	CHECK(sum.handed == kConnections);
	CHECK(sum.landed == kConnections);
	CHECK(sum.returned == 0);
	CHECK(sum.abandoned == 0);
	b.stop();
}
