// libbroker-client's failure paths, in process against a fake brokerd: the broker going away in
// the middle of a handoff, handlers that throw or destroy the client, bad fds, the kernel's limit
// on fds in flight, a registered worker with LISTEN_FDS of its own, and brokerd killed and
// started again (the link: Lost, reconnect with backoff, Connected or Rejected).
#include <broker/client.h>
#include <broker/client.hpp>

#include "fake_broker.hpp"
#include "../skip.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <grp.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

using namespace broker_test;

namespace {

// The variables the library reads.
const char *const kEnvVars[] = {"BROKER_SOCKET", "BROKER_TOKEN", "BROKER_SERVICE", "BROKER_VERSION",
                                "BROKER_INSTANCE", "BROKER_GENERATION", "LISTEN_FDS", "LISTEN_PID",
                                "LISTEN_FDNAMES", "NOTIFY_SOCKET"};

// The tests run in this process: each starts from none of the library's variables and leaves
// them as it found them.
class EnvGuard {
public:
	EnvGuard()
	{
		for (const char *v : kEnvVars) {
			if (const char *value = std::getenv(v))
				saved_[v] = value;
			::unsetenv(v);
		}
	}
	~EnvGuard()
	{
		for (const char *v : kEnvVars)
			::unsetenv(v);
		for (const auto &[k, v] : saved_)
			::setenv(k.c_str(), v.c_str(), 1);
	}
	EnvGuard(const EnvGuard &) = delete;
	EnvGuard &operator=(const EnvGuard &) = delete;

	// A worker started by brokerd: it has a token.
	static void worker(const std::string &socket)
	{
		::setenv("BROKER_SOCKET", socket.c_str(), 1);
		::setenv("BROKER_TOKEN", "sesame", 1);
	}

private:
	std::map<std::string, std::string> saved_;
};

// A fake brokerd and a worker environment pointing at it, restored at the end.
struct WorkerEnv {
	EnvGuard env;
	std::string name = abstract_name("broker");
	FakeBroker broker{name};
	WorkerEnv() { EnvGuard::worker(name); }
};

// The soft RLIMIT_NOFILE for one test. The library keeps its window of batches in flight within
// half of it, so 1000 allows one batch of 253 at a time.
class NofileLimit {
public:
	explicit NofileLimit(rlim_t soft)
	{
		REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
		rlimit r = saved_;
		r.rlim_cur = soft;
		REQUIRE(::setrlimit(RLIMIT_NOFILE, &r) == 0);
	}
	~NofileLimit() { ::setrlimit(RLIMIT_NOFILE, &saved_); }
	NofileLimit(const NofileLimit &) = delete;
	NofileLimit &operator=(const NofileLimit &) = delete;

private:
	rlimit saved_{};
};

// Puts a copy of `fd` at number `target` for one test, and puts back whatever was there. Made
// before any other fd of the test, so that none of them is the one it moves aside.
class FdAt {
public:
	FdAt(int target, int fd) : target_(target)
	{
		REQUIRE(fd != target);
		int flags = ::fcntl(target, F_GETFD);
		if (flags >= 0) {
			saved_ = Fd(::fcntl(target, F_DUPFD_CLOEXEC, 100));
			REQUIRE(saved_.get() >= 0);
			saved_cloexec_ = flags & FD_CLOEXEC;
		}
		REQUIRE(::dup3(fd, target, O_CLOEXEC) == target);
	}
	~FdAt()
	{
		if (saved_.get() >= 0)
			::dup3(saved_.get(), target_, saved_cloexec_ ? O_CLOEXEC : 0);
		else
			::close(target_);
	}
	FdAt(const FdAt &) = delete;
	FdAt &operator=(const FdAt &) = delete;

private:
	int target_;
	Fd saved_;
	bool saved_cloexec_ = false;
};

// A stand-in for an established connection: any open fd passes through SCM_RIGHTS alike.
Fd connection_fd()
{
	Fd fd(::memfd_create("connection", MFD_CLOEXEC));
	REQUIRE(fd.get() >= 0);
	return fd;
}

bool is_open(int fd)
{
	return ::fcntl(fd, F_GETFD) >= 0;
}

// True when both fds refer to the same open file: a received fd is the one that was sent.
bool same_file(int a, int b)
{
	struct stat sa{}, sb{};
	return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

std::string base64(std::string_view in)
{
	static constexpr char k[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	std::string out;
	auto at = [&](std::size_t i) { return i < in.size() ? static_cast<unsigned char>(in[i]) : 0u; };
	for (std::size_t i = 0; i < in.size(); i += 3) {
		unsigned v = at(i) << 16 | at(i + 1) << 8 | at(i + 2);
		out += k[v >> 18 & 63];
		out += k[v >> 12 & 63];
		out += i + 1 < in.size() ? k[v >> 6 & 63] : '=';
		out += i + 2 < in.size() ? k[v & 63] : '=';
	}
	return out;
}

// What the fake broker answers Hello with; it may attach fds.
using HelloReply = std::function<json(const json &hello, std::vector<int> &fds)>;

json default_reply(const json &, std::vector<int> &)
{
	return {{"parameters",
	         {{"service", "web"}, {"instance", "web/2/0"}, {"generation", 2}, {"sockets", json::array()}}}};
}

// Connects a worker to `broker`: `connect` (the library's from_env, C++ or C) runs here while a
// thread plays the broker's side of Hello, since from_env waits for the reply. Then the broker
// reads the Events call. Returns the Hello the broker saw.
json connect_worker(FakeBroker &broker, const std::function<void()> &connect, const HelloReply &reply = default_reply)
{
	json hello;
	bool answered = false;
	std::thread t([&] {
		auto deadline = Clock::now() + kTimeout;
		if (!broker.accept(deadline))
			return;
		hello = broker.receive(deadline);
		if (!hello.is_object())
			return;
		std::vector<int> fds;
		json body = reply(hello, fds);
		answered = broker.try_send(body, fds);
	});
	try {
		connect();
	} catch (...) {
		t.join();
		throw;
	}
	t.join();
	REQUIRE(answered);
	json events = broker.receive(Clock::now() + kTimeout);
	REQUIRE(events.is_object());
	REQUIRE(events["method"] == "io.brokerd.Worker.Events");
	return hello;
}

std::optional<broker::Client> connect_cpp(FakeBroker &broker, const broker::ClientOptions &options = {})
{
	std::optional<broker::Client> c;
	connect_worker(broker, [&] { c.emplace(broker::Client::from_env(options)); });
	REQUIRE(c.has_value());
	return c;
}

broker_client *connect_c(FakeBroker &broker, unsigned flags = 0)
{
	broker_client *c = nullptr;
	connect_worker(broker, [&] { REQUIRE(broker_client_from_env_with_flags(&c, flags) == 0); });
	REQUIRE(c != nullptr);
	return c;
}

// The loss of brokerd is final, as it was before reconnecting: process() throws ECONNRESET.
broker::ClientOptions no_reconnect(bool accept_handoff = false)
{
	broker::ClientOptions o;
	o.accept_handoff = accept_handoff;
	o.reconnect = false;
	return o;
}

struct FreeClient {
	void operator()(broker_client *c) const { broker_client_free(c); }
};
using CClient = std::unique_ptr<broker_client, FreeClient>;

json handoff_event(const json &batch, std::size_t landed, const json &returned = json::array())
{
	return {{"event", "handoff"}, {"batch", batch}, {"landed", landed}, {"returned", returned}};
}

json indices(std::size_t n)
{
	json out = json::array();
	for (std::size_t i = 0; i < n; i++)
		out.push_back(i);
	return out;
}

// Connections handed off, each with its index as its state; the library owns the fds.
struct Handed {
	std::vector<int> fds;
	std::vector<broker::Connection> list;
	std::vector<std::string> states;

	explicit Handed(std::size_t n, std::size_t state_size = 0)
	{
		states.reserve(n);
		for (std::size_t i = 0; i < n; i++) {
			std::string state = std::to_string(i);
			if (state_size > state.size())
				state += std::string(state_size - state.size(), static_cast<char>('a' + i % 26));
			states.push_back(std::move(state));
			fds.push_back(connection_fd().release());
		}
		for (std::size_t i = 0; i < n; i++)
			list.push_back({fds[i], states[i]});
	}
};

// Connections given back through on_returned: the test owns them again.
struct Returned {
	std::vector<Fd> fds;
	std::map<int, std::string> state_of;

	void take(int fd, std::string state)
	{
		fds.emplace_back(fd);
		state_of[fd] = std::move(state);
	}

	// Every handed connection came back, open, with its own state.
	bool all_of(const Handed &h) const
	{
		if (fds.size() != h.fds.size())
			return false;
		for (std::size_t i = 0; i < h.fds.size(); i++) {
			auto it = state_of.find(h.fds[i]);
			if (it == state_of.end() || it->second != h.states[i] || !is_open(h.fds[i]))
				return false;
		}
		return true;
	}
};

void wait_readable(int fd)
{
	REQUIRE(fd >= 0);
	REQUIRE(wait_for(fd, POLLIN, Clock::now() + kTimeout));
}

int error_code_of(const std::function<void()> &f)
{
	try {
		f();
	} catch (const broker::Error &e) {
		return e.code();
	}
	return 0;
}

std::uint64_t monotonic_usec()
{
	timespec ts{};
	::clock_gettime(CLOCK_MONOTONIC, &ts);
	return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u + static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

} // namespace

TEST_CASE("brokerd returns a batch and exits with more queued: all come back, done runs, then ECONNRESET")
{
	NofileLimit limit(1000); // one batch in flight: 300 connections leave 47 queued
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker, no_reconnect());

	Returned back;
	int done = 0;
	broker::HandoffSummary at_done;
	c->on_returned([&](int fd, std::string state) { back.take(fd, std::move(state)); });
	c->on_handoff_done([&](const broker::HandoffSummary &s) {
		done++;
		at_done = s;
	});
	Handed handed(300);
	c->handoff(handed.list.data(), handed.list.size());
	CHECK(c->handoff_pending() == 300);

	auto deadline = Clock::now() + kTimeout;
	json h = broker.receive(deadline);
	REQUIRE(h["method"] == "io.brokerd.Worker.Handoff");
	REQUIRE(h["parameters"]["connections"].size() == 253);
	CHECK(h["parameters"]["remaining"] == 47);
	CHECK(broker.take_fds().size() == 253);

	// Nobody could take them, and brokerd exits before the next batch.
	broker.event(handoff_event(h["parameters"]["batch"], 0, indices(253)));
	broker.close();
	wait_readable(c->fd());

	CHECK(error_code_of([&] { c->process(); }) == ECONNRESET);
	CHECK(back.fds.size() == 300);
	CHECK(back.all_of(handed));
	CHECK(done == 1);
	CHECK(at_done.handed == 300);
	CHECK(at_done.landed == 0);
	CHECK(at_done.returned == 300);
	CHECK(at_done.abandoned == 0);
	CHECK(c->handoff_pending() == 0);
	CHECK(c->fd() == -1);
}


TEST_CASE("on_returned throws: every connection still reaches it, and the next batch still goes out")
{
	NofileLimit limit(1000);
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker);

	Returned back;
	int done = 0;
	bool armed = true; // throws once, at the next call
	c->on_returned([&](int fd, std::string state) {
		back.take(fd, std::move(state));
		if (std::exchange(armed, false))
			throw std::runtime_error("returned handler failed");
	});
	c->on_handoff_done([&](const broker::HandoffSummary &) { done++; });
	Handed handed(300);
	c->handoff(handed.list.data(), handed.list.size());

	auto deadline = Clock::now() + kTimeout;
	json h1 = broker.receive(deadline);
	REQUIRE(h1["method"] == "io.brokerd.Worker.Handoff");
	REQUIRE(h1["parameters"]["connections"].size() == 253);
	CHECK(broker.take_fds().size() == 253);
	broker.event(handoff_event(h1["parameters"]["batch"], 0, indices(253)));
	wait_readable(c->fd());

	CHECK_THROWS_WITH_AS(c->process(), "returned handler failed", std::runtime_error);
	CHECK(back.fds.size() == 253);
	CHECK(c->handoff_summary().returned == 253);
	CHECK(c->fd() != -1);

	// The rest goes out with no further call: no event would come to move it.
	json h2 = broker.receive(deadline);
	REQUIRE(h2.is_object());
	CHECK(h2["method"] == "io.brokerd.Worker.Handoff");
	CHECK(h2["parameters"]["batch"] != h1["parameters"]["batch"]);
	CHECK(h2["parameters"]["connections"].size() == 47);
	std::vector<Fd> second = broker.take_fds();
	REQUIRE(second.size() == 47);
	CHECK(same_file(second[0].get(), handed.fds[253]));

	// They land, and the handoff finishes.
	broker.event(handoff_event(h2["parameters"]["batch"], 47));
	wait_readable(c->fd());
	CHECK(c->process());
	CHECK(done == 1);
	CHECK(c->handoff_pending() == 0);
	CHECK(c->handoff_summary().landed == 47);
	CHECK(c->handoff_summary().returned == 253);

	// A throw while the last batch comes back: the done handler still runs.
	armed = true;
	Handed more(3);
	c->handoff(more.list.data(), more.list.size());
	json h3 = broker.receive(deadline);
	REQUIRE(h3["method"] == "io.brokerd.Worker.Handoff");
	CHECK(broker.take_fds().size() == 3);
	broker.event(handoff_event(h3["parameters"]["batch"], 0, indices(3)));
	wait_readable(c->fd());
	CHECK_THROWS_WITH_AS(c->process(), "returned handler failed", std::runtime_error);
	CHECK(back.fds.size() == 256);
	CHECK(c->handoff_pending() == 0);
	CHECK(done == 2);
}

TEST_CASE("on_handoff_done destroys the client, from C++ and from C")
{
	struct Case {
		const char *api;
		bool broker_exits; // done comes from the broker's answer, or from its going away
	};
	const Case cases[] = {{"cpp", false}, {"cpp", true}, {"c", false}, {"c", true}};
	for (const Case &tc : cases) {
		std::string api = tc.api;
		CAPTURE(api);
		CAPTURE(tc.broker_exits);
		WorkerEnv w;
		FakeBroker &broker = w.broker;

		struct Seen {
			int done = 0;
			std::size_t landed = 0, abandoned = 0;
		} seen;
		std::optional<broker::Client> cpp;
		broker_client *c = nullptr;
		int fd;
		if (api == "cpp") {
			cpp = connect_cpp(broker, no_reconnect());
			cpp->on_handoff_done([&](const broker::HandoffSummary &s) {
				seen.done++;
				seen.landed = s.landed;
				seen.abandoned = s.abandoned;
				cpp.reset();
			});
			broker::Connection conn{connection_fd().release(), "x"};
			cpp->handoff(&conn, 1);
			fd = cpp->fd();
		} else {
			c = connect_c(broker, BROKER_CLIENT_NO_RECONNECT);
			REQUIRE(broker_client_set_handoff_done_handler(
			                c,
			                [](broker_client *client, size_t, size_t landed, size_t, size_t abandoned, void *userdata) {
				                auto *s = static_cast<Seen *>(userdata);
				                s->done++;
				                s->landed = landed;
				                s->abandoned = abandoned;
				                broker_client_free(client);
			                },
			                &seen) == 0);
			broker_connection conn{connection_fd().release(), "x", 1};
			REQUIRE(broker_client_handoff(c, &conn, 1) == 0);
			fd = broker_client_fd(c);
		}

		json h = broker.receive(Clock::now() + kTimeout);
		REQUIRE(h["method"] == "io.brokerd.Worker.Handoff");
		broker.take_fds();
		if (tc.broker_exits)
			broker.close();
		else
			broker.event(handoff_event(h["parameters"]["batch"], 1));
		wait_readable(fd);

		// The client is gone when process() comes back: under ASan, any touch of it fails here.
		if (api == "cpp") {
			int code = 0;
			bool did = false;
			try {
				did = cpp->process();
			} catch (const broker::Error &e) {
				code = e.code();
			}
			CHECK_FALSE(cpp.has_value());
			CHECK(code == (tc.broker_exits ? ECONNRESET : 0));
			CHECK(did == !tc.broker_exits);
		} else {
			int r = broker_client_process(c);
			CHECK(r == (tc.broker_exits ? -ECONNRESET : 1));
		}
		CHECK(seen.done == 1);
		CHECK(seen.landed == (tc.broker_exits ? 0u : 1u));
		CHECK(seen.abandoned == (tc.broker_exits ? 1u : 0u));
		if (seen.done == 0 && c)
			broker_client_free(c);
	}
}

TEST_CASE("a handler throws with a second event already read: timeout() asks for process() at once")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker);

	int drains = 0;
	c->on_drain([&](const broker::DrainRequest &) {
		if (++drains == 1)
			throw std::runtime_error("drain handler failed");
	});
	// Two events in one write, so that one read takes both.
	std::string one = json{{"parameters", {{"event", "drain"}, {"timeout_ms", 5000}}}, {"continues", true}}.dump();
	one.push_back('\0');
	REQUIRE(broker.try_send_raw(one + one, {}, Clock::now() + kTimeout));
	wait_readable(c->fd());

	CHECK_THROWS_WITH_AS(c->process(), "drain handler failed", std::runtime_error);
	CHECK(drains == 1);
	CHECK(c->timeout() == 0);
	// The socket has nothing left to announce: only timeout() wakes the loop.
	pollfd p{c->fd(), c->events(), 0};
	CHECK(::poll(&p, 1, 0) == 0);

	CHECK(c->process());
	CHECK(drains == 2);
	CHECK(c->timeout() == UINT64_MAX);
}

TEST_CASE("brokerd sends connections and exits, and the worker's ack fails: it still takes every one")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker, no_reconnect(true));

	std::vector<Fd> taken;
	std::vector<std::string> states;
	c->on_connection([&](int fd, std::string state) {
		taken.emplace_back(fd);
		states.push_back(std::move(state));
	});

	// One connection, then six with about 100 KB of state between them: more than one read.
	std::vector<Fd> sent;
	std::vector<std::string> sent_states = {"first"};
	sent.push_back(connection_fd());
	broker.event({{"event", "connections"},
	              {"batch", 1},
	              {"connections", json::array({{{"fd", 0}, {"state", base64("first")}}})}},
	             {sent[0].get()});
	json conns = json::array();
	std::vector<int> fds;
	for (int i = 0; i < 6; i++) {
		sent_states.push_back(std::string(12000, static_cast<char>('a' + i)));
		sent.push_back(connection_fd());
		fds.push_back(sent.back().get());
		conns.push_back({{"fd", i}, {"state", base64(sent_states.back())}});
	}
	broker.event({{"event", "connections"}, {"batch", 2}, {"connections", conns}}, fds);
	// brokerd exits: the worker's ack of the first event finds the socket closed.
	broker.close();
	wait_readable(c->fd());

	CHECK(error_code_of([&] { c->process(); }) == ECONNRESET);
	REQUIRE(taken.size() == sent.size());
	for (std::size_t i = 0; i < sent.size(); i++) {
		CAPTURE(i);
		CHECK(same_file(taken[i].get(), sent[i].get()));
		CHECK(states[i] == sent_states[i]);
	}
	CHECK(c->fd() == -1);
}

TEST_CASE("handoff() with a closed fd: EBADF, nothing taken, the connection to brokerd stays up")
{
	for (std::string api : {"cpp", "c"}) {
		CAPTURE(api);
		WorkerEnv w;
		FakeBroker &broker = w.broker;
		std::optional<broker::Client> cpp;
		CClient c;
		if (api == "cpp")
			cpp = connect_cpp(broker);
		else
			c.reset(connect_c(broker));

		Fd good = connection_fd();
		int bad = connection_fd().release();
		::close(bad); // nothing opens an fd between here and handoff()
		if (cpp) {
			broker::Connection conns[] = {{good.get(), "good"}, {bad, "bad"}};
			CHECK(error_code_of([&] { cpp->handoff(conns, 2); }) == EBADF);
			CHECK(cpp->handoff_pending() == 0);
			CHECK(cpp->handoff_summary().handed == 0);
			CHECK(cpp->fd() != -1);
		} else {
			broker_connection conns[] = {{good.get(), "good", 4}, {bad, "bad", 3}};
			CHECK(broker_client_handoff(c.get(), conns, 2) == -EBADF);
			CHECK(broker_client_handoff_pending(c.get()) == 0);
			CHECK(broker_client_fd(c.get()) != -1);
		}
		// The valid one is still the caller's, and nothing reached the broker.
		CHECK(is_open(good.get()));
		CHECK_FALSE(wait_for(broker.conn(), POLLIN, Clock::now()));

		// A later handoff of the valid one goes through on the same connection.
		int fd = good.release();
		if (cpp) {
			broker::Connection conn{fd, "good"};
			cpp->handoff(&conn, 1);
		} else {
			broker_connection conn{fd, "good", 4};
			REQUIRE(broker_client_handoff(c.get(), &conn, 1) == 0);
		}
		json h = broker.receive(Clock::now() + kTimeout);
		REQUIRE(h.is_object());
		CHECK(h["method"] == "io.brokerd.Worker.Handoff");
		CHECK(h["parameters"]["connections"] == json::parse(R"([{"fd": 0, "state": "Z29vZA=="}])"));
		std::vector<Fd> received = broker.take_fds();
		REQUIRE(received.size() == 1);
		CHECK(same_file(received[0].get(), fd));
	}
}

TEST_CASE("handoff() of 600 with one closed fd among them: EBADF names it, nothing taken, no fd left behind")
{
	// Many fds are checked by the kernel, 253 to a sendmsg() on a socket pair of the library's;
	// the chunk with the closed one is then checked fd by fd.
	auto fds_open = [] {
		return std::distance(std::filesystem::directory_iterator("/proc/self/fd"),
		                     std::filesystem::directory_iterator{});
	};
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker);
	std::vector<Fd> conns(600);
	for (auto &fd : conns)
		fd = connection_fd();
	int bad = conns[400].release();
	::close(bad);
	std::vector<broker::Connection> list;
	for (auto &fd : conns)
		list.push_back(broker::Connection{fd.get() >= 0 ? fd.get() : bad, "s"});
	auto before = fds_open();
	try {
		c->handoff(list.data(), list.size());
		FAIL("handoff() took a closed fd");
	} catch (const broker::Error &e) {
		CHECK(e.code() == EBADF);
		CHECK(std::string(e.what()) == "handoff: fd " + std::to_string(bad) + " is not open");
	}
	CHECK(fds_open() == before);
	CHECK(c->handoff_pending() == 0);
	for (std::size_t i = 0; i < conns.size(); i++)
		if (i != 400)
			CHECK(is_open(conns[i].get()));
	CHECK_FALSE(wait_for(broker.conn(), POLLIN, Clock::now()));
}

namespace {

// handoff() of `n` connections, the one at `at` replaced by `bad`: the error it throws (0 for
// none), and that it took nothing and grew no fd table.
std::pair<int, std::string> refused(broker::Client &c, FakeBroker &broker, std::size_t n, int bad)
{
	std::vector<Fd> conns(n);
	for (auto &fd : conns)
		fd = connection_fd();
	std::vector<broker::Connection> list;
	for (auto &fd : conns)
		list.push_back(broker::Connection{fd.get(), "s"});
	list[n / 2].fd = bad;
	long table = fd_table_size();
	std::pair<int, std::string> got{0, ""};
	try {
		c.handoff(list.data(), list.size());
	} catch (const broker::Error &e) {
		got = {e.code(), e.what()};
	}
	CHECK(c.handoff_pending() == 0);
	CHECK(fd_table_size() == table);
	for (auto &fd : conns)
		CHECK(is_open(fd.get()));
	CHECK_FALSE(wait_for(broker.conn(), POLLIN, Clock::now()));
	return got;
}

} // namespace

TEST_CASE("handoff() refuses fd -1 and the library's own fds, in short lists and long")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker);
	for (std::size_t n : {3, 40, 600}) {
		CAPTURE(n);
		auto got = refused(*c, broker, n, -1);
		CHECK(got.first == EBADF);
		CHECK(got.second == "handoff: fd -1 is not open");
		// Its connection to brokerd: the library would close it once it landed.
		got = refused(*c, broker, n, c->fd());
		CHECK(got.first == EINVAL);
		CHECK(got.second == "handoff: fd " + std::to_string(c->fd()) + " is the library's own");
	}
}

TEST_CASE("handoff() refuses an fd it holds from an earlier handoff() not settled yet")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker);
	Fd first = connection_fd();
	int fd = first.release();
	broker::Connection one{fd, "a"};
	c->handoff(&one, 1);
	json h = broker.receive(Clock::now() + kTimeout); // in flight, not answered
	REQUIRE(h.is_object());
	REQUIRE(c->handoff_pending() == 1);
	try {
		c->handoff(&one, 1);
		FAIL("handoff() took an fd it already holds");
	} catch (const broker::Error &e) {
		CHECK(e.code() == EINVAL);
		CHECK(std::string(e.what()) == "handoff: fd " + std::to_string(fd) + " is handed off already");
	}
	CHECK(c->handoff_pending() == 1);
}

TEST_CASE("handoff() refuses an fd the kernel will not pass to another process (io_uring), naming it")
{
	io_uring_params params{};
	Fd ring(static_cast<int>(::syscall(__NR_io_uring_setup, 2, &params)));
	if (ring.get() < 0)
		TEST_SKIP(std::string("io_uring_setup: ") + std::strerror(errno));
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker);
	for (std::size_t n : {3, 40, 600}) {
		CAPTURE(n);
		auto got = refused(*c, broker, n, ring.get());
		CHECK(got.first == EINVAL);
		CHECK(got.second == "handoff: fd " + std::to_string(ring.get()) + " cannot be passed to another process");
	}
}

// Run alone (meson test client-failures-fd-table): tables never shrink, so after another case
// that received many fds there would be nothing to see.
TEST_CASE("the fd table: a closed fd far above it does not grow it; a receiver on brokerd's path grows it in one step")
{
	rlimit nofile{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
	long want = static_cast<long>(std::min<rlim_t>(nofile.rlim_cur, 65536));
	long before = fd_table_size();
	MESSAGE("FDSize ", before, " at the start, fd limit ", nofile.rlim_cur);
	REQUIRE_MESSAGE(before < want, "the table is grown already: run this case alone");
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	broker::ClientOptions o;
	o.accept_handoff = true;
	std::optional<broker::Client> c = connect_cpp(broker, o);

	// Closed, and far above the table: handoff() refuses it, naming it, and leaves the table
	// as it was (refused() checks that), in short lists and long.
	int far = static_cast<int>(std::min<rlim_t>(nofile.rlim_cur, 1 << 20)) - 2;
	for (std::size_t n : {3, 40, 600}) {
		CAPTURE(n);
		auto got = refused(*c, broker, n, far);
		CHECK(got.first == EBADF);
		CHECK(got.second == "handoff: fd " + std::to_string(far) + " is not open");
	}
	REQUIRE(fd_table_size() < want);

	// The first connections event grows it, for the batches after it.
	std::vector<Fd> taken;
	c->on_connection([&](int fd, std::string) { taken.emplace_back(fd); });
	Fd sent = connection_fd();
	broker.event({{"event", "connections"},
	              {"batch", 1},
	              {"connections", json::array({{{"fd", 0}, {"state", base64("s")}}})}},
	             {sent.get()});
	wait_readable(c->fd());
	for (int i = 0; i < 100 && taken.empty(); i++) {
		c->process();
		if (taken.empty())
			wait_readable(c->fd());
	}
	REQUIRE(taken.size() == 1);
	CHECK(fd_table_size() >= want);
}

TEST_CASE("handoff() with one fd twice: EINVAL, nothing taken, and the fd is still the caller's")
{
	// Two entries owning one fd would close it twice: the second close could hit an fd the
	// process opened in between.
	for (std::string api : {"cpp", "c"}) {
		CAPTURE(api);
		WorkerEnv w;
		FakeBroker &broker = w.broker;
		std::optional<broker::Client> cpp;
		CClient c;
		if (api == "cpp")
			cpp = connect_cpp(broker);
		else
			c.reset(connect_c(broker));

		Fd one = connection_fd();
		Fd other = connection_fd();
		if (cpp) {
			broker::Connection conns[] = {{one.get(), "a"}, {other.get(), "b"}, {one.get(), "c"}};
			try {
				cpp->handoff(conns, 3);
				FAIL("handoff() took one fd twice");
			} catch (const broker::Error &e) {
				CHECK(e.code() == EINVAL);
				CHECK(std::string(e.what()).find("fd " + std::to_string(one.get()) + " ") != std::string::npos);
			}
			CHECK(cpp->handoff_pending() == 0);
			CHECK(cpp->handoff_summary().handed == 0);
			CHECK(cpp->fd() != -1);
		} else {
			broker_connection conns[] = {{one.get(), "a", 1}, {other.get(), "b", 1}, {one.get(), "c", 1}};
			CHECK(broker_client_handoff(c.get(), conns, 3) == -EINVAL);
			CHECK(broker_client_handoff_pending(c.get()) == 0);
			CHECK(broker_client_fd(c.get()) != -1);
		}
		CHECK(is_open(one.get()));
		CHECK(is_open(other.get()));
		CHECK_FALSE(wait_for(broker.conn(), POLLIN, Clock::now()));
	}
}

TEST_CASE("a registered worker with LISTEN_FDS of its own asks for and uses the service's sockets")
{
	EnvGuard env;
	// The worker's own socket-activated "metrics" socket, at fd 3 as systemd would put it.
	Fd metrics(::fcntl(bind_abstract(SOCK_STREAM, abstract_name("metrics")).get(), F_DUPFD_CLOEXEC, 100));
	REQUIRE(metrics.get() >= 0);
	FdAt at3(3, metrics.get());
	::setenv("LISTEN_FDS", "1", 1);
	::setenv("LISTEN_FDNAMES", "metrics", 1);
	::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);

	std::string name = abstract_name("broker");
	FakeBroker broker(name);
	::setenv("BROKER_SOCKET", name.c_str(), 1);
	::setenv("BROKER_SERVICE", "api", 1);
	std::string http_name = abstract_name("http");
	Fd http = bind_abstract(SOCK_STREAM, http_name);

	std::optional<broker::Client> c;
	json hello = connect_worker(
	        broker, [&] { c.emplace(broker::Client::from_env()); },
	        [&](const json &hello, std::vector<int> &fds) {
		        json socket = {{"name", "http"}, {"address", "unix:@" + http_name.substr(1)}, {"kind", "stream"}};
		        // brokerd sends the fds only when asked for them.
		        if (hello["parameters"].value("want_fds", false)) {
			        socket["fd"] = 0;
			        fds.push_back(http.get());
		        }
		        return json{{"parameters",
		                     {{"service", "api"}, {"instance", "api/3/0"}, {"generation", 3}, {"sockets", {socket}}}}};
	        });
	INFO(hello.dump());
	CHECK(hello["parameters"]["service"] == "api");
	CHECK_FALSE(hello["parameters"].contains("token"));
	CHECK(hello["parameters"]["want_fds"] == true);

	REQUIRE(c.has_value());
	REQUIRE(c->listeners().size() == 1);
	CHECK(c->listeners()[0].name == "http");
	int fd = c->listeners()[0].fd;
	CHECK(fd != 3);
	CHECK(same_file(fd, http.get()));
	CHECK(c->listener("http") == fd);
	CHECK(error_code_of([&] { c->listener("metrics"); }) == ENOENT);
	// The worker's own socket is untouched.
	CHECK(same_file(3, metrics.get()));
	c.reset();
	CHECK(same_file(3, metrics.get()));
}

namespace {

// How the ETOOMANYREFS child ends: 0, or the step that went wrong.
enum PressureExit : int {
	kPressureOk = 0,
	kPressureDropPrivileges = 10,
	kPressureFirstBatch,
	kPressureHandoffThrew,
	kPressurePollout,
	kPressureNoTimeout,
	kPressureProcessThrew,
	kPressureConnectionLost,
	kPressureSentEarly,
	kPressureFirstRead,
	kPressureRetryThrew,
	kPressureNeverSent,
	kPressureWrongBatch,
	kPressureUncaught = 99,
};

const char *describe(int code)
{
	switch (code) {
	case kPressureOk: return "ok";
	case kPressureDropPrivileges: return "could not drop to uid/gid 65534";
	case kPressureFirstBatch: return "the first client's batch was not written whole";
	case kPressureHandoffThrew: return "handoff() threw under the fds-in-flight limit";
	case kPressurePollout: return "events() asked for POLLOUT under the fds-in-flight limit";
	case kPressureNoTimeout: return "timeout() was UINT64_MAX under the fds-in-flight limit";
	case kPressureProcessThrew: return "process() threw under the fds-in-flight limit";
	case kPressureConnectionLost: return "fd() was -1 after process() under the fds-in-flight limit";
	case kPressureSentEarly: return "the second batch reached the broker despite the limit (no ETOOMANYREFS?)";
	case kPressureFirstRead: return "the first broker could not read its batch";
	case kPressureRetryThrew: return "process() threw while retrying";
	case kPressureNeverSent: return "the second batch never went out after the fds left flight";
	case kPressureWrongBatch: return "the second broker got something else than the batch";
	case kPressureUncaught: return "an exception or failed REQUIRE in the child";
	default: return "killed or unknown";
	}
}

// In a child of its own, as uid 65534 (root is exempt from the limit): a sibling client's batch
// holds 253 fds in flight, over a soft RLIMIT_NOFILE of 200, so the second client's sendmsg gets
// ETOOMANYREFS. That is a wait, retried from timeout(), never an error.
int fds_in_flight_child()
{
	if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0)
		return kPressureDropPrivileges;
	std::string name_a = abstract_name("broker-a"), name_b = abstract_name("broker-b");
	FakeBroker fa(name_a), fb(name_b);
	EnvGuard::worker(name_a);
	std::optional<broker::Client> a = connect_cpp(fa);
	EnvGuard::worker(name_b);
	std::optional<broker::Client> b = connect_cpp(fb);
	Handed ha(253), hb(10);

	rlimit r{};
	::getrlimit(RLIMIT_NOFILE, &r);
	r.rlim_cur = 600;
	::setrlimit(RLIMIT_NOFILE, &r);
	a->handoff(ha.list.data(), ha.list.size()); // fa does not read it yet: 253 fds in flight
	if (a->events() & POLLOUT)
		return kPressureFirstBatch;

	r.rlim_cur = 200;
	::setrlimit(RLIMIT_NOFILE, &r);
	try {
		b->handoff(hb.list.data(), hb.list.size());
	} catch (...) {
		return kPressureHandoffThrew;
	}
	for (int round = 0; round < 2; round++) {
		if (b->events() & POLLOUT)
			return kPressurePollout;
		if (b->timeout() == UINT64_MAX)
			return kPressureNoTimeout;
		if (round == 1)
			break;
		try {
			b->process();
		} catch (...) {
			return kPressureProcessThrew;
		}
		if (b->fd() < 0)
			return kPressureConnectionLost;
	}
	if (wait_for(fb.conn(), POLLIN, Clock::now()))
		return kPressureSentEarly;

	// The sibling's fds leave flight (they cannot be installed under this limit and close: fine).
	json h = fa.receive(Clock::now() + kTimeout);
	if (!h.is_object() || h["method"] != "io.brokerd.Worker.Handoff")
		return kPressureFirstRead;
	fa.take_fds();

	// The loop waits for timeout(), not for POLLOUT, and the batch goes out.
	auto deadline = Clock::now() + kTimeout;
	bool sent = false;
	while (!sent && Clock::now() < deadline) {
		std::uint64_t at = b->timeout();
		int wait_ms = ms_left(deadline);
		if (at != UINT64_MAX) {
			std::uint64_t now = monotonic_usec();
			wait_ms = std::min<int>(wait_ms, at > now ? static_cast<int>((at - now + 999) / 1000) : 0);
		}
		pollfd p{b->fd(), b->events(), 0};
		::poll(&p, 1, wait_ms);
		try {
			b->process();
		} catch (...) {
			return kPressureRetryThrew;
		}
		sent = wait_for(fb.conn(), POLLIN, Clock::now());
	}
	if (!sent)
		return kPressureNeverSent;
	json hbatch = fb.receive(Clock::now() + kTimeout);
	if (!hbatch.is_object() || hbatch["method"] != "io.brokerd.Worker.Handoff" ||
	    hbatch["parameters"]["connections"].size() != hb.fds.size())
		return kPressureWrongBatch;
	return kPressureOk;
}

} // namespace

TEST_CASE("ETOOMANYREFS from fds in flight is a wait: no error, no POLLOUT, retried after timeout()")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root to run a child as uid 65534 (root is exempt from the limit)");
	pid_t pid = ::fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		::alarm(30); // the child's own waits have deadlines; this bounds the rest
		int code = kPressureUncaught;
		try {
			code = fds_in_flight_child();
		} catch (...) {
		}
		::_exit(code);
	}
	int status = 0;
	REQUIRE(::waitpid(pid, &status, 0) == pid);
	REQUIRE(WIFEXITED(status));
	int code = WEXITSTATUS(status);
	std::string what = describe(code);
	INFO("child: " << what);
	CHECK(code == kPressureOk);
}

TEST_CASE("a Handoff partly written when brokerd exits: its connections come back, none abandoned")
{
	struct Case {
		const char *what;
		std::size_t broker_reads; // bytes the broker reads (taking the fds) before it exits
	};
	const Case cases[] = {{"broker reads nothing", 0}, {"broker reads the first bytes and the fds", 4096}};
	for (const Case &tc : cases) {
		std::string what = tc.what;
		CAPTURE(what);
		WorkerEnv w;
		FakeBroker &broker = w.broker;
		std::optional<broker::Client> c = connect_cpp(broker, no_reconnect());

		// A small send buffer and large states: the one batch cannot be written whole.
		int small = 4096;
		REQUIRE(::setsockopt(c->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) == 0);
		Returned back;
		int done = 0;
		c->on_returned([&](int fd, std::string state) { back.take(fd, std::move(state)); });
		c->on_handoff_done([&](const broker::HandoffSummary &) { done++; });
		Handed handed(10, broker::Client::kMaxHandoffState);
		c->handoff(handed.list.data(), handed.list.size());
		REQUIRE(c->handoff_pending() == 10);
		CHECK((c->events() & POLLOUT) != 0); // the rest of the message waits

		auto deadline = Clock::now() + kTimeout;
		// Its first bytes, and with them its fds, reached the broker's socket.
		REQUIRE(wait_for(broker.conn(), POLLIN, deadline));
		if (tc.broker_reads > 0) {
			REQUIRE(broker.read_some(tc.broker_reads, deadline) > 0);
			CHECK(broker.take_fds().size() == 10);
		}
		broker.close();
		REQUIRE(wait_for(c->fd(), c->events(), deadline));

		CHECK(error_code_of([&] { c->process(); }) == ECONNRESET);
		CHECK(back.all_of(handed));
		CHECK(c->handoff_summary().returned == 10);
		CHECK(c->handoff_summary().abandoned == 0);
		CHECK(c->handoff_pending() == 0);
		CHECK(done == 1);
		CHECK(c->fd() == -1);
	}
}

// ---- brokerd goes away and comes back: the link ----

namespace {

constexpr auto kNoTimeout = std::numeric_limits<std::uint64_t>::max();

// A worker's event loop, one turn: poll the library's fd (none while Lost) until its timeout()
// at the latest, bounded by `slice` so the test's broker side gets its turn, then process().
// Returns process()'s result; exceptions go to the caller.
template <typename Fd_, typename Events, typename Timeout, typename Process>
int loop_turn(Fd_ fd, Events events, Timeout timeout, Process process, std::chrono::milliseconds slice = 20ms)
{
	std::uint64_t t = timeout();
	long long wait = slice.count();
	if (t != kNoTimeout) {
		std::uint64_t now = monotonic_usec();
		wait = t <= now ? 0 : std::min<long long>(wait, static_cast<long long>((t - now + 999) / 1000));
	}
	pollfd p{fd(), static_cast<short>(events()), 0};
	::poll(&p, fd() >= 0 ? 1 : 0, static_cast<int>(wait));
	return process();
}

// Runs the C++ worker's loop until `done` holds or the deadline passes.
bool drive(broker::Client &c, const std::function<bool()> &done, Clock::time_point deadline = Clock::now() + kTimeout)
{
	while (Clock::now() < deadline) {
		if (done())
			return true;
		loop_turn([&] { return c.fd(); }, [&] { return c.events(); }, [&] { return c.timeout(); },
		          [&] { return c.process() ? 1 : 0; });
	}
	return done();
}

// The same for the C API; a negative return of broker_client_process() fails the test.
bool drive_c(broker_client *c, const std::function<bool()> &done, Clock::time_point deadline = Clock::now() + kTimeout)
{
	while (Clock::now() < deadline) {
		if (done())
			return true;
		int r = loop_turn([&] { return broker_client_fd(c); }, [&] { return broker_client_events(c); },
		                  [&] { return broker_client_timeout(c); }, [&] { return broker_client_process(c); });
		REQUIRE(r >= 0);
	}
	return done();
}

json hello_reply(const char *instance = "web/2/0")
{
	return {{"parameters", {{"service", "web"}, {"instance", instance}, {"generation", 2}, {"sockets", json::array()}}}};
}

broker::ClientOptions quick_reconnect(std::chrono::milliseconds min = 10ms, std::chrono::milliseconds max = 40ms)
{
	broker::ClientOptions o;
	o.reconnect_min = min;
	o.reconnect_max = max;
	return o;
}

// What on_link reported: the state and the error's code (0 for none).
using Links = std::vector<std::pair<broker::Link, int>>;

// Lets the worker find the restarted brokerd `b` and say Hello: the Hello b read.
json accept_hello(broker::Client &c, FakeBroker &b)
{
	auto deadline = Clock::now() + kTimeout;
	REQUIRE(drive(c, [&] { return b.accept(Clock::now()); }, deadline));
	json hello = b.receive(deadline);
	REQUIRE(hello.is_object());
	return hello;
}

} // namespace

TEST_CASE("brokerd restarts: Lost, the listener kept, Hello again with the token, Events, Ready and the last Status replayed, Connected")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	Fd http = bind_abstract(SOCK_STREAM, abstract_name("http"));
	std::optional<broker::Client> c;
	json first = connect_worker(broker, [&] { c.emplace(broker::Client::from_env(quick_reconnect())); },
	                            [&](const json &, std::vector<int> &fds) {
		                            fds.push_back(http.get());
		                            json r = hello_reply();
		                            r["parameters"]["sockets"] = {{{"name", "http"}, {"address", "unix:@x"}, {"kind", "unix"}, {"fd", 0}}};
		                            return r;
	                            });
	CHECK(first["parameters"] == json{{"token", "sesame"}, {"want_fds", true}});
	REQUIRE(c.has_value());
	int listener = c->listener("http");
	CHECK(same_file(listener, http.get()));
	Links links;
	c->on_link([&](broker::Link l, const broker::Error *e) { links.emplace_back(l, e ? e->code() : 0); });
	std::vector<std::chrono::steady_clock::time_point> drains;
	c->on_drain([&](const broker::DrainRequest &r) { drains.push_back(r.deadline); });
	CHECK(c->link() == broker::Link::Connected);

	auto deadline = Clock::now() + kTimeout;
	c->ready();
	c->status("one");
	c->status("two");
	CHECK(broker.receive(deadline)["method"] == "io.brokerd.Worker.Ready");
	CHECK(broker.receive(deadline)["parameters"]["text"] == "one");
	CHECK(broker.receive(deadline)["parameters"]["text"] == "two");
	broker.event({{"event", "drain"}, {"timeout_ms", 60000}});
	REQUIRE(drive(*c, [&] { return drains.size() == 1; }));

	// brokerd is killed. A status written to its dead socket is no error (and no SIGPIPE).
	broker.go_away();
	c->status("three");
	REQUIRE(drive(*c, [&] { return !links.empty(); }));
	CHECK(links == Links{{broker::Link::Lost, ECONNRESET}});
	CHECK(c->link() == broker::Link::Lost);
	CHECK(c->fd() == -1);
	CHECK(c->timeout() != kNoTimeout);
	CHECK(c->listener("http") == listener);
	CHECK(same_file(listener, http.get()));
	// No successor is known: a handoff takes nothing.
	Fd conn = connection_fd();
	broker::Connection one{conn.get(), ""};
	CHECK(error_code_of([&] { c->handoff(&one, 1); }) == ENOTCONN);
	CHECK(is_open(conn.get()));
	CHECK(c->handoff_pending() == 0);

	// A brokerd that accepts and goes away before answering changes nothing: still Lost, and
	// the next attempt comes.
	FakeBroker again(w.name);
	json hello = accept_hello(*c, again);
	int unanswered = c->fd();
	CHECK(unanswered >= 0);
	again.close();
	REQUIRE(drive(*c, [&] { return c->fd() == -1; }));
	CHECK(links.size() == 1);
	CHECK(c->link() == broker::Link::Lost);

	hello = accept_hello(*c, again);
	// A loop that re-registers when the number changes must see it change.
	CHECK(c->fd() >= 0);
	CHECK(c->fd() != unanswered);
	// The same Hello as at start, without asking for the sockets it holds.
	CHECK(hello["method"] == "io.brokerd.Worker.Hello");
	CHECK(hello["parameters"] == json{{"token", "sesame"}, {"want_fds", false}});
	CHECK(hello.value("oneway", false) == false);
	again.send(hello_reply());
	REQUIRE(drive(*c, [&] { return links.size() == 2; }));
	CHECK(links[1] == std::pair{broker::Link::Connected, 0});
	CHECK(c->link() == broker::Link::Connected);
	CHECK(c->fd() >= 0);
	json events = again.receive(deadline);
	CHECK(events["method"] == "io.brokerd.Worker.Events");
	CHECK(events["more"] == true);
	// Nothing was in flight and nothing came: the new brokerd is told so, as it waits for every
	// instance that spoke to its predecessor.
	json resume = again.receive(deadline);
	CHECK(resume["method"] == "io.brokerd.Worker.Resume");
	CHECK(resume["oneway"] == true);
	CHECK(resume["parameters"] == json{{"in_doubt", json::array()}, {"received", json::array()}});
	json ready = again.receive(deadline);
	CHECK(ready["method"] == "io.brokerd.Worker.Ready");
	CHECK(ready["oneway"] == true);
	json status = again.receive(deadline);
	CHECK(status["method"] == "io.brokerd.Worker.Status");
	CHECK(status["parameters"] == json{{"text", "three"}});

	// The new brokerd sends the drain again, with what remains: the handler runs again.
	again.event({{"event", "drain"}, {"timeout_ms", 30000}});
	REQUIRE(drive(*c, [&] { return drains.size() == 2; }));
	CHECK(drains[1] < drains[0]);
	// Handoffs go to the new brokerd; the listener is still the same socket.
	c->handoff(&one, 1);
	conn.release();
	json h = again.receive(deadline);
	CHECK(h["method"] == "io.brokerd.Worker.Handoff");
	CHECK(again.take_fds().size() == 1);
	CHECK(same_file(c->listener("http"), http.get()));
}

TEST_CASE("while brokerd is away, process() never blocks: no listener, then a full backlog; the wait doubles up to its cap")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	constexpr std::uint64_t kMin = 40'000, kMax = 160'000; // usec
	std::optional<broker::Client> c = connect_cpp(broker, quick_reconnect(40ms, 160ms));
	broker.go_away();

	// The wait before attempt k is min·2^k capped at max, jittered between half and all of it:
	// scheduled inside process(), so between its start and its end.
	const std::uint64_t nominal[] = {kMin, 2 * kMin, kMax, kMax, kMax, kMax};
	std::uint64_t t0 = monotonic_usec();
	wait_readable(c->fd());
	CHECK(c->process());
	std::uint64_t t1 = monotonic_usec();
	for (std::size_t k = 0; k < std::size(nominal); k++) {
		CAPTURE(k);
		std::uint64_t at = c->timeout();
		CHECK(at >= t0 + nominal[k] / 2);
		CHECK(at <= t1 + nominal[k]);
		CHECK(c->fd() == -1);
		CHECK(c->link() == broker::Link::Lost);
		while (monotonic_usec() < at)
			::poll(nullptr, 0, static_cast<int>((at - monotonic_usec() + 999) / 1000));

		// The first attempts find nothing at the address; the last ones a listener whose backlog
		// is full, where a blocking connect() would wait.
		Fd full;
		std::vector<Fd> fillers;
		if (k >= 3) {
			full = Fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
			socklen_t len;
			sockaddr_un sa = unix_address(w.name, len);
			REQUIRE(::bind(full.get(), reinterpret_cast<sockaddr *>(&sa), len) == 0);
			REQUIRE(::listen(full.get(), 0) == 0);
			for (int i = 0; i < 64; i++) {
				Fd f(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
				if (::connect(f.get(), reinterpret_cast<sockaddr *>(&sa), len) < 0) {
					REQUIRE(errno == EAGAIN);
					break;
				}
				fillers.push_back(std::move(f));
			}
			REQUIRE(!fillers.empty());
		}
		// Should process() block, this unblocks it after 2 s (and the bound below fails).
		std::atomic<bool> returned{false};
		std::thread watchdog([&] {
			auto until = Clock::now() + 2s;
			while (!returned && Clock::now() < until)
				::poll(nullptr, 0, 10);
			while (!returned && full.get() >= 0) {
				Fd(::accept4(full.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
				::poll(nullptr, 0, 10);
			}
		});
		t0 = monotonic_usec();
		bool did = c->process();
		t1 = monotonic_usec();
		returned = true;
		watchdog.join();
		CHECK(did);
		CHECK(t1 - t0 < 1'000'000); // generous: it must not wait at all
		if (k >= 3) {
			// Exactly the fillers wait in the backlog: the worker got no connection in.
			std::size_t queued = 0;
			while (Fd(::accept4(full.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK)).get() >= 0)
				queued++;
			CHECK(queued == fillers.size());
		}
	}
}

TEST_CASE("the restarted brokerd refuses the new Hello: Rejected, its error from process(), and no more attempts")
{
	struct Case {
		const char *what;
		json reply;
		int code;
	};
	const Case cases[] = {
	        {"InvalidToken", {{"error", "io.brokerd.Worker.InvalidToken"}, {"parameters", json::object()}}, EREMOTEIO},
	        {"PermissionDenied", {{"error", "org.varlink.service.PermissionDenied"}, {"parameters", json::object()}}, EACCES},
	        {"another instance", hello_reply("web/3/0"), ESTALE},
	};
	for (const Case &tc : cases) {
		std::string what = tc.what;
		CAPTURE(what);
		WorkerEnv w;
		std::optional<broker::Client> c = connect_cpp(w.broker, quick_reconnect());
		Links links;
		c->on_link([&](broker::Link l, const broker::Error *e) { links.emplace_back(l, e ? e->code() : 0); });
		c->ready();
		w.broker.go_away();
		REQUIRE(drive(*c, [&] { return !links.empty(); }));

		FakeBroker again(w.name);
		json hello = accept_hello(*c, again);
		CHECK(hello["parameters"]["token"] == "sesame");
		again.send(tc.reply);
		wait_readable(c->fd());
		CHECK(error_code_of([&] { c->process(); }) == tc.code);
		CHECK(links == Links{{broker::Link::Lost, ECONNRESET}, {broker::Link::Rejected, tc.code}});
		CHECK(c->link() == broker::Link::Rejected);
		CHECK(c->fd() == -1);
		CHECK(c->timeout() == kNoTimeout);
		CHECK_FALSE(c->process());
		CHECK(error_code_of([&] { c->ready(); }) == ENOTCONN);
		// The worker closed that connection, sent nothing after Hello, and never knocks again.
		CHECK(again.receive(Clock::now() + kTimeout).is_null());
		CHECK_FALSE(again.knocked());
		CHECK(links.size() == 2);
	}
}

TEST_CASE("reconnect off: the loss throws ECONNRESET as before, and nothing knocks at the restarted brokerd")
{
	WorkerEnv w;
	std::optional<broker::Client> c = connect_cpp(w.broker, no_reconnect());
	Links links;
	c->on_link([&](broker::Link l, const broker::Error *e) { links.emplace_back(l, e ? e->code() : 0); });
	w.broker.go_away();
	FakeBroker again(w.name);
	wait_readable(c->fd());
	CHECK(error_code_of([&] { c->process(); }) == ECONNRESET);
	CHECK(links == Links{{broker::Link::Lost, ECONNRESET}});
	CHECK(c->link() == broker::Link::Lost);
	CHECK(c->fd() == -1);
	CHECK(c->timeout() == kNoTimeout);
	CHECK_FALSE(c->process());
	CHECK(error_code_of([&] { c->ready(); }) == ECONNRESET);
	CHECK_FALSE(again.knocked());
}

TEST_CASE("C: brokerd restarts, then one refuses: the link handler sees Lost, Connected, Rejected; ready and status replayed")
{
	WorkerEnv w;
	broker_client *raw = connect_c(w.broker);
	CClient c(raw);
	struct Seen {
		std::vector<std::pair<int, int>> links;
	} seen;
	REQUIRE(broker_client_set_link_handler(
	                raw,
	                [](broker_client *, int link, int error, void *userdata) {
		                static_cast<Seen *>(userdata)->links.emplace_back(link, error);
	                },
	                &seen) == 0);
	CHECK(broker_client_link(raw) == BROKER_LINK_CONNECTED);
	auto deadline = Clock::now() + kTimeout;
	REQUIRE(broker_client_ready(raw) == 0);
	CHECK(w.broker.receive(deadline)["method"] == "io.brokerd.Worker.Ready");

	w.broker.go_away();
	REQUIRE(drive_c(raw, [&] { return !seen.links.empty(); }));
	CHECK(seen.links == std::vector<std::pair<int, int>>{{BROKER_LINK_LOST, -ECONNRESET}});
	CHECK(broker_client_link(raw) == BROKER_LINK_LOST);
	CHECK(broker_client_fd(raw) == -1);
	CHECK(broker_client_status(raw, "while lost") == 0);
	Fd conn = connection_fd();
	broker_connection one{conn.get(), nullptr, 0};
	CHECK(broker_client_handoff(raw, &one, 1) == -ENOTCONN);

	{
		FakeBroker again(w.name);
		REQUIRE(drive_c(raw, [&] { return again.accept(Clock::now()); }));
		json hello = again.receive(deadline);
		CHECK(hello["parameters"] == json{{"token", "sesame"}, {"want_fds", false}});
		again.send(hello_reply());
		REQUIRE(drive_c(raw, [&] { return seen.links.size() == 2; }));
		CHECK(seen.links[1] == std::pair{BROKER_LINK_CONNECTED, 0});
		CHECK(again.receive(deadline)["method"] == "io.brokerd.Worker.Events");
		CHECK(again.receive(deadline)["method"] == "io.brokerd.Worker.Resume");
		CHECK(again.receive(deadline)["method"] == "io.brokerd.Worker.Ready");
		CHECK(again.receive(deadline)["parameters"] == json{{"text", "while lost"}});
		again.go_away();
	}
	REQUIRE(drive_c(raw, [&] { return seen.links.size() == 3; }));
	CHECK(seen.links[2] == std::pair{BROKER_LINK_LOST, -ECONNRESET});

	FakeBroker refusing(w.name);
	REQUIRE(drive_c(raw, [&] { return refusing.accept(Clock::now()); }));
	CHECK(refusing.receive(deadline)["method"] == "io.brokerd.Worker.Hello");
	refusing.send({{"error", "io.brokerd.Worker.InvalidToken"}, {"parameters", json::object()}});
	wait_readable(broker_client_fd(raw));
	CHECK(broker_client_process(raw) == -EREMOTEIO);
	CHECK(seen.links.size() == 4);
	CHECK(seen.links.back() == std::pair{BROKER_LINK_REJECTED, -EREMOTEIO});
	CHECK(broker_client_link(raw) == BROKER_LINK_REJECTED);
	CHECK(broker_client_timeout(raw) == UINT64_MAX);
	CHECK(broker_client_process(raw) == 0);
	CHECK(broker_client_from_env_with_flags(nullptr, BROKER_CLIENT_NO_RECONNECT) == -EINVAL);
}

TEST_CASE("a registered worker reconnects with its service, or with the token a Hello reply gave it")
{
	struct Case {
		const char *what;
		json token; // in the first Hello's reply, when a string
		json again; // the Hello on reconnect
	};
	const Case cases[] = {
	        {"no token", nullptr, {{"service", "web"}, {"version", "2.1"}, {"want_fds", false}}},
	        {"a token in the reply", "t-42", {{"token", "t-42"}, {"want_fds", false}, {"accept_handoff", true}}},
	};
	for (const Case &tc : cases) {
		std::string what = tc.what;
		CAPTURE(what);
		EnvGuard env;
		std::string name = abstract_name("broker");
		::setenv("BROKER_SOCKET", name.c_str(), 1);
		::setenv("BROKER_SERVICE", "web", 1);
		::setenv("BROKER_VERSION", "2.1", 1);
		FakeBroker broker(name);
		broker::ClientOptions options = quick_reconnect();
		options.accept_handoff = true;
		std::optional<broker::Client> c;
		json first = connect_worker(broker, [&] { c.emplace(broker::Client::from_env(options)); },
		                            [&](const json &, std::vector<int> &) {
			                            json r = hello_reply();
			                            if (tc.token.is_string())
				                            r["parameters"]["token"] = tc.token;
			                            return r;
		                            });
		CHECK(first["parameters"] == json{{"service", "web"}, {"version", "2.1"}, {"want_fds", true}, {"accept_handoff", true}});
		REQUIRE(c.has_value());
		broker.go_away();
		REQUIRE(drive(*c, [&] { return c->link() == broker::Link::Lost && c->fd() == -1; }));

		FakeBroker again(name);
		json hello = accept_hello(*c, again);
		json expect = tc.again;
		if (!tc.token.is_string())
			expect["accept_handoff"] = true;
		CHECK(hello["parameters"] == expect);
		again.send(hello_reply());
		REQUIRE(drive(*c, [&] { return c->link() == broker::Link::Connected; }));
		CHECK(again.receive(Clock::now() + kTimeout)["method"] == "io.brokerd.Worker.Events");
	}
}

TEST_CASE("brokerd restarts mid-handoff: the batches in flight are held in doubt and said in Resume with what came here; the new brokerd's answer lands, returns and abandons them")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	broker::ClientOptions options = quick_reconnect();
	options.accept_handoff = true;
	std::optional<broker::Client> c = connect_cpp(broker, options);
	std::vector<std::pair<int, std::string>> received, returned;
	c->on_connection([&](int fd, std::string state) { received.emplace_back(fd, std::move(state)); });
	c->on_returned([&](int fd, std::string state) { returned.emplace_back(fd, std::move(state)); });
	auto deadline = Clock::now() + kTimeout;

	// As a receiver: a chunk of three from web/1/0's batch 7, its third refused for want of a
	// valid state; and one from a brokerd that names no origin, which nobody can ask about.
	Fd in[4] = {connection_fd(), connection_fd(), connection_fd(), connection_fd()};
	broker.event({{"event", "connections"},
	              {"batch", 40},
	              {"origin", {{"instance", "web/1/0"}, {"pid", 4321}, {"batch", 7}, {"first", 5}}},
	              {"connections", {{{"fd", 0}}, {{"fd", 1}, {"state", "c3Q="}}, {{"fd", 2}, {"state", "!"}}}}},
	             {in[0].get(), in[1].get(), in[2].get()});
	REQUIRE(drive(*c, [&] { return received.size() == 2; }));
	CHECK(broker.receive(deadline)["parameters"] == json{{"batch", 40}, {"refused", {2}}});
	broker.event({{"event", "connections"}, {"batch", 41}, {"connections", {{{"fd", 0}}}}}, {in[3].get()});
	REQUIRE(drive(*c, [&] { return received.size() == 3; }));
	CHECK(broker.receive(deadline)["parameters"] == json{{"batch", 41}});

	// As a sender: two batches, of 3 and 2, both in flight when brokerd is killed.
	std::vector<Fd> out;
	std::vector<int> raw;
	for (int i = 0; i < 5; i++) {
		out.push_back(connection_fd());
		raw.push_back(out.back().get());
	}
	broker::Connection three[] = {{raw[0], "a"}, {raw[1], "b"}, {raw[2], "c"}};
	c->handoff(three, 3);
	json h1 = broker.receive(deadline);
	REQUIRE(h1["method"] == "io.brokerd.Worker.Handoff");
	broker.take_fds();
	broker::Connection two[] = {{raw[3], "d"}, {raw[4], "e"}};
	c->handoff(two, 2);
	json h2 = broker.receive(deadline);
	REQUIRE(h2["method"] == "io.brokerd.Worker.Handoff");
	broker.take_fds();
	for (auto &fd : out)
		(void)fd.release(); // the library owns them now
	broker.go_away();
	REQUIRE(drive(*c, [&] { return c->link() == broker::Link::Lost; }));
	// Held, not closed: a receiver may serve them already, or nobody has them.
	CHECK(c->handoff_pending() == 5);
	for (int fd : raw)
		CHECK(is_open(fd));
	CHECK(c->handoff_summary().abandoned == 0);

	FakeBroker again(w.name);
	json hello = accept_hello(*c, again);
	CHECK(hello["parameters"]["accept_handoff"] == true);
	again.send(hello_reply());
	REQUIRE(drive(*c, [&] { return c->link() == broker::Link::Connected; }));
	CHECK(again.receive(deadline)["method"] == "io.brokerd.Worker.Events");
	json resume = again.receive(deadline);
	CHECK(resume["method"] == "io.brokerd.Worker.Resume");
	CHECK(resume["oneway"] == true);
	json b1 = h1["parameters"]["batch"], b2 = h2["parameters"]["batch"];
	CHECK(resume["parameters"]["in_doubt"] == json{{{"batch", b1}, {"count", 3}}, {{"batch", b2}, {"count", 2}}});
	CHECK(resume["parameters"]["received"] ==
	      json{{{"instance", "web/1/0"}, {"pid", 4321}, {"batch", 7}, {"first", 5}, {"count", 3}, {"refused", {2}}}});
	// Still held until the new brokerd says.
	CHECK(c->handoff_pending() == 5);

	// Batch 1: the first landed, the second came back, the third nobody could tell.
	again.event({{"event", "handoff"}, {"batch", b1}, {"landed", 1}, {"returned", {1}}, {"abandoned", {2}}});
	REQUIRE(drive(*c, [&] { return returned.size() == 1; }));
	CHECK(returned[0] == std::pair{raw[1], std::string("b")});
	CHECK_FALSE(is_open(raw[0]));
	CHECK_FALSE(is_open(raw[2]));
	CHECK(c->handoff_pending() == 2);
	// Counts that do not add up are refused, and change nothing.
	again.event({{"event", "handoff"}, {"batch", b2}, {"landed", 1}, {"returned", json::array()}, {"abandoned", {1, 1}}});
	CHECK(error_code_of([&] { drive(*c, [&] { return false; }, Clock::now() + 200ms); }) == EBADMSG);
	CHECK(c->handoff_pending() == 2);
	CHECK(is_open(raw[3]));
	CHECK(is_open(raw[4]));
	const broker::HandoffSummary &s = c->handoff_summary();
	CHECK(s.handed == 5);
	CHECK(s.landed == 1);
	CHECK(s.returned == 1);
	CHECK(s.abandoned == 1);
	::close(returned[0].first);
	for (auto &[fd, state] : received)
		::close(fd);
}

TEST_CASE("brokerd restarts mid-handoff and the next one refuses this worker: the batches in doubt close, as nobody will say where they went")
{
	WorkerEnv w;
	FakeBroker &broker = w.broker;
	std::optional<broker::Client> c = connect_cpp(broker, quick_reconnect());
	std::size_t done = 0;
	c->on_handoff_done([&](const broker::HandoffSummary &) { done++; });
	Fd conn = connection_fd();
	int raw = conn.get();
	broker::Connection one{conn.release(), ""};
	c->handoff(&one, 1);
	auto deadline = Clock::now() + kTimeout;
	REQUIRE(broker.receive(deadline)["method"] == "io.brokerd.Worker.Handoff");
	broker.take_fds();
	broker.go_away();
	REQUIRE(drive(*c, [&] { return c->link() == broker::Link::Lost; }));
	CHECK(is_open(raw));

	FakeBroker again(w.name);
	accept_hello(*c, again);
	again.send({{"error", "io.brokerd.Worker.InvalidToken"}, {"parameters", json::object()}});
	CHECK(error_code_of([&] { drive(*c, [&] { return false; }, Clock::now() + kTimeout); }) != 0);
	CHECK(c->link() == broker::Link::Rejected);
	CHECK_FALSE(is_open(raw));
	CHECK(c->handoff_pending() == 0);
	CHECK(c->handoff_summary().abandoned == 1);
	CHECK(done == 1);
}
