// handoff::Sender and base64 unit tests: batch sizes, the window, completions and abandoning.
#include "proto/handoff.hpp"
#include "proto/limits.hpp"
#include "proto/varlink.hpp"

#include "open_fds.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>

#include <random>
#include <set>

using namespace proto;
using namespace proto::handoff;
using json = nlohmann::json;

namespace {

bool is_open(int fd)
{
	return ::fcntl(fd, F_GETFD) >= 0;
}

Item item(std::string state)
{
	UniqueFd fd(::memfd_create("sender-test", MFD_CLOEXEC));
	REQUIRE(fd);
	return Item{std::move(fd), std::move(state)};
}

// Adds n items with state "c<i>", counting from first.
void add(Sender &s, std::size_t n, std::size_t first = 0)
{
	for (std::size_t i = 0; i < n; i++)
		s.add(item("c" + std::to_string(first + i)));
}

std::size_t conns(const Sender::Batch &b)
{
	return b.parameters.at("connections").size();
}

// The whole Handoff call as the library sends it.
std::size_t message_size(const Sender::Batch &b)
{
	return varlink::make_call("io.brokerd.Worker.Handoff", b.parameters, false, true).dump().size();
}

} // namespace

TEST_CASE("sender: batches of at most 253, fd indices in order, remaining counted down")
{
	Sender s;
	add(s, 600);
	CHECK(s.pending() == 600);
	std::vector<std::size_t> sizes;
	std::size_t next_state = 0;
	std::uint64_t last_id = 0;
	while (auto b = s.next()) {
		CHECK(b->id > last_id);
		last_id = b->id;
		CHECK(b->parameters["batch"] == b->id);
		REQUIRE(conns(*b) == b->fds.size());
		for (std::size_t k = 0; k < conns(*b); k++) {
			const json &c = b->parameters["connections"][k];
			CHECK(c["fd"] == k);
			CHECK(base64_decode(c["state"].get<std::string>()) == "c" + std::to_string(next_state++));
			CHECK(is_open(b->fds[k]));
		}
		sizes.push_back(conns(*b));
		CHECK(b->parameters["remaining"] == s.queued());
	}
	CHECK(sizes == std::vector<std::size_t>{253, 253, 94});
	CHECK(s.queued() == 0);
	CHECK(s.pending() == 600);
	CHECK(s.in_flight_batches() == 3);
}

TEST_CASE("sender: an empty state is left out")
{
	Sender s;
	s.add(item(""));
	auto b = s.next();
	REQUIRE(b);
	CHECK_FALSE(b->parameters["connections"][0].contains("state"));
}

TEST_CASE("sender: large states keep each call under the message limit")
{
	// The largest states: a batch is cut by bytes long before 253.
	Sender s;
	std::string big(kMaxState, '\xff');
	for (int i = 0; i < 300; i++)
		s.add(item(big));
	std::size_t total = 0;
	while (auto b = s.next()) {
		CHECK(conns(*b) >= 1);
		CHECK(conns(*b) < limits::kMaxFdsPerMessage);
		CHECK(message_size(*b) <= limits::kMaxMessageSize);
		total += conns(*b);
		Sender::Completion done;
		REQUIRE(s.complete(b->id, conns(*b), {}, {}, done));
	}
	CHECK(total == 300);

	// Mixed sizes: never over the limit, never empty.
	Sender m;
	std::mt19937 rng(4);
	for (int i = 0; i < 2000; i++)
		m.add(item(std::string(rng() % (kMaxState + 1), 'x')));
	std::size_t sent = 0;
	while (m.queued()) {
		auto b = m.next();
		REQUIRE(b);
		CHECK(conns(*b) >= 1);
		CHECK(conns(*b) <= limits::kMaxFdsPerMessage);
		CHECK(message_size(*b) <= limits::kMaxMessageSize);
		sent += conns(*b);
		Sender::Completion done;
		REQUIRE(m.complete(b->id, conns(*b), {}, {}, done));
	}
	CHECK(sent == 2000);
}

TEST_CASE("sender: a window of 8 batches in flight")
{
	Sender s;
	add(s, 253 * 10);
	std::vector<std::uint64_t> ids;
	while (auto b = s.next())
		ids.push_back(b->id);
	CHECK(ids.size() == kWindow);
	CHECK(s.in_flight_batches() == kWindow);
	CHECK(s.queued() == 253 * 2);
	CHECK_FALSE(s.next());

	Sender::Completion done;
	REQUIRE(s.complete(ids[3], 253, {}, {}, done));
	CHECK(done.landed == 253);
	CHECK(done.returned.empty());
	auto b = s.next();
	REQUIRE(b);
	CHECK(conns(*b) == 253);
	CHECK_FALSE(s.next());
	CHECK(s.pending() == 253 * 9);
}

TEST_CASE("sender: complete() rejects what does not add up, and changes nothing")
{
	std::size_t fds_before = open_fds();
	{
		Sender s;
		add(s, 5);
		auto b = s.next();
		REQUIRE(b);
		std::vector<int> fds = b->fds;
		Sender::Completion done;
		CHECK_FALSE(s.complete(b->id + 1, 5, {}, {}, done)); // unknown batch
		CHECK_FALSE(s.complete(b->id, 4, {}, {}, done));     // one missing
		CHECK_FALSE(s.complete(b->id, 5, {0}, {}, done));    // one too many
		CHECK_FALSE(s.complete(b->id, 3, {0, 9}, {}, done)); // out of range
		CHECK_FALSE(s.complete(b->id, 3, {1, 1}, {}, done)); // twice
		CHECK_FALSE(s.complete(b->id, 0, {0, 1, 2, 3, 4, 5}, {}, done));
		CHECK(s.pending() == 5);
		CHECK(s.in_flight_batches() == 1);
		for (int fd : fds)
			CHECK(is_open(fd));

		// Now the right answer: returned ones come back with their state, landed ones close.
		REQUIRE(s.complete(b->id, 3, {4, 1}, {}, done));
		CHECK(done.landed == 3);
		REQUIRE(done.returned.size() == 2);
		CHECK(done.returned[0].fd.get() == fds[1]);
		CHECK(done.returned[0].state == "c1");
		CHECK(done.returned[1].fd.get() == fds[4]);
		CHECK(done.returned[1].state == "c4");
		for (int k : {0, 2, 3})
			CHECK_FALSE(is_open(fds[k]));
		CHECK(is_open(fds[1]));
		CHECK(is_open(fds[4]));
		CHECK(s.pending() == 0);
		CHECK(s.in_flight_batches() == 0);
		CHECK_FALSE(s.complete(b->id, 3, {4, 1}, {}, done)); // once only
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("sender: when the broker goes, what was never sent comes back and what was in flight closes")
{
	std::size_t fds_before = open_fds();
	{
		Sender s;
		add(s, 253 * 9 + 7);
		std::size_t batches = 0;
		while (s.next())
			batches++;
		CHECK(batches == kWindow);
		Sender::Completion done;
		REQUIRE(s.complete(2, 253, {}, {}, done));
		// 7 batches in flight: they may have landed already, so they are closed, not given back.
		CHECK(s.drop_in_flight() == 253 * 7);
		auto back = s.take_unsent();
		CHECK(back.size() == 253 + 7);
		CHECK(s.pending() == 0);
		CHECK(s.queued() == 0);
		CHECK(s.in_flight_batches() == 0);
		CHECK_FALSE(s.next());
		std::set<std::string> states;
		for (const auto &it : back) {
			CHECK(is_open(it.fd.get()));
			states.insert(it.state);
		}
		CHECK(states.size() == back.size());
		CHECK_FALSE(states.count("c0"));   // in flight: closed
		CHECK_FALSE(states.count("c253")); // batch 2 landed
		CHECK(states.count("c" + std::to_string(253 * 8)));
		CHECK(states.count("c" + std::to_string(253 * 9 + 6)));
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("sender: batches that never left go back to the queue before the rest are dropped")
{
	std::size_t fds_before = open_fds();
	{
		Sender s;
		add(s, 253 * 3);
		auto b1 = s.next(), b2 = s.next(), b3 = s.next();
		REQUIRE(b3);
		// The broker went away with batch 1 written and 2 and 3 still queued in the stream.
		s.requeue_newest(2);
		CHECK(s.in_flight_batches() == 1);
		CHECK(s.drop_in_flight() == 253);
		auto back = s.take_unsent();
		REQUIRE(back.size() == 253 * 2);
		CHECK(back.front().state == "c253"); // batch 2's first, in order
		CHECK(back.back().state == "c" + std::to_string(253 * 3 - 1));
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("sender: a batch that could not be queued goes back to the front, in order")
{
	std::size_t fds_before = open_fds();
	{
		Sender s;
		add(s, 300);
		auto first = s.next();
		REQUIRE(first);
		s.requeue(first->id);
		CHECK(s.in_flight_batches() == 0);
		CHECK(s.queued() == 300);
		auto again = s.next();
		REQUIRE(again);
		CHECK(again->parameters["connections"].size() == 253);
		CHECK(again->fds == first->fds); // the same connections, in the same order
		s.set_window(1);
		CHECK_FALSE(s.next()); // the window of one is full
		s.requeue(12345);      // unknown: nothing happens
		CHECK(s.pending() == 300);
	}
	CHECK(open_fds() == fds_before);
}

TEST_CASE("base64: known vectors, round trips and rejections")
{
	const std::pair<const char *, const char *> vectors[] = {
		{"", ""}, {"f", "Zg=="}, {"fo", "Zm8="}, {"foo", "Zm9v"}, {"foob", "Zm9vYg=="},
		{"fooba", "Zm9vYmE="}, {"foobar", "Zm9vYmFy"},
	};
	for (const auto &[plain, text] : vectors) {
		CHECK(base64_encode(plain) == text);
		CHECK(base64_decode(text) == std::string(plain));
		CHECK(base64_valid(text, std::string_view(plain).size()));
	}

	std::mt19937 rng(7);
	for (std::size_t n = 0; n < 300; n++) {
		std::string bytes(n, '\0');
		for (auto &c : bytes)
			c = static_cast<char>(rng());
		std::string text = base64_encode(bytes);
		CHECK(text.size() % 4 == 0);
		CHECK(base64_decode(text) == bytes);
		CHECK(base64_valid(text, n));
		if (n > 0)
			CHECK_FALSE(base64_valid(text, n - 1));
	}

	for (const char *bad : {"Z", "Zg", "Zg=", "Zm9vY", "Z===", "====", "=Zm9", "Zg==Zg==", "Zm9v!A==", "Zm 9",
	                        "Zm9v\n", "Zm-_", "Zm9v\xff\xff\xff\xff"}) {
		INFO("text: ", bad);
		CHECK_FALSE(base64_decode(bad));
		CHECK_FALSE(base64_valid(bad, 100));
	}
	std::string nul("Zm\0v", 4);
	CHECK_FALSE(base64_decode(nul));

	// The broker's limit on one connection's state.
	std::string at_limit = base64_encode(std::string(kMaxState, 'a'));
	std::string over = base64_encode(std::string(kMaxState + 1, 'a'));
	CHECK(base64_valid(at_limit, kMaxState));
	CHECK_FALSE(base64_valid(over, kMaxState));
	CHECK(base64_decode(over)); // decoding itself has no limit
}
