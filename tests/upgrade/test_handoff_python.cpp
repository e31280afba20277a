// Connection handoff through broker_client: the Python HTTP worker's keep-alive connections, some holding half a request, carry on in the new generation.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <cstdio>
#include <string>

using namespace utest;
using namespace utest::handoff;

// The client side is handoff_clients', the same load as the C++ (8000) and C (2000) workers' tests;
// here every answer must come from the Python worker, and each old instance says where its
// connections went before it exits.
namespace {

constexpr std::size_t kConnections = 4000;
constexpr std::size_t kHalfEvery = 10; // every 10th connection holds half a request: 400

} // namespace

TEST_CASE("handoff: 4000 keep-alive connections of the Python worker move to the new generation in one upgrade")
{
	take_nofile_limit(kConnections);
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = service({env("EXAMPLE_PYTHON_HTTP")}, {"http"}, 2, "broker");
	web["drain"] = {{"timeout", "30s"}};
	web["env"] = {{"PYTHONPATH", env("BROKER_CLIENT_PYTHONPATH")}};
	tb.start({{"sockets", {{"http", {{"listen", "tcp://127.0.0.1:0"}, {"backlog", 4096}}}}}, {"services", {{"web", web}}}});
	std::uint16_t port = socket_port(b.status(), "http");
	check_serves_alone(b, "web", 1, 2);

	HandoffRun run = handoff_upgrade(b, port, kConnections, kHalfEvery, [](const Answer &a) { return a.from_python; },
	                                 "connection handoff of the Python worker in one upgrade");
	const HandoffCounts &counts = run.counts;
	CHECK(run.answered == kConnections);
	CHECK(run.answering.size() == 2); // the connections were split between the new instances
	CHECK(counts.handed == kConnections);
	CHECK(counts.received == counts.handed);
	CHECK(counts.returned == 0);
	CHECK(counts.by_new == counts.received);
	SettledSum sum = wait_settled(b, "broker-example-python-http", 2);
	CHECK(sum.lines == 2);
	CHECK(sum.handed == kConnections);
	CHECK(sum.landed == kConnections);
	CHECK(sum.returned == 0);
	CHECK(sum.abandoned == 0);
	b.stop();
}
