// Unit tests of the direct handoff channel's codec (proto/handoff_channel.hpp): how many
// connections one frame carries, frames and acknowledgements that survive encoding, and every
// frame the decoders refuse, with the reason they give. And close_all, how a sender closes its
// copies of the connections that landed.
#include "proto/handoff_channel.hpp"
#include "proto/limits.hpp"
#include "proto/unique_fd.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <vector>

using namespace proto::handoff;
namespace ch = proto::handoff::channel;

namespace {

constexpr std::size_t kMaxFds = proto::limits::kMaxFdsPerMessage;

// Where the header's fields sit in a frame.
constexpr std::size_t kMagicAt = offsetof(ch::Header, magic);
constexpr std::size_t kVersionAt = offsetof(ch::Header, version);
constexpr std::size_t kTypeAt = offsetof(ch::Header, type);
constexpr std::size_t kCountAt = offsetof(ch::Header, count);
constexpr std::size_t kBytesAt = offsetof(ch::Header, bytes);
constexpr std::size_t kIdAt = offsetof(ch::Header, id);
constexpr std::size_t kLengthsAt = sizeof(ch::Header); // a connections frame's first length

// A queue of connections with these states' sizes; the codec never looks at the fds.
std::deque<Item> queue_of(const std::vector<std::size_t> &sizes)
{
	std::deque<Item> q;
	for (std::size_t i = 0; i < sizes.size(); i++)
		q.push_back(Item{proto::UniqueFd(), std::string(sizes[i], static_cast<char>('a' + i % 26))});
	return q;
}

std::deque<Item> queue_of(std::size_t n, std::size_t size)
{
	return queue_of(std::vector<std::size_t>(n, size));
}

template <typename T>
void poke(std::string &frame, std::size_t at, T value)
{
	REQUIRE(at + sizeof value <= frame.size());
	std::memcpy(frame.data() + at, &value, sizeof value);
}

// A copy of frame with a field changed.
template <typename T>
std::string poked(std::string frame, std::size_t at, T value)
{
	poke(frame, at, value);
	return frame;
}

template <typename T>
T peek(const std::string &frame, std::size_t at)
{
	T value{};
	REQUIRE(at + sizeof value <= frame.size());
	std::memcpy(&value, frame.data() + at, sizeof value);
	return value;
}

std::string connections_frame(std::uint64_t id, const std::deque<Item> &q)
{
	std::string out;
	ch::encode_connections(out, id, q, q.size());
	return out;
}

std::string ack_frame(std::uint64_t id, const std::vector<std::uint32_t> &refused)
{
	std::string out;
	ch::encode_ack(out, id, refused);
	return out;
}

// Why decode_connections refuses the frame, or "" when it takes it.
std::string refusal(const std::string &frame)
{
	ch::Connections c;
	return ch::decode_connections(frame, c).value_or("");
}

std::string ack_refusal(const std::string &frame, std::size_t count = 0)
{
	ch::Ack a;
	return ch::decode_ack(frame, a, count).value_or("");
}

} // namespace

TEST_CASE("frame_fit: 253 connections at most, the caller's cap, 64 KiB, and always the first one")
{
	CHECK(ch::frame_fit({}, 253) == 0);
	CHECK(ch::frame_fit(queue_of(1, 0), 253) == 1);
	CHECK(ch::frame_fit(queue_of(300, 0), SIZE_MAX) == kMaxFds);
	CHECK(ch::frame_fit(queue_of(300, 10), 1000) == kMaxFds);
	CHECK(ch::frame_fit(queue_of(253, 10), 253) == 253);
	CHECK(ch::frame_fit(queue_of(300, 10), 7) == 7);
	CHECK(ch::frame_fit(queue_of(5, 10), 253) == 5);

	// Four of the largest states make 24 + 4 * (4 + 16384) bytes, over 64 KiB: three fit.
	CHECK(ch::frame_fit(queue_of(10, kMaxState), 253) == 3);
	// A frame of exactly 64 KiB fits, one byte more does not.
	std::vector<std::size_t> exact = {kMaxState, kMaxState, kMaxState, ch::kMaxFrameBytes - 24 - 4 * 4 - 3 * kMaxState};
	CHECK(ch::frame_fit(queue_of(exact), 253) == 4);
	std::string frame;
	ch::encode_connections(frame, 1, queue_of(exact), 4);
	CHECK(frame.size() == ch::kMaxFrameBytes);
	exact.back()++;
	CHECK(ch::frame_fit(queue_of(exact), 253) == 3);
	// After a big state, 8 bytes are left: a length and 4 bytes of state, or two empty ones.
	const std::size_t big = ch::kMaxFrameBytes - 24 - 4 - 8;
	CHECK(ch::frame_fit(queue_of({big, 4, 0}), 253) == 2);
	CHECK(ch::frame_fit(queue_of({big, 5}), 253) == 1);
	CHECK(ch::frame_fit(queue_of({big, 0, 0, 0}), 253) == 3);

	// One state bigger than a frame still goes, alone: the queue never sticks.
	CHECK(ch::frame_fit(queue_of({ch::kMaxFrameBytes * 2, 1}), 253) == 1);
	CHECK(ch::frame_fit(queue_of({ch::kMaxFrameBytes * 2}), 1) == 1);
}

TEST_CASE("connections frames survive encoding: 0, 1 and 253 connections, empty and 16 KiB states")
{
	struct Case {
		const char *name;
		std::vector<std::size_t> sizes;
	};
	const Case cases[] = {
	        {"none", {}},
	        {"one empty", {0}},
	        {"one of 16 KiB", {kMaxState}},
	        {"three mixed", {0, kMaxState, 7}},
	        {"253 empty", std::vector<std::size_t>(253, 0)},
	        {"253 of 200 bytes", std::vector<std::size_t>(253, 200)},
	};
	for (const Case &c : cases) {
		CAPTURE(c.name);
		std::deque<Item> q = queue_of(c.sizes);
		const std::uint64_t id = 0x0123456789abcdefULL;
		std::string frame = connections_frame(id, q);

		std::size_t total = 0;
		for (std::size_t s : c.sizes)
			total += s;
		CHECK(frame.size() == sizeof(ch::Header) + 4 * c.sizes.size() + total);
		CHECK(peek<std::uint32_t>(frame, kMagicAt) == ch::kMagic);
		CHECK(peek<std::uint16_t>(frame, kVersionAt) == ch::kVersion);
		CHECK(peek<std::uint16_t>(frame, kTypeAt) == 1);
		CHECK(peek<std::uint32_t>(frame, kCountAt) == c.sizes.size());
		CHECK(peek<std::uint32_t>(frame, kBytesAt) == total);
		CHECK(peek<std::uint64_t>(frame, kIdAt) == id);
		CHECK(ch::frame_type(frame) == ch::Type::Connections);

		ch::Connections out;
		out.states.emplace_back("left over from a frame before");
		auto why = ch::decode_connections(frame, out);
		CHECK_MESSAGE(!why, why.value_or(""));
		CHECK(out.id == id);
		REQUIRE(out.states.size() == q.size());
		for (std::size_t i = 0; i < q.size(); i++)
			CHECK(out.states[i] == q[i].state);

		// And back to the same bytes.
		std::deque<Item> again;
		for (std::string_view s : out.states)
			again.push_back(Item{proto::UniqueFd(), std::string(s)});
		CHECK(connections_frame(id, again) == frame);
	}

	// A frame of the queue's front only.
	std::deque<Item> q = queue_of({3, 4, 5});
	std::string front;
	ch::encode_connections(front, 9, q, 2);
	ch::Connections out;
	REQUIRE(!ch::decode_connections(front, out));
	REQUIRE(out.states.size() == 2);
	CHECK(out.states[0] == q[0].state);
	CHECK(out.states[1] == q[1].state);
}

TEST_CASE("acknowledgements survive encoding: none, some and all 253 refused")
{
	std::vector<std::uint32_t> all(kMaxFds);
	for (std::uint32_t i = 0; i < all.size(); i++)
		all[i] = i;
	const std::vector<std::vector<std::uint32_t>> cases = {{}, {0}, {252}, {1, 5, 200}, all};
	for (const auto &refused : cases) {
		CAPTURE(refused.size());
		std::string frame = ack_frame(77, refused);
		CHECK(frame.size() == sizeof(ch::Header) + 4 * refused.size());
		CHECK(peek<std::uint16_t>(frame, kTypeAt) == 2);
		CHECK(peek<std::uint32_t>(frame, kCountAt) == refused.size());
		CHECK(peek<std::uint32_t>(frame, kBytesAt) == 0);
		CHECK(ch::frame_type(frame) == ch::Type::Ack);

		ch::Ack out;
		out.refused = {9, 9, 9};
		auto why = ch::decode_ack(frame, out);
		CHECK_MESSAGE(!why, why.value_or(""));
		CHECK(out.id == 77);
		CHECK(out.refused == refused);
		CHECK(ack_frame(out.id, out.refused) == frame);
	}
	// Under the frame's own size: the last index of a frame of 253, and of a frame of 6.
	CHECK(ack_refusal(ack_frame(1, all), 253) == "");
	CHECK(ack_refusal(ack_frame(1, {0, 5}), 6) == "");
}

TEST_CASE("frame_type: nullopt for a short frame or another protocol, else the header's type")
{
	std::string frame = ack_frame(1, {});
	CHECK(ch::frame_type(frame.substr(0, 23)) == std::nullopt);
	CHECK(ch::frame_type("") == std::nullopt);
	CHECK(ch::frame_type(poked<std::uint32_t>(frame, kMagicAt, ch::kMagic + 1)) == std::nullopt);
	CHECK(ch::frame_type(poked<std::uint16_t>(frame, kVersionAt, 2)) == std::nullopt);
	CHECK(ch::frame_type(poked<std::uint16_t>(frame, kTypeAt, 7)) == ch::Type{7});
}

TEST_CASE("decode_connections refuses every malformed frame, and says why")
{
	// 24 + 2 * 4 + 10 bytes: two states of 5.
	const std::string good = connections_frame(5, queue_of({5, 5}));
	REQUIRE(refusal(good) == "");
	struct Case {
		const char *name;
		std::string frame;
		std::string why;
	};
	const Case cases[] = {
	        {"empty", "", "a frame of 0 bytes, shorter than its header"},
	        {"short", good.substr(0, 23), "a frame of 23 bytes, shorter than its header"},
	        {"wrong magic", poked<std::uint32_t>(good, kMagicAt, 0x50424b48), "a frame of another protocol or version"},
	        {"wrong version", poked<std::uint16_t>(good, kVersionAt, 2), "a frame of another protocol or version"},
	        {"an acknowledgement", ack_frame(5, {0}), "a frame of type 2 where 1 belongs"},
	        {"unknown type", poked<std::uint16_t>(good, kTypeAt, 0), "a frame of type 0 where 1 belongs"},
	        {"254 connections", connections_frame(5, queue_of(254, 0)), "a frame of 254 entries, over 253"},
	        {"count far over", poked<std::uint32_t>(good, kCountAt, 0xffffffffu), "a frame of 4294967295 entries, over 253"},
	        {"a byte missing", good.substr(0, good.size() - 1), "a frame of 41 bytes where its header says 42"},
	        {"a byte over", good + "x", "a frame of 43 bytes where its header says 42"},
	        {"count says one more", poked<std::uint32_t>(good, kCountAt, 3), "a frame of 42 bytes where its header says 46"},
	        {"bytes says one less", poked<std::uint32_t>(good, kBytesAt, 9), "a frame of 42 bytes where its header says 41"},
	        {"bytes wraps", poked<std::uint32_t>(good, kBytesAt, 0xffffffffu),
	         "a frame of 42 bytes where its header says 4294967327"},
	        {"a state over 16 KiB", connections_frame(5, queue_of({1, kMaxState + 1})), "a state of 16385 bytes, over 16384"},
	        {"a length over the frame", poked<std::uint32_t>(good, kLengthsAt, 6), "states longer than the frame"},
	        {"a length far over the frame", poked<std::uint32_t>(good, kLengthsAt + 4, kMaxState),
	         "states longer than the frame"},
	        {"lengths under the frame", poked<std::uint32_t>(good, kLengthsAt, 4), "states shorter than the frame"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.name);
		CHECK(refusal(c.frame) == c.why);
	}
}

TEST_CASE("decode_ack refuses every malformed acknowledgement, and says why")
{
	// 24 + 2 * 4 bytes: indices 1 and 3 refused.
	const std::string good = ack_frame(5, {1, 3});
	REQUIRE(ack_refusal(good) == "");
	struct Case {
		const char *name;
		std::string frame;
		std::size_t count; // the frame's size, 0 when unknown
		std::string why;
	};
	const Case cases[] = {
	        {"empty", "", 0, "a frame of 0 bytes, shorter than its header"},
	        {"short", good.substr(0, 10), 0, "a frame of 10 bytes, shorter than its header"},
	        {"wrong magic", poked<std::uint32_t>(good, kMagicAt, 0), 0, "a frame of another protocol or version"},
	        {"wrong version", poked<std::uint16_t>(good, kVersionAt, 0), 0, "a frame of another protocol or version"},
	        {"a connections frame", connections_frame(5, queue_of({1})), 0, "a frame of type 1 where 2 belongs"},
	        {"254 refused", ack_frame(5, std::vector<std::uint32_t>(254, 0)), 0, "a frame of 254 entries, over 253"},
	        {"an index missing", good.substr(0, good.size() - 4), 0, "an acknowledgement of 28 bytes for 2 refused"},
	        {"a byte over", good + "x", 0, "an acknowledgement of 33 bytes for 2 refused"},
	        {"bytes not 0", poked<std::uint32_t>(good, kBytesAt, 8) + std::string(8, '\0'), 0,
	         "an acknowledgement of 40 bytes for 2 refused"},
	        {"bytes not 0, size right", poked<std::uint32_t>(good, kBytesAt, 1), 0,
	         "an acknowledgement of 32 bytes for 2 refused"},
	        {"out of order", ack_frame(5, {3, 1}), 0, "refused indices out of order or repeated"},
	        {"repeated", ack_frame(5, {1, 1}), 0, "refused indices out of order or repeated"},
	        {"253 without a frame's size", ack_frame(5, {253}), 0, "refused index 253 of a frame of 253"},
	        {"the frame's size", ack_frame(5, {0, 4}), 4, "refused index 4 of a frame of 4"},
	        {"over a frame of 1", ack_frame(5, {1}), 1, "refused index 1 of a frame of 1"},
	        {"far over", ack_frame(5, {0xffffffffu}), 0, "refused index 4294967295 of a frame of 253"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.name);
		CHECK(ack_refusal(c.frame, c.count) == c.why);
	}
}

TEST_CASE("close_all closes each fd listed, runs and strays, twice listed or not, and nothing between")
{
	// 12 consecutive fds from 700 up, where nothing else of the test's is.
	std::vector<int> fds;
	for (int i = 0; i < 12; i++) {
		proto::UniqueFd e(::eventfd(0, EFD_CLOEXEC));
		REQUIRE(e);
		fds.push_back(::fcntl(e.get(), F_DUPFD_CLOEXEC, 700));
		REQUIRE(fds.back() == 700 + i);
	}
	// Listed: a run of 3, a stray, a run of 2 with one of them twice, the last; kept: the rest.
	std::vector<std::size_t> listed_at = {7, 0, 2, 1, 4, 9, 10, 10, 11};
	std::vector<int> listed;
	for (std::size_t i : listed_at)
		listed.push_back(fds[i]);
	proto::close_all(listed);
	CHECK(listed.empty());
	for (std::size_t i = 0; i < fds.size(); i++) {
		CAPTURE(i);
		bool was_listed = std::find(listed_at.begin(), listed_at.end(), i) != listed_at.end();
		CHECK((::fcntl(fds[i], F_GETFD) >= 0) == !was_listed);
		if (!was_listed)
			::close(fds[i]);
	}
	std::vector<int> none;
	proto::close_all(none); // nothing to do
}
