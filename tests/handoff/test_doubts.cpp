// HandoffDoubts unit tests: batches a killed brokerd had in flight, settled from what their
// senders and receivers say after the restart.
#include "handoff/doubts.hpp"

#include <doctest/doctest.h>

using brokerd::EventSink;
using brokerd::HandoffDoubts;
using brokerd::HandoffResult;
using Receipt = HandoffDoubts::Receipt;
using InDoubt = HandoffDoubts::InDoubt;
using Indices = std::vector<std::uint64_t>;

namespace {

// Only its address matters: the doubts name the sender to tell.
class NullSink final : public EventSink {
public:
	bool send_drain(brokerd::usec_t) override { return true; }
	bool send_connections(std::uint64_t, std::vector<brokerd::HandoffItem>, const brokerd::HandoffOrigin &) override
	{
		return true;
	}
	bool send_handoff_result(const HandoffResult &) override { return true; }
};

Receipt receipt(std::uint64_t batch, std::uint64_t first, std::uint64_t count, Indices refused = {},
                const char *sender = "web/1/0", pid_t pid = 100)
{
	return Receipt{sender, pid, batch, first, count, std::move(refused)};
}

} // namespace

TEST_CASE("doubts: a batch waits for every instance of its service that spoke to the dead brokerd, then what receivers name landed and the rest returns")
{
	HandoffDoubts d;
	NullSink sender, r1, r2, other;
	d.expect("web", "web/1/0");
	d.expect("web", "web/2/0");
	d.expect("web", "web/2/1");
	d.expect("api", "api/1/0");
	CHECK(d.silent() == 4);

	// The sender speaks first: batch 7 of 10 connections, batch 8 of 2.
	d.resume("web", "web/1/0", 100, sender, {}, {InDoubt{7, 10}, InDoubt{8, 2}});
	CHECK(d.take_resolved().empty());
	CHECK(d.pending() == 2);
	// One receiver got 0..3 of batch 7, refusing 1; a chunk of another sender's process (an
	// earlier pid of the same instance) says nothing of this batch.
	d.resume("web", "web/2/0", 200, r1, {receipt(7, 0, 4, {1}), receipt(7, 4, 3, {}, "web/1/0", 99)}, {});
	CHECK(d.take_resolved().empty()); // web/2/1 has not spoken
	// Another service's silence does not hold web's batches.
	d.resume("web", "web/2/1", 201, r2, {receipt(7, 6, 2)}, {});
	auto done = d.take_resolved();
	REQUIRE(done.size() == 2);
	CHECK(d.pending() == 0);
	CHECK(d.silent() == 1);
	CHECK(done[0].sender == &sender);
	CHECK(done[0].service == "web");
	CHECK(done[0].result.batch == 7);
	CHECK(done[0].result.landed == 5); // 0, 2, 3, 6, 7
	CHECK(done[0].result.returned == Indices{1, 4, 5, 8, 9});
	CHECK(done[0].result.abandoned.empty());
	CHECK(done[1].result.batch == 8);
	CHECK(done[1].result.landed == 0);
	CHECK(done[1].result.returned == Indices{0, 1});
}

TEST_CASE("doubts: a receiver that exits counts as having nothing; at the deadline what a silent one may hold is abandoned, and after it every doubt is")
{
	HandoffDoubts d;
	NullSink sender, late;
	d.expect("web", "web/2/0");
	d.expect("web", "web/2/1");
	d.resume("web", "web/1/0", 100, sender, {}, {InDoubt{3, 4}});
	d.resume("web", "web/2/0", 200, sender, {receipt(3, 0, 2)}, {});
	CHECK(d.take_resolved().empty());

	SUBCASE("the silent receiver exits: its copies closed with it, so the rest goes back")
	{
		d.gone("web/2/1");
		auto done = d.take_resolved();
		REQUIRE(done.size() == 1);
		CHECK(done[0].result.landed == 2);
		CHECK(done[0].result.returned == Indices{2, 3});
		CHECK(done[0].result.abandoned.empty());
	}
	SUBCASE("the deadline comes first: the rest may be with the silent one, so it is abandoned")
	{
		auto done = d.expire();
		REQUIRE(done.size() == 1);
		CHECK(done[0].result.landed == 2);
		CHECK(done[0].result.returned.empty());
		CHECK(done[0].result.abandoned == Indices{2, 3});
		CHECK(d.closed());
		CHECK(d.silent() == 0);
		// A sender that speaks after the books closed: nobody can tell any more.
		d.resume("web", "web/1/1", 101, late, {}, {InDoubt{1, 2}});
		done = d.take_resolved();
		REQUIRE(done.size() == 1);
		CHECK(done[0].sender == &late);
		CHECK(done[0].result.landed == 0);
		CHECK(done[0].result.abandoned == Indices{0, 1});
	}
}

TEST_CASE("doubts: receipts out of a batch's range claim nothing, and a sender whose connection closed is told nothing")
{
	HandoffDoubts d;
	NullSink sender;
	d.resume("web", "web/1/0", 100, sender, {}, {InDoubt{1, 3}});
	d.resume("web", "web/2/0", 200, sender, {receipt(1, 2, 5), receipt(1, 9, 1)}, {});
	auto done = d.take_resolved();
	REQUIRE(done.size() == 1);
	CHECK(done[0].result.landed == 1);
	CHECK(done[0].result.returned == Indices{0, 1});

	NullSink gone;
	d.expect("web", "web/2/1");
	d.resume("web", "web/1/1", 101, gone, {}, {InDoubt{2, 1}});
	d.forget(gone);
	CHECK(d.pending() == 0);
	d.gone("web/2/1");
	CHECK(d.take_resolved().empty());
}

TEST_CASE("doubts: a worker that says Resume again changes nothing it said before and cannot grow the books")
{
	HandoffDoubts d;
	NullSink sender, receiver;
	d.expect("web", "web/2/0");
	d.expect("web", "web/2/1");
	d.resume("web", "web/2/0", 200, receiver, {receipt(1, 0, 2)}, {});
	// Again, claiming more of the same batch: its first word stands.
	d.resume("web", "web/2/0", 200, receiver, {receipt(1, 0, 4)}, {});
	// A sender names batches 1 to 16, then again only 1: the others were settled meanwhile.
	std::vector<InDoubt> many;
	for (std::uint64_t b = 1; b <= 16; b++)
		many.push_back(InDoubt{b, 4});
	d.resume("web", "web/1/0", 100, sender, {}, many);
	CHECK(d.pending() == 16);
	for (int i = 0; i < 100; i++)
		d.resume("web", "web/1/0", 100, sender, {}, {InDoubt{1, 4}});
	CHECK(d.pending() == 1);
	d.gone("web/2/1");
	auto done = d.take_resolved();
	REQUIRE(done.size() == 1);
	CHECK(done[0].result.landed == 2);
	CHECK(done[0].result.returned == Indices{2, 3});
}
