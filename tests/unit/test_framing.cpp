// Unit tests of the Varlink framing: message boundaries, fd passing, limits and protocol errors.
#include "proto/varlink.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

using proto::UniqueFd;
using namespace proto::varlink;
namespace limits = proto::limits;

namespace {

using namespace std::string_literals;

constexpr auto kDeadline = std::chrono::seconds(10);

struct Pair {
	UniqueFd a; // the sending end, used raw or through a Stream
	UniqueFd b; // the receiving end
};

Pair make_pair()
{
	int sv[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0);
	return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

std::size_t open_fds()
{
	std::size_t n = 0;
	for ([[maybe_unused]] const auto &e : std::filesystem::directory_iterator("/proc/self/fd"))
		n++;
	return n;
}

// Each memfd has an inode of its own, so fstat tells which one arrived where.
std::vector<UniqueFd> memfds(std::size_t n)
{
	std::vector<UniqueFd> v;
	for (std::size_t i = 0; i < n; i++) {
		v.emplace_back(::memfd_create("framing-test", MFD_CLOEXEC));
		REQUIRE(v.back());
	}
	return v;
}

ino_t inode(int fd)
{
	struct stat st{};
	REQUIRE(::fstat(fd, &st) == 0);
	return st.st_ino;
}

std::vector<ino_t> inodes(const std::vector<UniqueFd> &fds)
{
	std::vector<ino_t> v;
	for (const auto &fd : fds)
		v.push_back(inode(fd.get()));
	return v;
}

// Sends `bytes` in one sendmsg, the fds attached to its first byte.
void send_raw(int fd, std::string_view bytes, const std::vector<UniqueFd> &fds = {})
{
	iovec iov{const_cast<char *>(bytes.data()), bytes.size()};
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * limits::kMaxFdsPerMessage)];
	if (!fds.empty()) {
		msg.msg_control = control;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
		std::memset(control, 0, sizeof(control));
		cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
		for (std::size_t i = 0; i < fds.size(); i++) {
			int f = fds[i].get();
			std::memcpy(CMSG_DATA(c) + i * sizeof(int), &f, sizeof(int));
		}
	}
	REQUIRE(::sendmsg(fd, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
}

// Reads everything available and collects the complete messages. Returns 0 once the socket is
// drained (or at end of stream), or the first error of receive() or next().
int pump(Stream &s, std::vector<Message> &out)
{
	for (;;) {
		Message m;
		int r;
		while ((r = s.next(m)) == 1)
			out.push_back(std::move(m));
		if (r < 0)
			return r;
		r = s.receive();
		if (r == -EAGAIN || r == 0)
			return 0;
		if (r < 0)
			return r;
	}
}

// {"parameters":{"fds":[{"fd":0},{"fd":1},...]}} plus any other members.
json with_fd_refs(std::size_t n, json parameters = json::object())
{
	json list = json::array();
	for (std::size_t i = 0; i < n; i++)
		list.push_back({{"fd", i}});
	parameters["fds"] = std::move(list);
	return make_call("test.Fds", std::move(parameters));
}

std::string frame(const json &body)
{
	return body.dump() + '\0';
}

} // namespace

TEST_CASE("count_fd_refs finds fd members anywhere inside parameters")
{
	struct Case {
		const char *body;
		int refs;
	};
	const Case cases[] = {
		{R"({})", 0},
		{R"({"method":"a.B"})", 0},
		{R"({"parameters":{}})", 0},
		{R"({"parameters":{"fd":0}})", 1},
		{R"({"parameters":{"fd":null}})", 0}, // an unset ?int refers to nothing
		{R"({"fd":7,"parameters":{"name":"x"}})", 0}, // outside parameters: not a reference
		{R"({"parameters":{"listeners":[{"name":"a","fd":1},{"name":"b","fd":0}]}})", 2},
		{R"({"parameters":{"a":{"b":[[{"fd":2}],{"c":{"fd":0}}]},"d":{"fd":1},"e":[1,"fd",{"x":null}]}})", 3},
		{R"({"parameters":[{"fd":0},[{"fd":1}]]})", 2},
		{R"({"parameters":{"fd":1}})", -EBADMSG},                 // not 0..n-1
		{R"({"parameters":{"a":{"fd":0},"b":{"fd":0}}})", -EBADMSG}, // twice
		{R"({"parameters":{"a":{"fd":0},"b":{"fd":2}}})", -EBADMSG}, // a gap
		{R"({"parameters":{"fd":-1}})", -EBADMSG},
		{R"({"parameters":{"fd":"0"}})", -EBADMSG},
		{R"({"parameters":{"fd":0.5}})", -EBADMSG},
		{R"({"parameters":{"fd":true}})", -EBADMSG},
		{R"({"parameters":{"fd":{"fd":0}}})", -EBADMSG},
		{R"({"parameters":{"fd":18446744073709551615}})", -EBADMSG},
		{R"([{"parameters":{}}])", -EBADMSG}, // not an object
		{R"("text")", -EBADMSG},
	};
	for (const Case &c : cases) {
		CAPTURE(c.body);
		CHECK(count_fd_refs(json::parse(c.body)) == c.refs);
	}

	CHECK(count_fd_refs(with_fd_refs(limits::kMaxFdsPerMessage)) == static_cast<int>(limits::kMaxFdsPerMessage));
	CHECK(count_fd_refs(with_fd_refs(limits::kMaxFdsPerMessage + 1)) == -EBADMSG);
}

TEST_CASE("message builders")
{
	struct Case {
		const char *what;
		json built;
		const char *expected;
	};
	const Case cases[] = {
		{"call", make_call("io.brokerd.Control.Status", {{"service", "web"}}),
		 R"({"method":"io.brokerd.Control.Status","parameters":{"service":"web"}})"},
		{"call, empty parameters", make_call("a.b.C", json::object()), R"({"method":"a.b.C","parameters":{}})"},
		{"call, no parameters", make_call("a.b.C", nullptr), R"({"method":"a.b.C"})"},
		{"call, more", make_call("a.b.C", json::object(), true),
		 R"({"method":"a.b.C","parameters":{},"more":true})"},
		{"call, oneway", make_call("a.b.C", json::object(), false, true),
		 R"({"method":"a.b.C","parameters":{},"oneway":true})"},
		{"reply", make_reply({{"x", 1}}), R"({"parameters":{"x":1}})"},
		{"reply, null parameters", make_reply(nullptr), R"({"parameters":{}})"},
		{"reply, continues", make_reply({{"x", 1}}, true), R"({"parameters":{"x":1},"continues":true})"},
		{"error", make_error(kPermissionDenied), R"({"error":"org.varlink.service.PermissionDenied","parameters":{}})"},
		{"error, parameters", make_error(kInvalidParameter, {{"parameter", "name"}}),
		 R"({"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"name"}})"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.what);
		CHECK(c.built == json::parse(c.expected));
	}
}

TEST_CASE("a message sent one byte at a time")
{
	Pair p = make_pair();
	Stream rx(std::move(p.b));
	auto fds = memfds(1);
	ino_t sent = inode(fds[0].get());
	std::string data = frame(make_call("test.Slow", {{"text", "héllo"}, {"conn", {{"fd", 0}}}}));

	const std::vector<UniqueFd> none;
	std::vector<Message> got;
	for (std::size_t i = 0; i < data.size(); i++) {
		send_raw(p.a.get(), std::string_view(data).substr(i, 1), i == 0 ? fds : none);
		REQUIRE(pump(rx, got) == 0);
		if (i + 1 < data.size()) {
			REQUIRE(got.empty());
			CHECK(rx.partial_input());
		}
	}
	REQUIRE(got.size() == 1);
	CHECK(got[0].body["parameters"]["text"] == "héllo");
	REQUIRE(got[0].fds.size() == 1);
	CHECK(inode(got[0].fds[0].get()) == sent);
	CHECK(!rx.partial_input());
}

TEST_CASE("several messages in one read")
{
	Pair p = make_pair();
	Stream rx(std::move(p.b));
	auto fds = memfds(2);
	auto sent = inodes(fds);
	// One sendmsg: the fds ride on the first byte, so they belong to the first message.
	std::string data = frame(with_fd_refs(2)) + frame(make_reply({{"n", 2}})) + frame(make_error(kExpectedMore));
	send_raw(p.a.get(), data, fds);

	REQUIRE(rx.receive() == static_cast<int>(data.size()));
	Message m;
	REQUIRE(rx.next(m) == 1);
	CHECK(m.body == with_fd_refs(2));
	CHECK(inodes(m.fds) == sent);
	REQUIRE(rx.next(m) == 1);
	CHECK(m.body == make_reply({{"n", 2}}));
	CHECK(m.fds.empty());
	REQUIRE(rx.next(m) == 1);
	CHECK(m.body == make_error(kExpectedMore));
	CHECK(rx.next(m) == 0);
	CHECK(rx.receive() == -EAGAIN);
}

TEST_CASE("fds that arrive with the tail of the previous message")
{
	// Linux may deliver a message's fds in the same read as the end of the message before it;
	// they are queued until the message that references them is complete.
	for (bool read_between : {true, false}) {
		CAPTURE(read_between);
		Pair p = make_pair();
		Stream rx(std::move(p.b));
		std::size_t base = open_fds();

		std::string a = frame(make_call("test.A", {{"pad", std::string(200, 'a')}}));
		json b_body = with_fd_refs(3, {{"name", "B"}});
		std::string b = frame(b_body);
		std::vector<Message> got;
		{
			auto fds = memfds(3);
			auto sent = inodes(fds);
			send_raw(p.a.get(), a.substr(0, a.size() / 2));
			if (read_between) {
				REQUIRE(pump(rx, got) == 0);
				REQUIRE(got.empty());
			}
			send_raw(p.a.get(), a.substr(a.size() / 2) + b, fds);
			REQUIRE(pump(rx, got) == 0);
			REQUIRE(got.size() == 2);
			CHECK(got[0].body["method"] == "test.A");
			CHECK(got[0].fds.empty());
			CHECK(got[1].body == b_body);
			CHECK(inodes(got[1].fds) == sent);
		}
		got.clear();
		CHECK(open_fds() == base);
	}
}

TEST_CASE("a message with the most fds, through two Streams")
{
	Pair p = make_pair();
	Stream tx(std::move(p.a));
	Stream rx(std::move(p.b));
	std::size_t base = open_fds();
	{
		auto fds = memfds(limits::kMaxFdsPerMessage);
		auto sent = inodes(fds);
		json body = with_fd_refs(fds.size());
		REQUIRE(tx.enqueue(body, std::move(fds)) == 0);
		REQUIRE(tx.flush() == 0);
		CHECK(open_fds() == base); // the sender's copies close once sent

		std::vector<Message> got;
		REQUIRE(pump(rx, got) == 0);
		REQUIRE(got.size() == 1);
		CHECK(got[0].body == body);
		CHECK(inodes(got[0].fds) == sent);
		for (const auto &fd : got[0].fds)
			REQUIRE((::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC) != 0);
	}
	CHECK(open_fds() == base);
}

TEST_CASE("enqueue refuses what it cannot send, and closes the fds it was given")
{
	struct Case {
		const char *what;
		json body;
		std::size_t fds;
		std::size_t max_message;
		int expect;
	};
	const Case cases[] = {
		{"254 fds", with_fd_refs(254), 254, limits::kMaxMessageSize, -E2BIG},
		{"fewer fds than references", with_fd_refs(2), 1, limits::kMaxMessageSize, -EBADMSG},
		{"more fds than references", make_reply({{"x", 1}}), 1, limits::kMaxMessageSize, -EBADMSG},
		{"bad references", json::parse(R"({"parameters":{"fd":1}})"), 1, limits::kMaxMessageSize, -EBADMSG},
		{"not an object", json::array({1, 2}), 0, limits::kMaxMessageSize, -EBADMSG},
		{"too large", make_reply({{"pad", std::string(100, 'x')}}), 0, 64, -EMSGSIZE},
		{"too large, with an fd", with_fd_refs(1, {{"pad", std::string(100, 'x')}}), 1, 64, -EMSGSIZE},
	};
	for (const Case &c : cases) {
		CAPTURE(c.what);
		Pair p = make_pair();
		Stream tx(std::move(p.a), c.max_message);
		std::size_t base = open_fds();
		CHECK(tx.enqueue(c.body, memfds(c.fds)) == c.expect);
		CHECK(open_fds() == base);
		CHECK(!tx.want_write());
		CHECK(tx.queued_bytes() == 0);
	}

	SUBCASE("a message of exactly the limit is accepted")
	{
		Pair p = make_pair();
		json body = make_reply({{"pad", ""}});
		std::size_t max = body.dump().size() + 10;
		body["parameters"]["pad"] = std::string(10, 'x');
		REQUIRE(body.dump().size() == max);
		Stream tx(std::move(p.a), max);
		CHECK(tx.enqueue(body) == 0);
		CHECK(tx.queued_bytes() == max + 1);
	}
	SUBCASE("the write queue is bounded")
	{
		Pair p = make_pair();
		Stream tx(std::move(p.a));
		json big = make_reply({{"pad", std::string(limits::kMaxMessageSize - 100, 'x')}});
		std::size_t queued = 0;
		while (tx.enqueue(big) == 0)
			queued++;
		CHECK(queued == limits::kMaxWriteQueue / (big.dump().size() + 1));
		std::size_t base = open_fds();
		json big_fd = with_fd_refs(1, {{"pad", std::string(limits::kMaxMessageSize - 100, 'x')}});
		CHECK(tx.enqueue(big_fd, memfds(1)) == -ENOBUFS);
		CHECK(open_fds() == base);
	}
}

TEST_CASE("protocol errors close every fd involved and end the stream")
{
	struct Case {
		const char *what;
		std::string bytes;
		std::size_t fds;          // attached to the first byte
		int expect;
		std::size_t chunk = 0;    // send in pieces of this size, reading between; 0: all at once
		std::size_t max_message = limits::kMaxMessageSize;
	};
	const std::string big = frame(make_reply({{"pad", std::string(100, 'x')}}));
	const Case cases[] = {
		{"invalid JSON", "{\"method\":\0"s, 1, -EBADMSG},
		{"invalid JSON, trailing garbage", "{} {}\0"s, 1, -EBADMSG},
		{"invalid UTF-8", "{\"method\":\"\xff\"}\0"s, 1, -EBADMSG},
		{"an empty message", "\0"s, 1, -EBADMSG},
		{"an array", "[1,2,3]\0"s, 1, -EBADMSG},
		{"a number", "42\0"s, 0, -EBADMSG},
		{"a string", "\"text\"\0"s, 1, -EBADMSG},
		{"reference out of range", frame(json::parse(R"({"parameters":{"fd":1}})")), 2, -EBADMSG},
		{"reference used twice", frame(json::parse(R"({"parameters":{"a":{"fd":0},"b":{"fd":0}}})")), 2, -EBADMSG},
		{"negative reference", frame(json::parse(R"({"parameters":{"fd":-1}})")), 1, -EBADMSG},
		{"string reference", frame(json::parse(R"({"parameters":{"fd":"0"}})")), 1, -EBADMSG},
		{"fewer fds than referenced", frame(with_fd_refs(3)), 2, -EPROTO},
		{"no fds, one referenced", frame(with_fd_refs(1)), 0, -EPROTO},
		{"fewer fds, sent in pieces", frame(with_fd_refs(3)), 2, -EPROTO, 5},
		{"a surplus fd", frame(make_reply({{"x", 1}})), 1, -EPROTO},
		{"surplus fds", frame(with_fd_refs(1)), 3, -EPROTO},
		{"a surplus fd, sent in pieces", frame(make_reply({{"x", 1}})), 1, -EPROTO, 3},
		{"too large", big, 1, -EMSGSIZE, 0, 64},
		{"too large, sent in pieces", big, 1, -EMSGSIZE, 16, 64},
		{"too large without any NUL", std::string(100, 'x'), 1, -EMSGSIZE, 0, 64},
		{"too large without any NUL, in pieces", std::string(100, 'x'), 0, -EMSGSIZE, 30, 64},
		{"nested 65 levels", "{\"parameters\":" + std::string(64, '[') + std::string(64, ']') + "}\0"s, 1, -EBADMSG},
		{"nested thousands of levels", "{\"p\":" + std::string(5000, '[') + std::string(5000, ']') + "}\0"s, 0, -EBADMSG},
		{"a comment (Varlink has none)", "{/*\"*/\"parameters\":{}}\0"s, 0, -EBADMSG},
	};
	for (const Case &c : cases) {
		CAPTURE(c.what);
		Pair p = make_pair();
		Stream rx(std::move(p.b), c.max_message);
		std::size_t base = open_fds();

		std::vector<Message> got;
		int r = 0;
		std::size_t chunk = c.chunk ? c.chunk : c.bytes.size();
		for (std::size_t off = 0; off < c.bytes.size() && r == 0; off += chunk) {
			send_raw(p.a.get(), std::string_view(c.bytes).substr(off, chunk),
			         off == 0 ? memfds(c.fds) : std::vector<UniqueFd>{});
			r = pump(rx, got);
		}
		CHECK(r == c.expect);
		CHECK(got.empty());
		CHECK(rx.broken());
		CHECK(open_fds() == base);

		// A valid message afterwards is not read: the stream is done.
		send_raw(p.a.get(), frame(make_reply({})));
		Message m;
		CHECK(rx.receive() < 0);
		CHECK(rx.next(m) < 0);
		CHECK(open_fds() == base);
	}
}

TEST_CASE("nesting up to the depth limit is received, as the parser counts it")
{
	Pair p = make_pair();
	Stream rx(std::move(p.b));
	// 64 levels in all; brackets inside strings are no nesting.
	std::string text = "{\"parameters\":{\"s\":\"[[[{{{\\\"[[\",\"a\":" + std::string(62, '[') + std::string(62, ']') + "}}";
	send_raw(p.a.get(), text + "\0"s);
	std::vector<Message> got;
	CHECK(pump(rx, got) == 0);
	REQUIRE(got.size() == 1);
	CHECK(got[0].body["parameters"]["s"] == "[[[{{{\"[[");
}

TEST_CASE("a message of exactly the size limit is received")
{
	json body = make_reply({{"pad", std::string(20, 'x')}});
	std::size_t max = body.dump().size();
	for (std::size_t size : {max, max + 1}) {
		CAPTURE(size);
		Pair p = make_pair();
		Stream rx(std::move(p.b), max);
		json b = make_reply({{"pad", std::string(20 + size - max, 'x')}});
		send_raw(p.a.get(), frame(b));
		std::vector<Message> got;
		int r = pump(rx, got);
		if (size == max) {
			CHECK(r == 0);
			CHECK(got.size() == 1);
		} else {
			CHECK(r == -EMSGSIZE);
		}
	}
}

TEST_CASE("a stream held to small messages from its peer reads no further ahead, and still sends large ones")
{
	json body = make_reply({{"pad", std::string(20, 'x')}});
	const std::size_t max = body.dump().size();
	for (std::size_t size : {max, max + 1}) {
		CAPTURE(size);
		Pair p = make_pair();
		Stream rx(std::move(p.b));
		rx.set_max_input(max);
		send_raw(p.a.get(), frame(make_reply({{"pad", std::string(20 + size - max, 'x')}})));
		std::vector<Message> got;
		int r = pump(rx, got);
		CHECK(r == (size == max ? 0 : -EMSGSIZE));
		CHECK(got.size() == (size == max ? 1u : 0u));
	}

	Pair p = make_pair();
	Stream rx(std::move(p.b));
	rx.set_max_input(max);
	// A message without its NUL, far over the limit: one read takes no more than the limit and
	// a byte, and the stream ends there.
	send_raw(p.a.get(), std::string(16 * max, 'a'));
	CHECK(rx.receive() == static_cast<int>(max + 1));
	Message m;
	CHECK(rx.next(m) == -EMSGSIZE);
	// Replies are held to the size given at construction, not to the peer's limit.
	Pair q = make_pair();
	Stream tx(std::move(q.a));
	tx.set_max_input(max);
	CHECK(tx.enqueue(make_reply({{"pad", std::string(100 * max, 'x')}})) == 0);
}

TEST_CASE("set_max_write_queue bounds what waits for a peer that does not read")
{
	Pair p = make_pair();
	Stream tx(std::move(p.a));
	json reply = make_reply({{"pad", std::string(1000, 'x')}});
	const std::size_t each = reply.dump().size() + 1;
	tx.set_max_write_queue(3 * each);
	for (int i = 0; i < 3; i++)
		CHECK(tx.enqueue(reply) == 0);
	CHECK(tx.enqueue(reply) == -ENOBUFS);
	CHECK(tx.queued_bytes() == 3 * each);
}

// Receives one message of 20 fds with RLIMIT_NOFILE so low that only 3 fd numbers are free
// below it: the kernel installs 3 of the passed fds, drops the rest and sets MSG_CTRUNC.
int receive_short_of_fds(Stream &rx, int sender)
{
	send_raw(sender, frame(with_fd_refs(20)), memfds(20));

	std::set<int> in_use;
	for (const auto &e : std::filesystem::directory_iterator("/proc/self/fd"))
		in_use.insert(std::stoi(e.path().filename().string()));
	rlim_t limit = 0;
	for (int free_below = 0; free_below < 3; limit++)
		if (!in_use.count(static_cast<int>(limit)))
			free_below++;
	rlimit old{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
	rlimit low = old;
	low.rlim_cur = limit;
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
	int r = rx.receive();
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
	return r;
}

TEST_CASE("fds cut off by MSG_CTRUNC are closed")
{
	Pair p = make_pair();
	Stream rx(std::move(p.b));
	std::size_t base = open_fds();
	CHECK(receive_short_of_fds(rx, p.a.get()) == -EPROTO);
	CHECK(rx.broken());
	CHECK(open_fds() == base);
}

TEST_CASE("with allow_lost_fds, a message short of fds comes with empty ones in their place")
{
	Pair p = make_pair();
	Stream rx(std::move(p.b));
	rx.allow_lost_fds();
	std::size_t base = open_fds();
	CHECK(receive_short_of_fds(rx, p.a.get()) > 0);
	CHECK(!rx.broken());
	Message m;
	REQUIRE(rx.next(m) == 1);
	REQUIRE(m.fds.size() == 20);
	std::string got;
	for (const UniqueFd &fd : m.fds)
		got += fd ? '+' : '-';
	// The first that fitted (3, or 4 with the fd the listing of /proc/self/fd used), then none.
	std::size_t fitted = got.find('-');
	CHECK(fitted >= 3);
	CHECK(fitted < 20);
	CHECK(got.find('+', fitted) == std::string::npos);
	m.fds.clear();
	CHECK(open_fds() == base);

	// The stream goes on: the next message and its fds arrive whole.
	send_raw(p.a.get(), frame(with_fd_refs(2)), memfds(2));
	REQUIRE(rx.receive() > 0);
	REQUIRE(rx.next(m) == 1);
	CHECK(m.fds.size() == 2);
	CHECK(m.fds[1]);
}

TEST_CASE("flush with a full socket buffer returns -EAGAIN and completes later")
{
	Pair p = make_pair();
	Stream tx(std::move(p.a));
	Stream rx(std::move(p.b));

	// Well over the default socket buffer, the last message with fds.
	std::vector<json> sent;
	for (int i = 0; i < 4; i++)
		sent.push_back(make_reply({{"i", i}, {"pad", std::string(300000, static_cast<char>('a' + i))}}));
	sent.push_back(with_fd_refs(3, {{"i", 4}}));
	auto fds = memfds(3);
	auto fd_inodes = inodes(fds);
	for (std::size_t i = 0; i + 1 < sent.size(); i++)
		REQUIRE(tx.enqueue(sent[i]) == 0);
	REQUIRE(tx.enqueue(sent.back(), std::move(fds)) == 0);

	REQUIRE(tx.flush() == -EAGAIN);
	CHECK(tx.want_write());
	CHECK(tx.queued_bytes() > 0);

	std::vector<Message> got;
	int flushed = -EAGAIN;
	auto deadline = std::chrono::steady_clock::now() + kDeadline;
	while (got.size() < sent.size() || flushed != 0) {
		REQUIRE(std::chrono::steady_clock::now() < deadline);
		pollfd pf[2] = {{rx.fd(), POLLIN, 0}, {tx.fd(), static_cast<short>(tx.want_write() ? POLLOUT : 0), 0}};
		REQUIRE(::poll(pf, 2, 1000) >= 0);
		REQUIRE(pump(rx, got) == 0);
		if (tx.want_write()) {
			flushed = tx.flush();
			REQUIRE((flushed == 0 || flushed == -EAGAIN));
		}
	}
	CHECK(!tx.want_write());
	CHECK(tx.queued_bytes() == 0);
	REQUIRE(got.size() == sent.size());
	for (std::size_t i = 0; i < sent.size(); i++) {
		CAPTURE(i);
		CHECK(got[i].body == sent[i]);
		CHECK(got[i].fds.size() == (i + 1 == sent.size() ? 3u : 0u));
	}
	CHECK(inodes(got.back().fds) == fd_inodes);
}

TEST_CASE("received fds are a peer's: wherever they are dropped, they go to peer_fd_closer")
{
	static std::vector<int> handed;
	handed.clear();
	proto::peer_fd_closer = [](int fd) noexcept {
		handed.push_back(fd);
		::close(fd);
	};
	struct Restore {
		~Restore() { proto::peer_fd_closer = nullptr; }
	} restore;

	Pair p = make_pair();
	Stream rx(std::move(p.b));
	{
		auto fds = memfds(2);
		send_raw(p.a.get(), frame(with_fd_refs(2)), fds);
	}
	std::vector<Message> got;
	REQUIRE(pump(rx, got) == 0);
	REQUIRE(got.size() == 1);
	REQUIRE(got[0].fds.size() == 2);
	int first = got[0].fds[0].get(), second = got[0].fds[1].get();
	CHECK(got[0].fds[0].is_from_peer());
	UniqueFd moved = std::move(got[0].fds[0]); // a move keeps the mark
	CHECK(moved.is_from_peer());
	moved.reset();
	got.clear();
	CHECK(handed == std::vector<int>{first, second});

	// Our own fds close inline, and release() takes the mark off.
	UniqueFd own(::memfd_create("framing-test", MFD_CLOEXEC));
	own.reset();
	UniqueFd released = UniqueFd::from_peer(::memfd_create("framing-test", MFD_CLOEXEC));
	int raw = released.release();
	::close(raw);
	CHECK(handed.size() == 2);
}
