// HandoffRouter unit tests: chunking, acknowledgement and accounting, with fake event sinks.
#include "handoff/router.hpp"

#include "control/encode.hpp"

#include "open_fds.hpp"

#include <doctest/doctest.h>

#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <set>

using brokerd::EventSink;
using brokerd::HandoffItem;
using brokerd::HandoffRouter;
using proto::UniqueFd;
using json = nlohmann::json;

namespace {

ino_t inode(int fd)
{
	struct stat st {};
	REQUIRE(::fstat(fd, &st) == 0);
	return st.st_ino;
}

// Records what the router sends, as the control connection would put it on the wire: every event
// and the fds it carried. fail makes a send return false as a closed connection does; during runs
// inside the call, before anything else.
class FakeSink final : public EventSink {
public:
	bool send_drain(brokerd::usec_t timeout) override { return record(brokerd::encode::drain(brokerd::msec(timeout)), {}); }
	bool send_connections(std::uint64_t batch, std::vector<HandoffItem> items, const brokerd::HandoffOrigin &origin) override
	{
		std::vector<UniqueFd> fds;
		json event = brokerd::encode::connections(batch, std::move(items), fds, origin);
		return record(event, std::move(fds));
	}
	bool send_handoff_result(const brokerd::HandoffResult &result) override
	{
		return record(brokerd::encode::handoff_result(result), {});
	}

	bool record(const json &parameters, std::vector<UniqueFd> fds)
	{
		if (during)
			during();
		if (fail)
			return false; // the fds close here, with the vector
		events.push_back(parameters);
		this->fds.push_back(std::move(fds));
		return true;
	}

	std::vector<json> events;
	std::vector<std::vector<UniqueFd>> fds; // one entry per event
	bool fail = false;
	std::function<void()> during;

	std::size_t held() const
	{
		std::size_t n = 0;
		for (const auto &f : fds)
			n += f.size();
		return n;
	}
	// The "connections" events, by index into events.
	std::vector<std::size_t> chunks() const
	{
		std::vector<std::size_t> out;
		for (std::size_t i = 0; i < events.size(); i++)
			if (events[i].value("event", "") == "connections")
				out.push_back(i);
		return out;
	}
	std::vector<json> results() const
	{
		std::vector<json> out;
		for (const auto &e : events)
			if (e.value("event", "") == "handoff")
				out.push_back(e);
		return out;
	}
};

// A batch of connections, each a memfd with its own inode (to tell them apart after the trip)
// and state "s<index>".
struct Batch {
	std::vector<HandoffItem> items;
	std::vector<ino_t> inodes;
};

Batch make_batch(std::size_t n)
{
	Batch b;
	for (std::size_t i = 0; i < n; i++) {
		UniqueFd fd(::memfd_create("handoff-test", MFD_CLOEXEC));
		REQUIRE(fd);
		b.inodes.push_back(inode(fd.get()));
		b.items.push_back(HandoffItem{std::move(fd), "s" + std::to_string(i)});
	}
	return b;
}

// The router, plus the sum of what it reported.
struct Router {
	HandoffRouter r;
	std::vector<HandoffRouter::Report> reports;
	Router()
	{
		r.on_report = [this](const HandoffRouter::Report &rep) { reports.push_back(rep); };
	}
	std::size_t landed() const
	{
		return std::accumulate(reports.begin(), reports.end(), std::size_t{0},
		                       [](std::size_t n, const auto &rep) { return n + rep.landed; });
	}
	std::size_t returned() const
	{
		return std::accumulate(reports.begin(), reports.end(), std::size_t{0},
		                       [](std::size_t n, const auto &rep) { return n + rep.returned; });
	}
	void submit(EventSink &sender, std::uint64_t batch, Batch &b, std::vector<EventSink *> receivers)
	{
		r.submit("web", sender, batch, std::move(b.items), receivers);
	}
};

std::vector<std::uint64_t> indices(const json &result)
{
	return result.at("returned").get<std::vector<std::uint64_t>>();
}

std::vector<std::uint64_t> all_of(std::size_t n)
{
	std::vector<std::uint64_t> v(n);
	std::iota(v.begin(), v.end(), 0);
	return v;
}

// Checks one "connections" event against the batch it came from: fd indices 0..n-1 in order,
// one fd each, and state and fd matching the sender's item. Returns the sender's indices.
std::vector<std::uint64_t> check_chunk(const FakeSink &rx, std::size_t event, const Batch &b)
{
	const json &e = rx.events.at(event);
	const auto &fds = rx.fds.at(event);
	const json &conns = e.at("connections");
	REQUIRE(conns.size() == fds.size());
	std::vector<std::uint64_t> out;
	for (std::size_t k = 0; k < conns.size(); k++) {
		CHECK(conns[k].at("fd").get<std::size_t>() == k);
		std::string state = conns[k].at("state").get<std::string>();
		std::uint64_t i = std::stoull(state.substr(1));
		REQUIRE(i < b.inodes.size());
		CHECK(inode(fds[k].get()) == b.inodes[i]);
		out.push_back(i);
	}
	return out;
}

std::uint64_t forward_id(const FakeSink &rx, std::size_t event)
{
	return rx.events.at(event).at("batch").get<std::uint64_t>();
}

} // namespace

TEST_CASE("router: an even split across receivers, rotating the larger shares")
{
	std::size_t fds_before = open_fds();
	{
		Router router;
		FakeSink tx, a, b, c;
		std::vector<EventSink *> rx = {&a, &b, &c};
		std::vector<FakeSink *> sinks = {&a, &b, &c};

		// 10 over 3: one chunk of 4 and two of 3; the 4 moves on with each batch.
		for (std::uint64_t batch = 1; batch <= 3; batch++) {
			INFO("batch ", batch);
			Batch items = make_batch(10);
			Batch copy;
			copy.inodes = items.inodes;
			std::vector<std::size_t> before;
			for (auto *s : sinks)
				before.push_back(s->events.size());
			router.submit(tx, batch, items, rx);
			std::set<std::uint64_t> seen;
			for (std::size_t k = 0; k < sinks.size(); k++) {
				REQUIRE(sinks[k]->events.size() == before[k] + 1);
				auto got = check_chunk(*sinks[k], before[k], copy);
				CHECK(got.size() == (k == (batch - 1) % 3 ? 4u : 3u));
				CHECK(got.size() <= 10u);
				seen.insert(got.begin(), got.end());
			}
			CHECK(seen.size() == 10); // every connection once
			CHECK(tx.events.empty() == (batch == 1));
			// The result comes only with the last acknowledgement.
			std::size_t results = tx.results().size();
			for (std::size_t k = 0; k < sinks.size(); k++) {
				CHECK(tx.results().size() == results);
				CHECK_FALSE(router.r.received(*sinks[k], forward_id(*sinks[k], before[k]), {}));
			}
			REQUIRE(tx.results().size() == results + 1);
			json res = tx.results().back();
			CHECK(res["batch"] == batch);
			CHECK(res["landed"] == 10);
			CHECK(res["returned"] == json::array());
		}
		CHECK(router.r.batches_in_flight() == 0);
		CHECK(router.r.chunks_in_flight() == 0);

		// Fewer connections than receivers: one each, to as many as there are connections.
		Batch two = make_batch(2);
		router.submit(tx, 9, two, rx);
		std::size_t chunks = 0;
		for (auto *s : sinks)
			for (auto e : s->chunks())
				if (s->events[e]["connections"].size() == 1 && s->fds[e].size() == 1)
					chunks++;
		CHECK(chunks == 2);
		CHECK(router.r.chunks_in_flight() == 2);
		CHECK(router.landed() == 30);
		CHECK(router.returned() == 0);
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("router: refused indices go back as the sender's indices")
{
	Router router;
	FakeSink tx, a, b;
	std::vector<EventSink *> rx = {&a, &b};
	Batch items = make_batch(7);
	Batch copy;
	copy.inodes = items.inodes;
	router.submit(tx, 42, items, rx);
	REQUIRE(a.chunks().size() == 1);
	REQUIRE(b.chunks().size() == 1);
	auto in_a = check_chunk(a, 0, copy);
	auto in_b = check_chunk(b, 0, copy);

	// a refuses its first and last, b its second.
	REQUIRE(in_a.size() >= 2);
	REQUIRE(in_b.size() >= 2);
	CHECK_FALSE(router.r.received(a, forward_id(a, 0), {in_a.size() - 1, 0}));
	CHECK(tx.results().empty());
	CHECK_FALSE(router.r.received(b, forward_id(b, 0), {1}));
	REQUIRE(tx.results().size() == 1);
	json res = tx.results()[0];
	std::vector<std::uint64_t> want = {in_a.front(), in_a.back(), in_b[1]};
	std::sort(want.begin(), want.end());
	CHECK(res["batch"] == 42);
	CHECK(res["landed"] == 4);
	CHECK(indices(res) == want);
	CHECK(router.landed() == 4);
	CHECK(router.returned() == 3);
	for (const auto &rep : router.reports) {
		CHECK(rep.service == "web");
		CHECK(rep.sender == &tx);
	}
}

TEST_CASE("router: a receiver that goes away returns its chunk")
{
	Router router;
	FakeSink tx, a, b;
	std::vector<EventSink *> rx = {&a, &b};
	Batch items = make_batch(6);
	Batch copy;
	copy.inodes = items.inodes;
	router.submit(tx, 1, items, rx);
	auto in_a = check_chunk(a, 0, copy);
	router.r.forget(a);
	CHECK(tx.results().empty());
	CHECK(router.r.chunks_in_flight() == 1);
	// Its ack, late, is no longer valid.
	CHECK(router.r.received(a, forward_id(a, 0), {}));
	CHECK_FALSE(router.r.received(b, forward_id(b, 0), {}));
	REQUIRE(tx.results().size() == 1);
	std::sort(in_a.begin(), in_a.end());
	CHECK(indices(tx.results()[0]) == in_a);
	CHECK(tx.results()[0]["landed"] == 6 - in_a.size());
	CHECK(router.landed() + router.returned() == 6);
	// The report of the lost chunk names its receiver.
	bool named = false;
	for (const auto &rep : router.reports)
		named = named || (rep.receiver == &a && rep.returned == in_a.size() && rep.landed == 0);
	CHECK(named);
	CHECK(router.r.batches_in_flight() == 0);
}

TEST_CASE("router: a sender that goes away gets no result, its receivers' acks still count")
{
	Router router;
	FakeSink tx, other, a, b;
	std::vector<EventSink *> rx = {&a, &b};
	Batch items = make_batch(4);
	router.submit(tx, 1, items, rx);
	Batch more = make_batch(4);
	router.submit(other, 1, more, rx); // same batch id, another sender: no clash
	CHECK(router.r.batches_in_flight(tx) == 1);
	CHECK(router.r.batches_in_flight(other) == 1);
	router.r.forget(tx);
	CHECK(router.r.batches_in_flight(tx) == 0);
	CHECK(router.r.batches_in_flight() == 2); // still waiting on its receivers
	for (FakeSink *s : {&a, &b})
		for (auto e : s->chunks())
			CHECK_FALSE(router.r.received(*s, forward_id(*s, e), {}));
	CHECK(tx.events.empty());
	REQUIRE(other.results().size() == 1);
	CHECK(other.results()[0]["landed"] == 4);
	CHECK(router.r.batches_in_flight() == 0);
	CHECK(router.r.chunks_in_flight() == 0);
	CHECK(router.landed() == 8);
	std::size_t orphaned = 0;
	for (const auto &rep : router.reports)
		orphaned += rep.sender == nullptr ? rep.landed : 0;
	CHECK(orphaned == 4);
}

TEST_CASE("router: a receiver whose send fails gets nothing, its share returns")
{
	std::size_t fds_before = open_fds();
	{
		Router router;
		FakeSink tx, a, b, c;
		std::vector<EventSink *> rx = {&a, &b, &c};

		SUBCASE("it just fails")
		{
			b.fail = true;
		}
		SUBCASE("it closes, and tells the router, from inside the call")
		{
			b.fail = true;
			b.during = [&] { router.r.forget(b); };
		}
		Batch items = make_batch(9);
		router.submit(tx, 5, items, rx);
		CHECK(b.events.empty());
		CHECK(tx.results().empty()); // a and c have not answered
		CHECK(router.r.chunks_in_flight() == 2);
		CHECK_FALSE(router.r.received(a, forward_id(a, 0), {}));
		CHECK_FALSE(router.r.received(c, forward_id(c, 0), {}));
		REQUIRE(tx.results().size() == 1);
		CHECK(tx.results()[0]["landed"] == 6);
		CHECK(indices(tx.results()[0]).size() == 3);
		CHECK(router.landed() == 6);
		CHECK(router.returned() == 3);
		CHECK(router.r.batches_in_flight() == 0);
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("router: every receiver failing settles the batch at once")
{
	Router router;
	FakeSink tx, a, b;
	a.fail = b.fail = true;
	b.during = [&] { router.r.forget(b); };
	std::vector<EventSink *> rx = {&a, &b};
	Batch items = make_batch(5);
	router.submit(tx, 3, items, rx);
	REQUIRE(tx.results().size() == 1);
	CHECK(tx.results()[0]["landed"] == 0);
	CHECK(indices(tx.results()[0]) == all_of(5));
	CHECK(router.r.batches_in_flight() == 0);
	CHECK(router.r.chunks_in_flight() == 0);
	CHECK(router.returned() == 5);
}

TEST_CASE("router: refusals: too many batches in flight, a batch id in use, no receivers")
{
	std::size_t fds_before = open_fds();
	{
		Router router;
		FakeSink tx, a;
		std::vector<EventSink *> rx = {&a};
		for (std::uint64_t i = 1; i <= HandoffRouter::kMaxBatchesInFlight; i++) {
			Batch items = make_batch(2);
			router.submit(tx, i, items, rx);
		}
		CHECK(tx.events.empty());
		CHECK(router.r.batches_in_flight(tx) == HandoffRouter::kMaxBatchesInFlight);

		Batch over = make_batch(3);
		router.submit(tx, 100, over, rx);
		REQUIRE(tx.results().size() == 1);
		json res = tx.results()[0];
		CHECK(res["batch"] == 100);
		CHECK(res["landed"] == 0);
		CHECK(indices(res) == all_of(3));
		CHECK(res.value("message", "").find("in flight") != std::string::npos);
		CHECK(a.chunks().size() == HandoffRouter::kMaxBatchesInFlight);

		// A batch id still in flight: refused, and the one in flight is unharmed.
		CHECK_FALSE(router.r.received(a, forward_id(a, 0), {}));
		REQUIRE(tx.results().size() == 2);
		Batch dup = make_batch(2);
		router.submit(tx, 2, dup, rx);
		REQUIRE(tx.results().size() == 3);
		CHECK(tx.results()[2]["batch"] == 2);
		CHECK(indices(tx.results()[2]) == all_of(2));
		CHECK(tx.results()[2].value("message", "").find("already in flight") != std::string::npos);
		CHECK_FALSE(router.r.received(a, forward_id(a, 1), {}));
		REQUIRE(tx.results().size() == 4);
		CHECK(tx.results()[3]["batch"] == 2);
		CHECK(tx.results()[3]["landed"] == 2);
		// Batch 1 has settled: its id may be used again.
		Batch again = make_batch(2);
		router.submit(tx, 1, again, rx);
		CHECK(tx.results().size() == 4);
		CHECK(router.r.batches_in_flight(tx) == HandoffRouter::kMaxBatchesInFlight - 1);

		// No receivers: everything back at once, with the reason.
		FakeSink lonely;
		Batch none = make_batch(4);
		router.submit(lonely, 7, none, {});
		REQUIRE(lonely.results().size() == 1);
		CHECK(lonely.results()[0]["landed"] == 0);
		CHECK(indices(lonely.results()[0]) == all_of(4));
		CHECK(lonely.results()[0].value("message", "") != "");
		CHECK(router.r.batches_in_flight(lonely) == 0);

		// An empty batch: answered at once.
		FakeSink empty;
		Batch zero;
		router.submit(empty, 1, zero, rx);
		REQUIRE(empty.results().size() == 1);
		CHECK(empty.results()[0]["landed"] == 0);
		CHECK(empty.results()[0]["returned"] == json::array());

		// The refusals count as returned, with no receiver.
		std::size_t unrouted = 0;
		for (const auto &rep : router.reports)
			unrouted += rep.receiver == nullptr ? rep.returned : 0;
		CHECK(unrouted == 3 + 2 + 4);
		CHECK(router.landed() == 4);
		CHECK(router.returned() == 3 + 2 + 4);
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("router: an unknown or foreign batch, or a bad index, is rejected and changes nothing")
{
	Router router;
	FakeSink tx, a, b, stranger;
	std::vector<EventSink *> rx = {&a, &b};
	Batch items = make_batch(4);
	router.submit(tx, 1, items, rx);
	std::uint64_t fa = forward_id(a, 0), fb = forward_id(b, 0);

	CHECK(router.r.received(a, fb, {}));         // b's chunk
	CHECK(router.r.received(stranger, fa, {}));  // not sent to it at all
	CHECK(router.r.received(a, 9999, {}));       // never sent
	CHECK(router.r.received(a, fa, {2}));        // a has 2: indices 0 and 1
	CHECK(router.r.received(a, fa, {0, 0}));     // twice
	CHECK(router.r.received(a, fa, {1, 0, 1}));
	CHECK(router.r.chunks_in_flight() == 2);
	CHECK(router.reports.empty());
	CHECK(tx.events.empty());

	CHECK_FALSE(router.r.received(a, fa, {1}));
	CHECK(router.r.received(a, fa, {})); // acknowledged already
	CHECK_FALSE(router.r.received(b, fb, {}));
	REQUIRE(tx.results().size() == 1);
	CHECK(tx.results()[0]["landed"] == 3);
	CHECK(indices(tx.results()[0]).size() == 1);
}

TEST_CASE("router: no fd is kept or leaked, and the reports add up, over a mixed run")
{
	std::size_t fds_before = open_fds();
	std::size_t total = 0;
	{
		Router router;
		FakeSink tx1, tx2, a, b, c;
		std::vector<EventSink *> rx = {&a, &b, &c};
		std::uint64_t id = 1;
		for (std::size_t n : {1u, 2u, 3u, 50u, 253u, 17u}) {
			for (FakeSink *tx : {&tx1, &tx2}) {
				Batch items = make_batch(n);
				total += n;
				std::size_t held_before = a.held() + b.held() + c.held();
				router.submit(*tx, id, items, rx);
				// The router holds no fd once the call returns: they all went to receivers.
				CHECK(a.held() + b.held() + c.held() == held_before + n);
			}
			id++;
		}
		// a acknowledges all, refusing every third; b goes away; c acknowledges half, then goes away.
		for (auto e : a.chunks()) {
			std::vector<std::uint64_t> refused;
			for (std::uint64_t k = 0; k < a.fds[e].size(); k += 3)
				refused.push_back(k);
			CHECK_FALSE(router.r.received(a, forward_id(a, e), refused));
		}
		router.r.forget(b);
		auto cc = c.chunks();
		for (std::size_t k = 0; k < cc.size() / 2; k++)
			CHECK_FALSE(router.r.received(c, forward_id(c, cc[k]), {}));
		std::size_t tx2_heard = tx2.events.size();
		router.r.forget(tx2); // its later results go nowhere
		router.r.forget(c);
		CHECK(router.r.batches_in_flight() == 0);
		CHECK(router.r.chunks_in_flight() == 0);

		CHECK(router.landed() + router.returned() == total);
		// What tx1 heard adds up to what it sent.
		std::size_t heard = 0;
		for (const auto &res : tx1.results())
			heard += res["landed"].get<std::size_t>() + indices(res).size();
		CHECK(heard == total / 2);
		CHECK(tx2.events.size() == tx2_heard);
		// Per receiver: landed only where acknowledged.
		std::size_t landed_b = 0, returned_b = 0;
		for (const auto &rep : router.reports)
			if (rep.receiver == &b)
				landed_b += rep.landed, returned_b += rep.returned;
		CHECK(landed_b == 0);
		CHECK(returned_b == b.held());
	}
	CHECK(open_fds() == fds_before);
	CHECK(total == 2 * (1 + 2 + 3 + 50 + 253 + 17));
}

TEST_CASE("router: a receiver with too much unacknowledged is sent more only as it acknowledges")
{
	std::size_t fds_before = open_fds();
	{
		Router rt;
		FakeSink sender, receiver;
		EventSink *targets[] = {&receiver};
		// Each connection's state is a tenth of the limit.
		const std::string big(HandoffRouter::kMaxUnackedBytes / 10, 'A');
		auto batch_of = [&](std::size_t n) {
			Batch b = make_batch(n);
			for (auto &item : b.items)
				item.state = big;
			return b;
		};
		// 12 batches of one connection each (a sender may have 16 in flight).
		for (std::uint64_t id = 1; id <= 12; id++)
			rt.r.submit("web", sender, id, std::move(batch_of(1).items), targets);
		// The limit lets 9 through (each chunk is its state plus a little): the rest wait here,
		// fds and all.
		std::size_t sent = receiver.chunks().size();
		CHECK(sent == 9);
		CHECK(rt.r.chunks_held() == 12 - sent);
		CHECK(sender.results().empty());
		// A held chunk was not sent: acknowledging it is refused, and changes nothing.
		std::uint64_t last_sent = receiver.events[receiver.chunks().back()]["batch"].get<std::uint64_t>();
		CHECK(rt.r.received(receiver, last_sent + 1, {}));
		CHECK(rt.r.chunks_held() == 12 - sent);
		CHECK(rt.landed() == 0);

		// Each acknowledgement makes room for one more.
		std::size_t acked = 0;
		while (acked < receiver.chunks().size()) {
			const json &ev = receiver.events[receiver.chunks()[acked]];
			CHECK_FALSE(rt.r.received(receiver, ev["batch"].get<std::uint64_t>(), {}));
			acked++;
		}
		CHECK(acked == 12);
		CHECK(rt.r.chunks_held() == 0);
		CHECK(sender.results().size() == 12);
		CHECK(rt.landed() == 12);

		// Held chunks of a receiver that goes away return, and their fds close.
		FakeSink slow;
		EventSink *one[] = {&slow};
		for (std::uint64_t id = 20; id < 32; id++)
			rt.r.submit("web", sender, id, std::move(batch_of(1).items), one);
		CHECK(rt.r.chunks_held() == 3);
		rt.r.forget(slow);
		CHECK(rt.r.chunks_held() == 0);
		CHECK(rt.r.chunks_in_flight() == 0);
		CHECK(sender.results().size() == 24);
		CHECK(rt.returned() == 12);
		slow.fds.clear();
		receiver.fds.clear();
	}
	CHECK(open_fds() == fds_before);
}
