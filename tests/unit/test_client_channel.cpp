// libbroker-client's direct handoff channels, in process against a fake brokerd that makes them:
// its Hello reply says peer_handoff, it answers Peers with one end of a socket pair, and the test
// plays the worker at the other end with the channel's codec (proto/handoff_channel.hpp). As the
// receiver it reads the library's frames and acknowledges them, well or badly; as the sender it
// writes frames, well-formed or hostile, and reads the library's acknowledgements.
#include <broker/client.hpp>

#include "fake_broker.hpp"
#include "proto/handoff_channel.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace broker_test;
namespace ch = proto::handoff::channel;

namespace {

constexpr const char *kReceiver = "web/3/0";
constexpr const char *kSender = "web/1/0";

// A worker started by a fake brokerd: the library's variables point at it, and are put back as
// they were at the end.
class Worker {
public:
	Worker()
	{
		for (const char *v : {"BROKER_SOCKET", "BROKER_TOKEN", "BROKER_SERVICE", "BROKER_VERSION", "BROKER_INSTANCE",
		                      "BROKER_GENERATION", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"}) {
			const char *value = std::getenv(v);
			saved_.emplace_back(v, value ? std::optional<std::string>(value) : std::nullopt);
			::unsetenv(v);
		}
		::setenv("BROKER_SOCKET", name.c_str(), 1);
		::setenv("BROKER_TOKEN", "sesame", 1);
	}
	~Worker()
	{
		for (const auto &[v, value] : saved_) {
			if (value)
				::setenv(v.c_str(), value->c_str(), 1);
			else
				::unsetenv(v.c_str());
		}
	}
	Worker(const Worker &) = delete;
	Worker &operator=(const Worker &) = delete;

	std::string name = abstract_name("channel");
	FakeBroker broker{name};

private:
	std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

json hello_reply(bool peer_handoff)
{
	json p = {{"service", "web"}, {"instance", "web/2/0"}, {"generation", 2}, {"sockets", json::array()}};
	if (peer_handoff)
		p["peer_handoff"] = true;
	return {{"parameters", p}};
}

// from_env() here while a thread answers its Hello; then the Events call, into `events`.
broker::Client connect(FakeBroker &broker, json &events, const broker::ClientOptions &options = {},
                       bool peer_handoff = true)
{
	bool answered = false;
	std::thread t([&] {
		auto deadline = Clock::now() + kTimeout;
		if (!broker.accept(deadline))
			return;
		json hello = broker.receive(deadline);
		answered = hello.is_object() && broker.try_send(hello_reply(peer_handoff));
	});
	std::optional<broker::Client> c;
	try {
		c.emplace(broker::Client::from_env(options));
	} catch (...) {
		t.join();
		throw;
	}
	t.join();
	REQUIRE(answered);
	events = broker.receive(Clock::now() + kTimeout);
	REQUIRE(events.is_object());
	REQUIRE(events["method"] == "io.brokerd.Worker.Events");
	return std::move(*c);
}

std::uint64_t monotonic_usec()
{
	timespec ts{};
	::clock_gettime(CLOCK_MONOTONIC, &ts);
	return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u + static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

// The worker's event loop until `done` holds: poll fd() for events() until timeout(), in slices
// short enough for the test's own side to get its turn, then process().
bool drive(broker::Client &c, const std::function<bool()> &done)
{
	auto deadline = Clock::now() + kTimeout;
	while (Clock::now() < deadline) {
		if (done())
			return true;
		int wait = 20;
		std::uint64_t t = c.timeout();
		if (t != std::numeric_limits<std::uint64_t>::max()) {
			std::uint64_t now = monotonic_usec();
			wait = t <= now ? 0 : std::min<int>(wait, static_cast<int>((t - now + 999) / 1000));
		}
		pollfd p{c.fd(), c.events(), 0};
		::poll(&p, c.fd() >= 0 ? 1 : 0, wait);
		c.process();
	}
	return done();
}

bool readable(int fd)
{
	pollfd p{fd, POLLIN, 0};
	return ::poll(&p, 1, 0) > 0;
}

bool is_open(int fd)
{
	return ::fcntl(fd, F_GETFD) >= 0;
}

bool same_file(int a, int b)
{
	struct stat sa{}, sb{};
	return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// The library closed its fd: the number is free, or now another file than the copy the test holds.
bool closed(int fd, int copy)
{
	return !is_open(fd) || !same_file(fd, copy);
}

Fd connection_fd()
{
	Fd fd(::memfd_create("connection", MFD_CLOEXEC));
	REQUIRE(fd.get() >= 0);
	return fd;
}

// This process's open fds and what each is, to see that a test leaves none behind.
std::map<int, std::string> open_fds()
{
	std::map<int, std::string> out;
	for (const auto &e : std::filesystem::directory_iterator("/proc/self/fd")) {
		std::error_code ec;
		auto target = std::filesystem::read_symlink(e.path(), ec);
		if (!ec && target.string().rfind("/proc/", 0) != 0) // not the listing's own fd
			out[std::stoi(e.path().filename().string())] = target.string();
	}
	return out;
}

std::string describe(const std::map<int, std::string> &fds)
{
	std::string s;
	for (const auto &[fd, what] : fds)
		s += std::to_string(fd) + "=" + what + " ";
	return s;
}

Fd seqpacket_pair(Fd &other)
{
	int sv[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
	other = Fd(sv[1]);
	return Fd(sv[0]);
}

// brokerd's answer to the Peers call the library makes: one receiver, at the end returned.
Fd answer_peers(FakeBroker &broker)
{
	json call = broker.receive(Clock::now() + kTimeout);
	REQUIRE(call.is_object());
	REQUIRE(call["method"] == "io.brokerd.Worker.Peers");
	CHECK(call["oneway"] == true);
	Fd theirs;
	Fd mine = seqpacket_pair(theirs);
	json entry = {{"instance", kReceiver}, {"pid", 4242}, {"fd", 0}};
	broker.event({{"event", "peers"}, {"peers", json::array({entry})}}, {theirs.get()});
	return mine;
}

// A sender of the service will write on the end returned.
Fd send_peer(FakeBroker &broker)
{
	Fd theirs;
	Fd mine = seqpacket_pair(theirs);
	broker.event({{"event", "peer"}, {"peer", {{"instance", kSender}, {"pid", 4141}, {"fd", 0}}}}, {theirs.get()});
	return mine;
}

// One frame from the test's end. A SOCK_SEQPACKET socket whose peer closed with frames unread
// reports ECONNRESET once before what was queued for it: a reader reads on past it.
int receive(int end, std::string &buffer, ch::Received &got)
{
	int r = ch::receive_frame(end, buffer, got);
	return r == -ECONNRESET ? ch::receive_frame(end, buffer, got) : r;
}

// A frame the library wrote, as its receiver reads it.
struct Frame {
	std::uint64_t id = 0;
	std::vector<std::string> states;
	std::vector<proto::UniqueFd> fds;
};

// The next frame on the receiver's end while the worker runs, or nullopt at the end of the channel.
std::optional<Frame> next_frame(broker::Client &c, int end)
{
	REQUIRE(drive(c, [&] { return readable(end); }));
	std::string buffer;
	ch::Received got;
	int r = receive(end, buffer, got);
	REQUIRE(r >= 0);
	if (r == 0)
		return std::nullopt;
	REQUIRE(!got.truncated);
	REQUIRE(!got.fds_cut);
	ch::Connections decoded;
	auto why = ch::decode_connections(std::string_view(buffer.data(), got.size), decoded);
	REQUIRE_MESSAGE(!why, why.value_or(""));
	Frame f{decoded.id, {decoded.states.begin(), decoded.states.end()}, std::move(got.fds)};
	REQUIRE(f.fds.size() == f.states.size());
	return f;
}

// The end of the channel, once the worker closes its end (and nothing is left to read).
bool ends(broker::Client &c, int end)
{
	std::string buffer;
	ch::Received got;
	return drive(c, [&] { return readable(end); }) && receive(end, buffer, got) == 0;
}

void send_ack(int end, std::uint64_t id, const std::vector<std::uint32_t> &refused)
{
	std::string frame;
	ch::encode_ack(frame, id, refused);
	REQUIRE(ch::send_frame(end, frame, {}) == 0);
}

// The library's acknowledgement of a frame of `count`, once it comes.
ch::Ack next_ack(broker::Client &c, int end, std::size_t count)
{
	REQUIRE(drive(c, [&] { return readable(end); }));
	std::string buffer;
	ch::Received got;
	REQUIRE(receive(end, buffer, got) == 1);
	CHECK(got.fds.empty());
	ch::Ack ack;
	auto why = ch::decode_ack(std::string_view(buffer.data(), got.size), ack, count);
	REQUIRE_MESSAGE(!why, why.value_or(""));
	return ack;
}

// Connections to hand off, each with a state of its own; handoff() makes the library their owner.
struct Handed {
	std::vector<int> fds;
	std::vector<std::string> states;
	std::vector<broker::Connection> list;

	// States empty or short, or all of the largest size.
	explicit Handed(std::size_t n, bool largest = false)
	{
		for (std::size_t i = 0; i < n; i++) {
			std::string state = i % 3 == 0 ? std::string() : "state " + std::to_string(i);
			if (largest)
				state.resize(broker::Client::kMaxHandoffState, static_cast<char>('a' + i % 26));
			states.push_back(std::move(state));
			fds.push_back(connection_fd().release());
		}
		for (std::size_t i = 0; i < n; i++)
			list.push_back({fds[i], states[i]});
	}
};

// What on_returned gave back: the test owns the fds again.
struct Returned {
	std::vector<Fd> fds;
	std::map<int, std::string> state_of;

	void take(int fd, std::string state)
	{
		fds.emplace_back(fd);
		state_of[fd] = std::move(state);
	}
	// Exactly the handed connections of these indices came back, open, each with its state.
	bool exactly(const Handed &h, const std::vector<std::size_t> &indices) const
	{
		if (fds.size() != indices.size())
			return false;
		for (std::size_t i : indices) {
			auto it = state_of.find(h.fds[i]);
			if (it == state_of.end() || it->second != h.states[i] || !is_open(h.fds[i]))
				return false;
		}
		return true;
	}
};

std::vector<std::size_t> range(std::size_t from, std::size_t to)
{
	std::vector<std::size_t> out;
	for (std::size_t i = from; i < to; i++)
		out.push_back(i);
	return out;
}

// The sums of the Handed calls the library made, read until they reach `want`.
struct Counts {
	std::uint64_t sent = 0, landed = 0, returned = 0;
	bool operator==(const Counts &) const = default;
};

Counts handed_calls(FakeBroker &broker, const Counts &want)
{
	Counts sum;
	auto deadline = Clock::now() + kTimeout;
	while (!(sum == want)) {
		json call = broker.receive(deadline);
		if (!call.is_object())
			break;
		REQUIRE(call["method"] == "io.brokerd.Worker.Handed");
		CHECK(call["oneway"] == true);
		const json &p = call["parameters"];
		CHECK(p["peer"] == kReceiver);
		sum.sent += p["sent"].get<std::uint64_t>();
		sum.landed += p["landed"].get<std::uint64_t>();
		sum.returned += p["returned"].get<std::uint64_t>();
		CHECK(p["remaining"] == 0);
	}
	return sum;
}

// A worker handing off `n` connections on a channel to the test, which has read their frames.
struct Sending {
	Worker w;
	broker::Client c;
	Returned back;
	int done = 0;
	Handed handed;
	Fd end;
	std::vector<Frame> frames;
	std::vector<int> copies; // the receiver's copy of each connection, in handoff order

	// Reads the first `read` frames (all of them by default).
	explicit Sending(std::size_t n, bool largest = false, std::size_t read = SIZE_MAX)
	        : c(start(w)), handed(n, largest)
	{
		c.on_returned([this](int fd, std::string state) { back.take(fd, std::move(state)); });
		c.on_handoff_done([this](const broker::HandoffSummary &) { done++; });
		c.handoff(handed.list.data(), handed.list.size());
		end = answer_peers(w.broker);
		while (copies.size() < n && frames.size() < read) {
			auto f = next_frame(c, end.get());
			REQUIRE(f);
			for (auto &fd : f->fds)
				copies.push_back(fd.get());
			frames.push_back(std::move(*f));
		}
	}

	static broker::Client start(Worker &w)
	{
		json events;
		return connect(w.broker, events);
	}
};

} // namespace

TEST_CASE("brokerd makes channels: Events says peer_handoff, and fd() is one fd for the Client's life, across a reconnect")
{
	Worker w;
	broker::ClientOptions o;
	o.reconnect_min = 10ms;
	o.reconnect_max = 40ms;
	json events;
	broker::Client c = connect(w.broker, events, o);
	CHECK(events["parameters"] == json{{"peer_handoff", true}});
	CHECK(events["more"] == true);
	const int fd = c.fd();
	REQUIRE(fd >= 0);
	CHECK(c.events() == POLLIN);
	int drains = 0;
	c.on_drain([&](const broker::DrainRequest &) { drains++; });

	// The stream is in it: an event wakes fd().
	w.broker.event({{"event", "drain"}, {"timeout_ms", 60000}});
	CHECK(wait_for(fd, POLLIN, Clock::now() + kTimeout));
	REQUIRE(drive(c, [&] { return drains == 1; }));

	w.broker.go_away();
	REQUIRE(drive(c, [&] { return c.link() == broker::Link::Lost; }));
	CHECK(c.fd() == fd);

	FakeBroker again(w.name);
	REQUIRE(drive(c, [&] { return again.accept(Clock::now()); }));
	CHECK(c.fd() == fd);
	json hello = again.receive(Clock::now() + kTimeout);
	REQUIRE(hello["method"] == "io.brokerd.Worker.Hello");
	again.send(hello_reply(true));
	REQUIRE(drive(c, [&] { return c.link() == broker::Link::Connected; }));
	CHECK(c.fd() == fd);
	json events2 = again.receive(Clock::now() + kTimeout);
	REQUIRE(events2["method"] == "io.brokerd.Worker.Events");
	CHECK(events2["parameters"] == json{{"peer_handoff", true}});

	// The new stream is in it too.
	again.event({{"event", "drain"}, {"timeout_ms", 30000}});
	CHECK(wait_for(fd, POLLIN, Clock::now() + kTimeout));
	REQUIRE(drive(c, [&] { return drains == 2; }));
	CHECK(c.fd() == fd);
}

TEST_CASE("a brokerd that makes no channels: Events as before, and a handoff goes its way")
{
	Worker w;
	json events;
	broker::Client c = connect(w.broker, events, {}, false);
	CHECK(events.value("parameters", json::object()) == json::object());
	Fd conn = connection_fd();
	broker::Connection one{conn.get(), "x"};
	c.handoff(&one, 1);
	conn.release();
	json call = w.broker.receive(Clock::now() + kTimeout);
	CHECK(call["method"] == "io.brokerd.Worker.Handoff");
	CHECK(w.broker.take_fds().size() == 1);
}

TEST_CASE("sender: frames carry the fds in order with their states; acks return exactly the refused, the rest close; Handed adds up")
{
	Sending s(260); // two frames: 253 and 7
	REQUIRE(s.frames.size() == 2);
	CHECK(s.frames[0].fds.size() == 253);
	CHECK(s.frames[1].fds.size() == 7);
	CHECK(s.frames[0].id != s.frames[1].id);
	std::size_t k = 0;
	for (const Frame &f : s.frames) {
		for (std::size_t i = 0; i < f.fds.size(); i++, k++) {
			CAPTURE(k);
			CHECK(same_file(f.fds[i].get(), s.handed.fds[k]));
			CHECK(f.states[i] == s.handed.states[k]);
		}
	}
	// Held until acknowledged.
	CHECK(s.c.handoff_pending() == 260);
	for (int fd : s.handed.fds)
		CHECK(is_open(fd));
	CHECK(s.back.fds.empty());

	// The second frame first: acknowledgements come in any order.
	send_ack(s.end.get(), s.frames[1].id, {0, 6});
	REQUIRE(drive(s.c, [&] { return s.back.fds.size() == 2; }));
	CHECK(s.back.exactly(s.handed, {253, 259}));
	CHECK(s.c.handoff_pending() == 253);
	CHECK(s.done == 0);
	send_ack(s.end.get(), s.frames[0].id, {1, 100, 252});
	REQUIRE(drive(s.c, [&] { return s.done == 1; }));
	CHECK(s.back.exactly(s.handed, {1, 100, 252, 253, 259}));
	std::set<std::size_t> refused = {1, 100, 252, 253, 259};
	for (std::size_t i = 0; i < 260; i++) {
		CAPTURE(i);
		if (!refused.count(i))
			CHECK(closed(s.handed.fds[i], s.copies[i]));
	}
	const broker::HandoffSummary &sum = s.c.handoff_summary();
	CHECK(sum.handed == 260);
	CHECK(sum.landed == 255);
	CHECK(sum.returned == 5);
	CHECK(sum.abandoned == 0);
	CHECK(s.c.handoff_pending() == 0);
	CHECK(handed_calls(s.w.broker, {260, 255, 5}) == Counts{260, 255, 5});

	// All settled: the channel closes, and the next handoff asks brokerd again; an empty answer
	// sends it brokerd's way.
	CHECK(ends(s.c, s.end.get()));
	Fd conn = connection_fd();
	broker::Connection one{conn.get(), "next"};
	s.c.handoff(&one, 1);
	conn.release();
	json peers = s.w.broker.receive(Clock::now() + kTimeout);
	REQUIRE(peers["method"] == "io.brokerd.Worker.Peers");
	s.w.broker.event({{"event", "peers"}, {"peers", json::array()}});
	json handoff;
	REQUIRE(drive(s.c, [&] {
		if (!readable(s.w.broker.conn()))
			return false;
		handoff = s.w.broker.receive(Clock::now() + kTimeout);
		return true;
	}));
	CHECK(handoff["method"] == "io.brokerd.Worker.Handoff");
	CHECK(s.w.broker.take_fds().size() == 1);
}

TEST_CASE("sender: the receiver's end closes with frames unacknowledged: they all come back")
{
	Sending s(260);
	REQUIRE(s.frames.size() == 2);
	send_ack(s.end.get(), s.frames[0].id, {0});
	REQUIRE(drive(s.c, [&] { return s.back.fds.size() == 1; }));
	for (std::size_t i = 1; i < 253; i++)
		CHECK(closed(s.handed.fds[i], s.copies[i]));
	s.end.reset(); // the receiver died
	REQUIRE(drive(s.c, [&] { return s.done == 1; }));
	std::vector<std::size_t> back = range(253, 260);
	back.insert(back.begin(), 0);
	CHECK(s.back.exactly(s.handed, back));
	CHECK(s.c.handoff_summary().landed == 252);
	CHECK(s.c.handoff_summary().returned == 8);
	CHECK(s.c.handoff_pending() == 0);
	CHECK(handed_calls(s.w.broker, {260, 252, 8}) == Counts{260, 252, 8});
}

TEST_CASE("sender: connections with the largest states go three to a frame, under 64 KiB")
{
	Sending s(10, true);
	REQUIRE(s.frames.size() == 4);
	for (std::size_t f = 0; f < 4; f++)
		CHECK(s.frames[f].fds.size() == (f < 3 ? 3u : 1u));
	std::size_t k = 0;
	for (const Frame &f : s.frames)
		for (std::size_t i = 0; i < f.fds.size(); i++, k++)
			CHECK(f.states[i] == s.handed.states[k]);
	for (const Frame &f : s.frames)
		send_ack(s.end.get(), f.id, {});
	REQUIRE(drive(s.c, [&] { return s.done == 1; }));
	CHECK(s.back.fds.empty());
	for (std::size_t i = 0; i < 10; i++)
		CHECK(closed(s.handed.fds[i], s.copies[i]));
	CHECK(s.c.handoff_summary().landed == 10);
	CHECK(handed_calls(s.w.broker, {10, 10, 0}) == Counts{10, 10, 0});
}

// A receiver that acknowledges a frame and then closes its end with a later frame still unread
// (it died, or its Client went) makes the kernel report ECONNRESET to the sender once, before the
// acknowledgement queued for it: receive_frame reads on past it, or the acknowledged frame would
// come back through on_returned although its receiver took it, a connection served twice.
TEST_CASE("sender: the receiver acknowledges a frame and closes with the next unread: the first lands, only the next comes back")
{
	Sending s(260, false, 1);
	REQUIRE(s.frames.size() == 1);
	REQUIRE(s.frames[0].fds.size() == 253);
	REQUIRE(drive(s.c, [&] { return readable(s.end.get()); })); // the second frame waits, unread
	send_ack(s.end.get(), s.frames[0].id, {});
	s.end.reset();
	REQUIRE(drive(s.c, [&] { return s.done == 1; }));
	CHECK(s.back.exactly(s.handed, range(253, 260)));
	for (std::size_t i = 0; i < 253; i++)
		CHECK(closed(s.handed.fds[i], s.copies[i]));
	CHECK(s.c.handoff_summary().landed == 253);
	CHECK(s.c.handoff_summary().returned == 7);
}

TEST_CASE("sender: a bad acknowledgement ends the channel, and everything unacknowledged comes back")
{
	struct Case {
		std::string name;
		std::function<void(int end, std::uint64_t id)> ack;
	};
	const Case cases[] = {
	        {"an unknown frame", [](int end, std::uint64_t id) { send_ack(end, id + 1000, {}); }},
	        {"an index past the frame", [](int end, std::uint64_t id) { send_ack(end, id, {2, 10}); }},
	        {"an index twice", [](int end, std::uint64_t id) { send_ack(end, id, {3, 3}); }},
	        {"fds attached",
	         [](int end, std::uint64_t id) {
		         std::string frame;
		         ch::encode_ack(frame, id, {});
		         Fd extra = connection_fd();
		         int fd = extra.get();
		         REQUIRE(ch::send_frame(end, frame, {&fd, 1}) == 0);
	         }},
	        {"garbage", [](int end, std::uint64_t) { REQUIRE(ch::send_frame(end, "not a frame at all, not at all", {}) == 0); }},
	        {"a connections frame",
	         [](int end, std::uint64_t id) {
		         std::string frame;
		         ch::encode_connections(frame, id, {}, 0);
		         REQUIRE(ch::send_frame(end, frame, {}) == 0);
	         }},
	};
	for (const Case &bad : cases) {
		CAPTURE(bad.name);
		std::map<int, std::string> before;
		{
			Worker w;
			json events;
			broker::Client c = connect(w.broker, events);
			before = open_fds();
			Returned back;
			int done = 0;
			c.on_returned([&](int fd, std::string state) { back.take(fd, std::move(state)); });
			c.on_handoff_done([&](const broker::HandoffSummary &) { done++; });
			Handed handed(10);
			c.handoff(handed.list.data(), handed.list.size());
			Fd end = answer_peers(w.broker);
			auto f = next_frame(c, end.get());
			REQUIRE(f);
			REQUIRE(f->fds.size() == 10);
			bad.ack(end.get(), f->id);
			REQUIRE(drive(c, [&] { return done == 1; }));
			CHECK(back.exactly(handed, range(0, 10)));
			CHECK(c.handoff_summary().landed == 0);
			CHECK(c.handoff_summary().returned == 10);
			CHECK(handed_calls(w.broker, {10, 0, 10}) == Counts{10, 0, 10});
			CHECK(ends(c, end.get()));
			// What the test holds goes; what remains is what the library held before.
			back.fds.clear();
			f.reset();
			end.reset();
			std::map<int, std::string> after = open_fds();
			CHECK_MESSAGE(after == before, "before: " << describe(before) << "\nafter: " << describe(after));
		}
	}
}

// The receiver's side: a worker that accepts handoffs, with a sender's end in the test's hands.
struct Receiving {
	Worker w;
	broker::Client c;
	std::map<int, std::string> before; // this process's fds before the channel came
	struct Got {
		Fd fd;
		std::string state;
		bool acked_before = false; // the acknowledgement could be read while the handler ran
	};
	std::vector<Got> got;
	Fd end;

	explicit Receiving(bool handler = true) : c(start(w))
	{
		before = open_fds();
		if (handler)
			c.on_connection([this](int fd, std::string state) {
				got.push_back({Fd(fd), std::move(state), readable(end.get())});
			});
		end = send_peer(w.broker);
	}

	static broker::Client start(Worker &w)
	{
		broker::ClientOptions o;
		o.accept_handoff = true;
		json events;
		return connect(w.broker, events, o);
	}

	// A frame of these states with these fds attached (all of them unless `fds` says fewer).
	void send(std::uint64_t id, const std::vector<std::string> &states, const std::vector<int> &fds)
	{
		std::deque<proto::handoff::Item> queue;
		for (const std::string &s : states)
			queue.push_back({proto::UniqueFd(), s});
		std::string frame;
		ch::encode_connections(frame, id, queue, queue.size());
		REQUIRE(ch::send_frame(end.get(), frame, fds) == 0);
	}
};

std::vector<int> raw(const std::vector<Fd> &fds)
{
	std::vector<int> out;
	for (const Fd &fd : fds)
		out.push_back(fd.get());
	return out;
}

std::vector<Fd> connections(std::size_t n)
{
	std::vector<Fd> out;
	for (std::size_t i = 0; i < n; i++)
		out.push_back(connection_fd());
	return out;
}

// The soft RLIMIT_NOFILE that leaves exactly n fd numbers free below it, for one scope.
class FreeFds {
public:
	explicit FreeFds(int n)
	{
		REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
		int fd = 0;
		for (int free = 0;; fd++)
			if (!is_open(fd) && ++free == n)
				break;
		rlimit r = saved_;
		r.rlim_cur = static_cast<rlim_t>(fd + 1);
		REQUIRE(::setrlimit(RLIMIT_NOFILE, &r) == 0);
	}
	~FreeFds() { ::setrlimit(RLIMIT_NOFILE, &saved_); }
	FreeFds(const FreeFds &) = delete;
	FreeFds &operator=(const FreeFds &) = delete;

private:
	rlimit saved_{};
};

TEST_CASE("receiver: on_connection gets each fd with its state, then the ack comes; fds that did not arrive are refused")
{
	Receiving r;
	std::vector<Fd> first = connections(3);
	const std::vector<std::string> states1 = {"GET / HTTP/1.1\r\n", "", std::string(broker::Client::kMaxHandoffState, 's')};
	r.send(7, states1, raw(first));
	REQUIRE(drive(r.c, [&] { return r.got.size() == 3; }));
	for (std::size_t i = 0; i < 3; i++) {
		CAPTURE(i);
		CHECK(same_file(r.got[i].fd.get(), first[i].get()));
		CHECK(r.got[i].state == states1[i]);
		CHECK(::fcntl(r.got[i].fd.get(), F_GETFD) == FD_CLOEXEC);
		CHECK_FALSE(r.got[i].acked_before);
	}
	ch::Ack ack = next_ack(r.c, r.end.get(), 3);
	CHECK(ack.id == 7);
	CHECK(ack.refused.empty());

	// Four fds where only two numbers are free: the kernel installs two, the frame is cut.
	std::vector<Fd> second = connections(4);
	const std::vector<std::string> states2 = {"a", "b", "c", "d"};
	r.send(8, states2, raw(second));
	{
		FreeFds two(2);
		REQUIRE(drive(r.c, [&] { return r.got.size() == 5; }));
	}
	CHECK(same_file(r.got[3].fd.get(), second[0].get()));
	CHECK(same_file(r.got[4].fd.get(), second[1].get()));
	CHECK(r.got[3].state == "a");
	CHECK(r.got[4].state == "b");
	ack = next_ack(r.c, r.end.get(), 4);
	CHECK(ack.id == 8);
	CHECK(ack.refused == std::vector<std::uint32_t>{2, 3});
	CHECK(r.got.size() == 5);

	// The sender goes: the channel closes, and nothing of it stays open.
	r.end.reset();
	r.got.clear();
	first.clear();
	second.clear();
	REQUIRE(drive(r.c, [&] { return open_fds() == r.before; }));
}

// Run alone (meson test client-channel-fd-table): tables never shrink, so another case that
// received many fds first would leave nothing to see.
TEST_CASE("receiver: its first channel grows the fd table in one step, to its fd limit or 65536")
{
	rlimit nofile{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
	long want = static_cast<long>(std::min<rlim_t>(nofile.rlim_cur, 65536));
	long before = fd_table_size();
	MESSAGE("FDSize ", before, " before the channel, fd limit ", nofile.rlim_cur);
	REQUIRE_MESSAGE(before < want, "the table is grown already: run this case alone");
	Receiving r;
	// Growing happens when the peer event is read, before any frame.
	REQUIRE(drive(r.c, [&] { return fd_table_size() >= want; }));
	// The fd that grew it is closed: what is new is the channel's two ends, the test's and the
	// library's.
	CHECK(open_fds().size() == r.before.size() + 2);
}

TEST_CASE("receiver without on_connection: every connection is refused, and closed here")
{
	Receiving r(false);
	std::vector<Fd> fds = connections(3);
	r.send(1, {"x", "y", "z"}, raw(fds));
	ch::Ack ack = next_ack(r.c, r.end.get(), 3);
	CHECK(ack.id == 1);
	CHECK(ack.refused == std::vector<std::uint32_t>{0, 1, 2});
	fds.clear();
	r.end.reset();
	REQUIRE(drive(r.c, [&] { return open_fds() == r.before; }));
}

TEST_CASE("receiver: a hostile sender ends the channel; the frames before it were delivered and acknowledged; no fd leaks")
{
	struct Case {
		std::string name;
		std::function<void(Receiving &, const std::vector<int> &fds)> send;
	};
	auto frame_of = [](std::size_t n) {
		std::deque<proto::handoff::Item> queue;
		for (std::size_t i = 0; i < n; i++)
			queue.push_back({proto::UniqueFd(), "s" + std::to_string(i)});
		std::string frame;
		ch::encode_connections(frame, 99, queue, n);
		return frame;
	};
	const Case cases[] = {
	        {"a frame cut short",
	         [&](Receiving &r, const std::vector<int> &fds) {
		         std::string f = frame_of(2);
		         f.pop_back();
		         REQUIRE(ch::send_frame(r.end.get(), f, {fds.data(), 2}) == 0);
	         }},
	        {"a frame over 64 KiB",
	         [&](Receiving &r, const std::vector<int> &fds) {
		         std::string f = frame_of(1);
		         f.resize(ch::kMaxFrameBytes + 1, 'x');
		         REQUIRE(ch::send_frame(r.end.get(), f, {fds.data(), 1}) == 0);
	         }},
	        {"fewer fds than the header says",
	         [&](Receiving &r, const std::vector<int> &fds) {
		         REQUIRE(ch::send_frame(r.end.get(), frame_of(3), {fds.data(), 2}) == 0);
	         }},
	        {"no fds at all",
	         [&](Receiving &r, const std::vector<int> &) { REQUIRE(ch::send_frame(r.end.get(), frame_of(2), {}) == 0); }},
	        {"more fds than the header says",
	         [&](Receiving &r, const std::vector<int> &fds) {
		         REQUIRE(ch::send_frame(r.end.get(), frame_of(2), {fds.data(), 3}) == 0);
	         }},
	        {"garbage",
	         [&](Receiving &r, const std::vector<int> &fds) {
		         REQUIRE(ch::send_frame(r.end.get(), std::string(100, '\xff'), {fds.data(), 3}) == 0);
	         }},
	        {"an acknowledgement",
	         [&](Receiving &r, const std::vector<int> &fds) {
		         std::string f;
		         ch::encode_ack(f, 1, {});
		         REQUIRE(ch::send_frame(r.end.get(), f, {fds.data(), 1}) == 0);
	         }},
	};
	for (const Case &bad : cases) {
		CAPTURE(bad.name);
		Receiving r;
		std::vector<Fd> good = connections(2);
		std::vector<Fd> hostile = connections(3);
		std::vector<Fd> after = connections(1);
		// All before the worker reads any: it meets them in one wakeup.
		r.send(1, {"one", "two"}, raw(good));
		bad.send(r, raw(hostile));
		r.send(2, {"late"}, raw(after));
		REQUIRE(drive(r.c, [&] { return r.got.size() == 2 && readable(r.end.get()); }));
		CHECK(same_file(r.got[0].fd.get(), good[0].get()));
		CHECK(same_file(r.got[1].fd.get(), good[1].get()));
		CHECK(r.got[0].state == "one");
		CHECK(r.got[1].state == "two");
		ch::Ack ack = next_ack(r.c, r.end.get(), 2);
		CHECK(ack.id == 1);
		CHECK(ack.refused.empty());
		CHECK(ends(r.c, r.end.get()));
		CHECK(r.got.size() == 2); // nothing after the bad frame
		r.got.clear();
		good.clear();
		hostile.clear();
		after.clear();
		r.end.reset();
		auto now = open_fds();
		CHECK_MESSAGE(now == r.before, "before: " << describe(r.before) << "\nafter: " << describe(now));
	}
}

TEST_CASE("receiver: a sender that writes its frames and closes: every frame is still delivered")
{
	Receiving r;
	std::vector<Fd> fds = connections(3);
	r.send(1, {"one"}, {fds[0].get()});
	r.send(2, {"two", "three"}, {fds[1].get(), fds[2].get()});
	r.end.reset();
	REQUIRE(drive(r.c, [&] { return r.got.size() == 3; }));
	for (std::size_t i = 0; i < 3; i++)
		CHECK(same_file(r.got[i].fd.get(), fds[i].get()));
	CHECK(r.got[2].state == "three");
	r.got.clear();
	fds.clear();
	REQUIRE(drive(r.c, [&] { return open_fds() == r.before; }));
}

// A sender that dies with an acknowledgement unread makes the kernel report ECONNRESET to the
// receiver once, before the frames still queued for it: they are delivered, as after a plain EOF
// (the test above), not closed unserved.
TEST_CASE("receiver: a sender that dies with an acknowledgement unread: the frames it wrote are still delivered")
{
	Receiving r;
	std::vector<Fd> fds = connections(3);
	r.send(1, {"one"}, {fds[0].get()});
	REQUIRE(drive(r.c, [&] { return readable(r.end.get()); })); // frame 1's ack, left unread
	r.send(2, {"two", "three"}, {fds[1].get(), fds[2].get()});
	r.end.reset();
	REQUIRE(drive(r.c, [&] { return r.got.size() == 3; }));
	for (std::size_t i = 0; i < 3; i++)
		CHECK(same_file(r.got[i].fd.get(), fds[i].get()));
}
