// Connection handoff in an upgrade: keep-alive connections, some holding half a request, carry on in the new generation.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <cstdio>
#include <string>

using namespace utest;
using namespace utest::handoff;

namespace {

constexpr std::size_t kConnections = 8000;
constexpr std::size_t kHalfEvery = 16; // every 16th connection holds half a request: 500
constexpr std::size_t kWatchedConnections = 1000;

} // namespace

TEST_CASE("handoff: 8000 keep-alive connections move to the new generation in one upgrade")
{
	take_nofile_limit(kConnections);
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	std::uint16_t port = start_web(tb);

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

TEST_CASE("handoff: a Watch sees the handoff counts grow to every connection and settle before done")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = http_service(2);
	web["drain"] = {{"timeout", "30s"}};
	tb.start(config_with({{"web", web}}));
	std::uint16_t port = socket_port(b.status(), "http");
	check_serves_alone(b, "web", 1, 2);

	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	HandoffRun run = handoff_upgrade(b, port, kWatchedConnections, 10, [](const Answer &) { return true; },
	                                 "connection handoff watched");
	CHECK(run.answered == kWatchedConnections);
	CHECK(run.counts.handed == kWatchedConnections);

	// Everything the Watch saw of the upgrade, up to its end.
	auto done = watch.until([](const StreamCall::Reply &r) { return r.parameters.value("event", "") == "done"; }, 30s);
	INFO("Watch:\n", watch.transcript());
	REQUIRE(done);
	CHECK(done->parameters.value("generation", 0) == 2);
	std::vector<json> handoffs;
	bool upgrade_seen = false;
	for (const auto &r : watch.seen()) {
		CHECK(r.continues);
		std::string event = r.parameters.value("event", "");
		upgrade_seen = upgrade_seen || event == "upgrade";
		if (event == "handoff") {
			CHECK(upgrade_seen); // the Watch was there before the upgrade began
			handoffs.push_back(r.parameters);
		}
	}
	REQUIRE(upgrade_seen);
	REQUIRE(!handoffs.empty());
	std::uint64_t handed = 0, received = 0, returned = 0;
	for (const json &e : handoffs) {
		CAPTURE(e.dump());
		CHECK(e.value("service", "") == "web");
		CHECK(e.value("generation", 0) == 2);
		const json &h = member(e, "handoff");
		// Each count only grows; what landed or came back was handed; what was handed was expected.
		CHECK(count_of(h, "handed") >= handed);
		CHECK(count_of(h, "received") >= received);
		CHECK(count_of(h, "returned") >= returned);
		handed = count_of(h, "handed");
		received = count_of(h, "received");
		returned = count_of(h, "returned");
		CHECK(received + returned <= handed);
		CHECK(handed <= count_of(h, "expected"));
		CHECK(e.value("message", "") == "migrating connections " + std::to_string(received) + "/" +
		                                        std::to_string(count_of(h, "expected")) +
		                                        (returned ? ", " + std::to_string(returned) + " returned" : ""));
	}
	// The last one, before done, shows every connection settled.
	const json &last = handoffs.back();
	CHECK(member(last, "handoff") == json{{"handed", kWatchedConnections},
	                                      {"received", kWatchedConnections},
	                                      {"returned", 0},
	                                      {"expected", kWatchedConnections}});
	CHECK(last.value("message", "") == "migrating connections 1000/1000");
	std::string messages;
	for (const json &e : handoffs)
		messages += "\n  " + e.value("message", "");
	MESSAGE(handoffs.size(), " handoff events in the Watch:", messages);
	b.stop();
}
