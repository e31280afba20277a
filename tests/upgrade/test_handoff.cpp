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

	// Established and idle at a generation 1 instance, each after one answer.
	Clients clients(kConnections);
	Tally opening;
	clients.open_all(port, opening);
	auto old_pids = answers_by_pid(clients, opening, 1, [](const Answer &) { return true; });
	INFO("opening: ", opening.describe());
	REQUIRE(opening.failures() == 0);
	CHECK(old_pids.size() == 2); // both instances serve

	// Half a request on some: the workers read it, and must hand it over as state.
	std::size_t halves = send_half_requests(port, clients, kHalfEvery);

	Upgraded up = upgrade(b, "web");
	INFO("progress:\n", up.transcript);
	CHECK(up.handoff_events >= 1);
	check_serves_alone(b, "web", 2, 2);

	st = b.status("web");
	INFO("Status: ", st.dump());
	std::set<pid_t> new_pids;
	for (const auto &inst : generation_instances(st, "web", 2))
		new_pids.insert(inst.value("pid", 0));

	// The rest of each request, on the same connections: every one answered by generation 2.
	for (std::size_t i = 0; i < clients.size(); i++)
		clients.request(i, i % kHalfEvery == 0 ? kRestOfRequest : kRequest);
	Tally after;
	clients.run(after);
	auto answering = answers_by_pid(clients, after, 2, [&](const Answer &a) { return new_pids.count(a.pid) > 0; });
	std::size_t answered = 0;
	for (const auto &[pid, n] : answering)
		answered += n;

	HandoffCounts counts = handoff_counts(st, "web");
	print_summary("connection handoff in one upgrade", kConnections, halves, counts, up.ms, up.handoff_events,
	              answered);

	INFO("after the upgrade: ", after.describe());
	CHECK(after.failures() == 0);
	CHECK(answered == kConnections);
	CHECK(counts.handed == kConnections);
	CHECK(counts.received == counts.handed);
	CHECK(counts.returned == 0);
	// The new instances account for every connection received (the old ones may be gone from Status).
	CHECK(counts.by_new == counts.received);
	CHECK(counts.by_old <= counts.handed);
	b.stop();
}
