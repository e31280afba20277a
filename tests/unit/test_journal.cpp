// Unit tests of the journal's native protocol as brokerd writes it, and of its queue on a full socket.
#include "os/journal.hpp"

#include <doctest/doctest.h>

#include <sys/socket.h>
#include <unistd.h>

#include <optional>
#include <string>
#include <utility>

using namespace brokerd;
using namespace std::string_literals;

TEST_CASE("native fields: KEY=value, or KEY, a 64-bit little-endian length and the value")
{
	const journal::Field fields[] = {{"MESSAGE", "hello world"}, {"EMPTY", ""}, {"TWO", "a\nb"}};
	CHECK(journal::encode(fields) == "MESSAGE=hello world\nEMPTY=\nTWO\n\x03\0\0\0\0\0\0\0a\nb\n"s);
	const std::string long_value(300, 'x');
	const std::string with_newline = long_value + "\n";
	const journal::Field big[] = {{"LONG", with_newline}};
	CHECK(journal::encode(big) == "LONG\n\x2d\x01\0\0\0\0\0\0"s + long_value + "\n\n");
}

TEST_CASE("a line's <N> prefix: 0 to 7 only, closed")
{
	struct Case {
		std::string line;
		std::optional<std::pair<int, std::string>> want;
	};
	const Case cases[] = {
		{"<3>boom", std::pair{3, "boom"s}},
		{"<0>", std::pair{0, ""s}},
		{"<7> spaced", std::pair{7, " spaced"s}},
		{"<8>boom", std::nullopt},
		{"<3boom", std::nullopt},
		{"<3", std::nullopt},
		{"3>boom", std::nullopt},
		{"<a>boom", std::nullopt},
		{"<13>boom", std::nullopt},
		{"plain", std::nullopt},
		{"", std::nullopt},
	};
	for (const Case &c : cases) {
		CAPTURE(c.line);
		auto got = journal::priority_prefix(c.line);
		REQUIRE(got.has_value() == c.want.has_value());
		if (got) {
			CHECK(got->first == c.want->first);
			CHECK(got->second == c.want->second);
		}
	}
}

TEST_CASE("a worker's line: its level from the prefix, else 6, and the instance's fields")
{
	journal::WorkerLine w{.service = "web", .instance = "web/2/0", .generation = 2, .pid = 4242, .stream = 2,
	                      .line = "<3>boom"};
	CHECK(journal::worker_message(w) == "MESSAGE=boom\nPRIORITY=3\nSYSLOG_IDENTIFIER=web\nSYSLOG_FACILITY=3\n"
	                                    "BROKER_SERVICE=web\nBROKER_INSTANCE=web/2/0\nBROKER_GENERATION=2\n"
	                                    "BROKER_STREAM=stderr\nOBJECT_PID=4242\n");
	w.line = "plain <3>";
	w.stream = 1;
	w.pid = 0; // never started: no pid to name
	CHECK(journal::worker_message(w) == "MESSAGE=plain <3>\nPRIORITY=6\nSYSLOG_IDENTIFIER=web\nSYSLOG_FACILITY=3\n"
	                                    "BROKER_SERVICE=web\nBROKER_INSTANCE=web/2/0\nBROKER_GENERATION=2\n"
	                                    "BROKER_STREAM=stdout\n");
}

namespace {

struct Loop {
	sd_event *e = nullptr;
	Loop() { REQUIRE(sd_event_new(&e) >= 0); }
	~Loop() { sd_event_unref(e); }
};

} // namespace

TEST_CASE("a full journal: send says Again, queue() keeps the newest 256 in order, writable once there is room")
{
	Loop loop;
	int sv[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
	proto::UniqueFd peer(sv[1]);
	journal::Journal j(loop.e, proto::UniqueFd(sv[0]));
	int woken = 0;
	j.writable = [&] { woken++; };

	// Fill the peer until the socket refuses.
	std::size_t sent = 0;
	while (j.send("m=" + std::to_string(sent)) == journal::Sent::Ok)
		REQUIRE(++sent < 100000);
	CHECK(sent > 0);
	// Queued behind the full socket: the oldest beyond 256 are dropped and counted; send() now
	// says Again even for a message the socket could take, so that nothing overtakes the queue.
	for (int i = 0; i < 300; i++)
		j.queue("q=" + std::to_string(i));
	CHECK(j.queued() == journal::kMaxQueuedMessages);
	CHECK(j.dropped() == 300 - journal::kMaxQueuedMessages);

	// The peer reads everything; the loop sends the queue, then says writable.
	std::vector<std::string> got;
	char buf[64];
	for (int rounds = 0; woken == 0; rounds++) {
		REQUIRE(rounds < 20);
		ssize_t n;
		while ((n = ::recv(peer.get(), buf, sizeof(buf), 0)) > 0)
			got.emplace_back(buf, static_cast<std::size_t>(n));
		REQUIRE(sd_event_run(loop.e, 2'000'000) >= 0);
	}
	ssize_t n;
	while ((n = ::recv(peer.get(), buf, sizeof(buf), 0)) > 0)
		got.emplace_back(buf, static_cast<std::size_t>(n));
	CHECK(woken == 1);
	CHECK(j.queued() == 0);
	REQUIRE(got.size() == sent + journal::kMaxQueuedMessages);
	for (std::size_t i = 0; i < sent; i++)
		CHECK(got[i] == "m=" + std::to_string(i));
	for (std::size_t i = 0; i < journal::kMaxQueuedMessages; i++)
		CHECK(got[sent + i] == "q=" + std::to_string(300 - journal::kMaxQueuedMessages + i));
	CHECK(j.send("after") == journal::Sent::Ok);
}
