// Connection handoff in an upgrade: keep-alive connections, some holding half a request, carry on in the new generation.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <sys/resource.h>

#include <cstdio>

using namespace utest;
using namespace utest::handoff;

namespace {

constexpr std::size_t kConnections = 8000;
constexpr std::size_t kHalfEvery = 16; // every 16th connection holds half a request: 500

} // namespace

TEST_CASE("handoff: 8000 keep-alive connections move to the new generation in one upgrade")
{
	// Every connection is an fd here: take the hard limit. brokerd and its workers inherit it.
	rlimit nofile{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
	REQUIRE_MESSAGE(nofile.rlim_max >= kConnections + 1000, "RLIMIT_NOFILE hard limit ", nofile.rlim_max,
	                " is too low for ", kConnections, " connections");
	nofile.rlim_cur = nofile.rlim_max;
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &nofile) == 0);

	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = http_service(2);
	web["drain"] = {{"timeout", "30s"}};
	tb.start({{"sockets", {{"http", {{"listen", "tcp://127.0.0.1:0"}, {"backlog", 4096}}}}}, {"services", {{"web", web}}}});
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	check_serves_alone(b, "web", 1, 2);

	HandoffRun run = handoff_upgrade(b, port, kConnections, kHalfEvery, [](const Answer &) { return true; },
	                                 "connection handoff in one upgrade");
	const HandoffCounts &counts = run.counts;
	CHECK(run.answered == kConnections);
	CHECK(counts.handed == kConnections);
	CHECK(counts.received == counts.handed);
	CHECK(counts.returned == 0);
	// The new instances account for every connection received (the old ones may be gone from Status).
	CHECK(counts.by_new == counts.received);
	CHECK(counts.by_old <= counts.handed);
	b.stop();
}
