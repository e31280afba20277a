// libbroker-client through its public API only: plain systemd fallback, and Hello/Ready/Status/drain
// against a fake broker speaking NUL-framed JSON over a real socket.
#include <broker/client.h>
#include <broker/client.hpp>

#include "fake_broker.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using namespace broker_test;

namespace {

// The variables the library reads; a child starts from none of them.
const char *const kEnvVars[] = {"BROKER_SOCKET", "BROKER_TOKEN", "BROKER_SERVICE", "BROKER_VERSION",
                                "BROKER_INSTANCE", "BROKER_GENERATION", "LISTEN_FDS", "LISTEN_PID",
                                "LISTEN_FDNAMES", "NOTIFY_SOCKET"};

using Env = std::map<std::string, std::string>;

void set_env(const Env &env)
{
	for (const char *v : kEnvVars)
		::unsetenv(v);
	for (const auto &[k, v] : env)
		::setenv(k.c_str(), v == "$PID" ? std::to_string(::getpid()).c_str() : v.c_str(), 1);
}

// Moves fd to a number >= 64 so that fds 3.. are free to lay out as LISTEN_FDS.
int move_high(int fd)
{
	int high = ::fcntl(fd, F_DUPFD_CLOEXEC, 64);
	::close(fd);
	return high;
}

// A worker in a child process, so that it may own the environment and fds 3 and up.
// `body` runs with `env` set and `listen` placed at fd 3, 4, ...; it returns what it observed,
// which travels back as JSON on a pipe. The parent may act in between (as the broker).
class Worker {
public:
	Worker(Env env, std::vector<int> listen, std::function<json()> body)
	{
		int p[2];
		REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
		pid_ = ::fork();
		REQUIRE(pid_ >= 0);
		if (pid_ == 0) {
			::close(p[0]);
			int out = move_high(p[1]);
			std::vector<int> high;
			for (int fd : listen)
				high.push_back(::fcntl(fd, F_DUPFD_CLOEXEC, 64));
			for (std::size_t i = 0; i < high.size(); i++) {
				::dup2(high[i], 3 + static_cast<int>(i));
				::close(high[i]);
			}
			set_env(env);
			json result;
			try {
				result = body();
			} catch (const broker::Error &e) {
				result = {{"uncaught", e.what()}, {"code", e.code()}};
			} catch (const std::exception &e) {
				result = {{"uncaught", e.what()}};
			}
			std::string data = result.dump();
			const char *p = data.data();
			std::size_t left = data.size();
			while (left > 0) {
				ssize_t n = ::write(out, p, left);
				if (n <= 0)
					::_exit(2);
				p += n;
				left -= static_cast<std::size_t>(n);
			}
			::_exit(0);
		}
		::close(p[1]);
		out_ = Fd(p[0]);
	}

	~Worker()
	{
		if (pid_ > 0) {
			::kill(pid_, SIGKILL);
			::waitpid(pid_, nullptr, 0);
		}
	}

	// What the child observed, once it has exited; null if it did not in time. Only the child
	// holds the pipe's write end, so end of file means it is exiting and waitpid() returns soon.
	json result()
	{
		auto deadline = Clock::now() + kTimeout;
		std::string data;
		for (;;) {
			if (!wait_for(out_.get(), POLLIN, deadline))
				return nullptr;
			char buf[4096];
			ssize_t n = ::read(out_.get(), buf, sizeof(buf));
			if (n < 0)
				return nullptr;
			if (n == 0)
				break;
			data.append(buf, static_cast<std::size_t>(n));
		}
		int status = 0;
		REQUIRE(::waitpid(pid_, &status, 0) == pid_);
		pid_ = -1;
		CHECK(WIFEXITED(status));
		CHECK(WEXITSTATUS(status) == 0);
		return data.empty() ? json() : json::parse(data);
	}

private:
	pid_t pid_ = -1;
	Fd out_;
};

bool is_open(int fd)
{
	return ::fcntl(fd, F_GETFD) >= 0;
}

bool is_cloexec(int fd)
{
	int flags = ::fcntl(fd, F_GETFD);
	return flags >= 0 && (flags & FD_CLOEXEC);
}

json error_json(const broker::Error &e)
{
	return {{"code", e.code()}, {"varlink_error", e.varlink_error()}, {"what", e.what()}};
}

std::uint64_t monotonic_usec()
{
	timespec ts{};
	::clock_gettime(CLOCK_MONOTONIC, &ts);
	return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u + static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

// A drain request's deadline, in microseconds after two moments: the start of the process()
// call that handed it over ("from_call"), and the handler's own start ("from_handler"). The
// library sets it as it reads the event, in between, so a timeout_ms of T gives
// from_call >= T * 1000 >= from_handler however slow the machine is.
json drain_seen(std::int64_t deadline_us, std::int64_t called_us, std::int64_t now_us)
{
	return {{"from_call", deadline_us - called_us}, {"from_handler", deadline_us - now_us}};
}

std::int64_t usec_of(Clock::time_point t)
{
	return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
}

// Runs the worker's event loop, the way a worker would, until the broker goes away. Records the
// drain requests (see drain_seen()) and the error that ended the loop.
json cpp_event_loop(broker::Client &c)
{
	json out = {{"drains", json::array()}};
	Clock::time_point called;
	c.on_drain([&](const broker::DrainRequest &req) {
		out["drains"].push_back(drain_seen(usec_of(req.deadline), usec_of(called), usec_of(Clock::now())));
	});
	auto deadline = Clock::now() + kTimeout;
	try {
		while (Clock::now() < deadline) {
			out["timeout_is_none"] = c.timeout() == UINT64_MAX;
			if (!wait_for(c.fd(), c.events(), deadline))
				break;
			for (called = Clock::now(); c.process(); called = Clock::now()) {
			}
		}
		out["ended"] = "deadline";
	} catch (const broker::Error &e) {
		out["ended"] = error_json(e);
	}
	return out;
}

json c_event_loop(broker_client *c)
{
	struct Seen {
		json drains = json::array();
		broker_client *client;
		std::uint64_t called_usec = 0; // when the current broker_client_process() began
	} seen{json::array(), c};
	int r = broker_client_set_drain_handler(
	        c,
	        [](broker_client *client, uint64_t deadline_usec, void *userdata) {
		        auto *s = static_cast<Seen *>(userdata);
		        if (client != s->client)
			        s->drains.push_back("wrong client");
		        s->drains.push_back(drain_seen(static_cast<std::int64_t>(deadline_usec),
		                                       static_cast<std::int64_t>(s->called_usec),
		                                       static_cast<std::int64_t>(monotonic_usec())));
	        },
	        &seen);
	json out = {{"set_handler", r}};
	auto deadline = Clock::now() + kTimeout;
	int ended = 0;
	while (Clock::now() < deadline && ended == 0) {
		if (!wait_for(broker_client_fd(c), static_cast<short>(broker_client_events(c)), deadline))
			break;
		for (seen.called_usec = monotonic_usec(); (r = broker_client_process(c)) > 0;
		     seen.called_usec = monotonic_usec()) {
		}
		if (r < 0)
			ended = r;
	}
	out["drains"] = seen.drains;
	out["ended"] = {{"code", -ended}};
	return out;
}

} // namespace

TEST_CASE("plain systemd: listeners from LISTEN_FDS, C++ and C")
{
	int a[2], b[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0);
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) == 0);
	Fd a0(a[0]), a1(a[1]), b0(b[0]), b1(b[1]);
	std::string notify_name = abstract_name("notify");
	Fd notify = bind_abstract(SOCK_DGRAM, notify_name);

	Env env = {{"LISTEN_FDS", "2"}, {"LISTEN_PID", "$PID"}, {"LISTEN_FDNAMES", "x:y"}, {"NOTIFY_SOCKET", notify_name}};
	Worker w(env, {a1.get(), b1.get()}, [] {
		json out;
		{
			broker::Client c = broker::Client::from_env();
			out["brokered"] = c.brokered();
			out["generation"] = c.generation();
			out["service"] = c.service();
			out["fd"] = c.fd();
			out["events"] = c.events();
			out["process"] = c.process();
			for (const broker::Listener &l : c.listeners())
				out["listeners"].push_back({l.name, l.fd});
			out["x"] = c.listener("x");
			out["y"] = c.listener("y");
			try {
				c.listener("z");
			} catch (const broker::Error &e) {
				out["z"] = error_json(e);
			}
			c.ready();
			c.status("serving plainly");
			try {
				c.status("two\nlines");
			} catch (const broker::Error &e) {
				out["two_lines"] = error_json(e);
			}
			try {
				c.status("\x1B[31mred");
			} catch (const broker::Error &e) {
				out["escape"] = error_json(e);
			}
			broker::Client moved = std::move(c);
			out["moved_x"] = moved.listener("x");
		}
		// The sockets belong to the process, not to the Client, and the environment stays.
		out["open_after"] = is_open(3) && is_open(4);
		out["env_kept"] = std::getenv("LISTEN_FDS") != nullptr;

		broker_client *c = nullptr;
		out["c"]["from_env"] = broker_client_from_env(&c);
		if (!c)
			return out;
		json &o = out["c"];
		o["brokered"] = broker_client_brokered(c);
		o["count"] = broker_client_listener_count(c);
		o["names"] = {broker_client_listener_name(c, 0), broker_client_listener_name(c, 1)};
		o["fds"] = {broker_client_listener_fd(c, 0), broker_client_listener_fd(c, 1)};
		o["name_out_of_range"] = broker_client_listener_name(c, 2) == nullptr;
		o["fd_out_of_range"] = broker_client_listener_fd(c, 2);
		o["y"] = broker_client_listener(c, "y");
		o["z"] = broker_client_listener(c, "z");
		o["null_name"] = broker_client_listener(c, nullptr);
		o["fd"] = broker_client_fd(c);
		o["service"] = broker_client_service(c);
		o["generation"] = broker_client_generation(c);
		o["timeout_is_none"] = broker_client_timeout(c) == UINT64_MAX;
		o["process"] = broker_client_process(c);
		o["ready"] = broker_client_ready(c);
		o["null_status"] = broker_client_status(c, nullptr);
		broker_client_free(c);
		o["null_ret"] = broker_client_from_env(nullptr);
		o["null_client"] = {broker_client_ready(nullptr), broker_client_process(nullptr),
		                    broker_client_listener(nullptr, "x"), broker_client_brokered(nullptr)};
		broker_client_free(nullptr);
		o["open_after"] = is_open(3) && is_open(4);
		return out;
	});

	// sd_notify() reaches NOTIFY_SOCKET: READY=1 and STATUS= from C++, READY=1 from C.
	auto deadline = Clock::now() + kTimeout;
	std::vector<std::string> notes;
	while (notes.size() < 3 && wait_for(notify.get(), POLLIN, deadline)) {
		char buf[4096];
		ssize_t n = ::recv(notify.get(), buf, sizeof(buf), 0);
		REQUIRE(n >= 0);
		notes.emplace_back(buf, static_cast<std::size_t>(n));
	}
	CHECK(notes == std::vector<std::string>{"READY=1", "STATUS=serving plainly", "READY=1"});

	json r = w.result();
	INFO(r.dump());
	REQUIRE(r.is_object());
	CHECK(r["brokered"] == false);
	CHECK(r["generation"] == 0);
	CHECK(r["service"] == "");
	CHECK(r["fd"] == -1);
	CHECK(r["events"] == 0);
	CHECK(r["process"] == false);
	CHECK(r["listeners"] == json::parse(R"([["x", 3], ["y", 4]])"));
	CHECK(r["x"] == 3);
	CHECK(r["y"] == 4);
	CHECK(r["z"]["code"] == ENOENT);
	CHECK(r["two_lines"]["code"] == EINVAL);
	CHECK(r["escape"]["code"] == EINVAL);
	CHECK(r["moved_x"] == 3);
	CHECK(r["open_after"] == true);
	CHECK(r["env_kept"] == true);

	json &c = r["c"];
	CHECK(c["from_env"] == 0);
	CHECK(c["brokered"] == 0);
	CHECK(c["count"] == 2);
	CHECK(c["names"] == json::parse(R"(["x", "y"])"));
	CHECK(c["fds"] == json::parse("[3, 4]"));
	CHECK(c["name_out_of_range"] == true);
	CHECK(c["fd_out_of_range"] == -EINVAL);
	CHECK(c["y"] == 4);
	CHECK(c["z"] == -ENOENT);
	CHECK(c["null_name"] == -EINVAL);
	CHECK(c["fd"] == -1);
	CHECK(c["service"] == "");
	CHECK(c["generation"] == 0);
	CHECK(c["timeout_is_none"] == true);
	CHECK(c["process"] == 0);
	CHECK(c["ready"] == 0);
	CHECK(c["null_status"] == -EINVAL);
	CHECK(c["null_ret"] == -EINVAL);
	CHECK(c["null_client"] == json::array({-EINVAL, -EINVAL, -EINVAL, -EINVAL}));
	CHECK(c["open_after"] == true);
}

TEST_CASE("no broker and no LISTEN_FDS: ENXIO")
{
	struct Case {
		const char *what;
		Env env;
	};
	const Case cases[] = {
	        {"empty environment", {}},
	        {"LISTEN_FDS of another process", {{"LISTEN_FDS", "1"}, {"LISTEN_PID", "1"}}},
	        {"empty BROKER_SOCKET", {{"BROKER_SOCKET", ""}}},
	};
	for (const Case &tc : cases) {
		std::string what = tc.what;
		CAPTURE(what);
		Worker w(tc.env, {}, [] {
			json out;
			try {
				broker::Client::from_env();
				out["cpp"] = "no error";
			} catch (const broker::Error &e) {
				out["cpp"] = error_json(e);
			}
			broker_client *c = reinterpret_cast<broker_client *>(&out);
			out["c"] = broker_client_from_env(&c);
			out["c_null"] = c == nullptr;
			return out;
		});
		json r = w.result();
		INFO(r.dump());
		REQUIRE(r.is_object());
		CHECK(r["cpp"]["code"] == ENXIO);
		CHECK(r["c"] == -ENXIO);
		CHECK(r["c_null"] == true);
	}
}

TEST_CASE("brokered: Hello, fds, Ready, Status, drain, end of stream")
{
	struct Case {
		const char *api;  // which API the worker uses
		bool inherited;   // sockets at fd 3 via LISTEN_FDS (spawned by brokerd) or with the reply
	};
	const Case cases[] = {{"cpp", false}, {"c", false}, {"cpp", true}, {"c", true}};

	for (const Case &tc : cases) {
		std::string api = tc.api;
		CAPTURE(api);
		CAPTURE(tc.inherited);
		std::string name = abstract_name("broker");
		FakeBroker broker(name);

		// A real listening socket with one connection already queued: the worker accepts it
		// from whichever fd it got, which proves the fd is the listener, and answers on it.
		std::string listen_name = abstract_name("http");
		Fd http = bind_abstract(SOCK_STREAM, listen_name);
		Fd visitor = connect_abstract(listen_name);

		Env env = {{"BROKER_SOCKET", name}, {"BROKER_TOKEN", "sesame"}, {"BROKER_SERVICE", "web"},
		           {"BROKER_INSTANCE", "web/2/0"}, {"BROKER_GENERATION", "2"}};
		std::vector<int> listen;
		if (tc.inherited) {
			env.insert({{"LISTEN_FDS", "1"}, {"LISTEN_PID", "$PID"}, {"LISTEN_FDNAMES", "http"}});
			listen.push_back(http.get());
		}
		Worker w(env, listen, [api] {
			json out;
			if (api == "cpp") {
				int fd;
				{
					broker::Client c = broker::Client::from_env();
					out["brokered"] = c.brokered();
					out["service"] = c.service();
					out["instance"] = c.instance();
					out["generation"] = c.generation();
					out["fd_cloexec"] = is_cloexec(c.fd());
					fd = c.listener("http");
					out["listener_cloexec"] = is_cloexec(fd);
					int conn = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
					out["accepted"] = conn >= 0 && ::write(conn, "hi", 2) == 2;
					::close(conn);
					c.ready();
					c.status("serving");
					out["loop"] = cpp_event_loop(c);
				}
				out["listener_open_after"] = is_open(fd);
			} else {
				broker_client *c = nullptr;
				out["from_env"] = broker_client_from_env(&c);
				if (!c)
					return out;
				out["brokered"] = broker_client_brokered(c) == 1;
				out["service"] = broker_client_service(c);
				out["instance"] = broker_client_instance(c);
				out["generation"] = broker_client_generation(c);
				out["fd_cloexec"] = is_cloexec(broker_client_fd(c));
				int fd = broker_client_listener(c, "http");
				out["listener_cloexec"] = is_cloexec(fd);
				int conn = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
				out["accepted"] = conn >= 0 && ::write(conn, "hi", 2) == 2;
				::close(conn);
				out["ready"] = broker_client_ready(c);
				out["status"] = broker_client_status(c, "serving");
				out["loop"] = c_event_loop(c);
				broker_client_free(c);
				out["listener_open_after"] = is_open(fd);
			}
			return out;
		});

		auto deadline = Clock::now() + kTimeout;
		REQUIRE(broker.accept(deadline));
		json hello = broker.receive(deadline);
		INFO(hello.dump());
		CHECK(hello["method"] == "io.brokerd.Worker.Hello");
		CHECK(hello["parameters"]["token"] == "sesame");
		CHECK(hello["parameters"]["want_fds"] == !tc.inherited);
		CHECK_FALSE(hello["parameters"].contains("service"));
		CHECK_FALSE(hello.contains("oneway"));

		json socket = {{"name", "http"}, {"address", "unix:@" + listen_name.substr(1)}, {"kind", "stream"}};
		if (!tc.inherited)
			socket["fd"] = 0;
		json reply = {{"parameters",
		               {{"service", "web"}, {"instance", "web/2/0"}, {"generation", 2}, {"sockets", {socket}}}}};
		if (tc.inherited)
			broker.send(reply);
		else
			broker.send(reply, {http.get()});
		// The worker owns its copy now; ours must not keep the listener alive past the test.
		http.reset();

		json events = broker.receive(deadline);
		CHECK(events["method"] == "io.brokerd.Worker.Events");
		CHECK(events["more"] == true);
		json ready = broker.receive(deadline);
		CHECK(ready["method"] == "io.brokerd.Worker.Ready");
		CHECK(ready["oneway"] == true);
		json status = broker.receive(deadline);
		CHECK(status["method"] == "io.brokerd.Worker.Status");
		CHECK(status["oneway"] == true);
		CHECK(status["parameters"]["text"] == "serving");

		char buf[8] = {};
		REQUIRE(wait_for(visitor.get(), POLLIN, deadline));
		CHECK(::recv(visitor.get(), buf, sizeof(buf), 0) == 2);
		CHECK(std::string(buf) == "hi");

		// An event from a newer broker is skipped; drain reaches the handler; then the broker
		// goes away, which ends the loop with ECONNRESET.
		broker.send({{"parameters", {{"event", "rebalance"}}}, {"continues", true}});
		broker.send({{"parameters", {{"event", "drain"}, {"timeout_ms", 5000}}}, {"continues", true}});
		broker.close();

		json r = w.result();
		INFO(r.dump());
		REQUIRE(r.is_object());
		CHECK(r["brokered"] == true);
		CHECK(r["service"] == "web");
		CHECK(r["instance"] == "web/2/0");
		CHECK(r["generation"] == 2);
		CHECK(r["fd_cloexec"] == true);
		CHECK(r["listener_cloexec"] == true);
		CHECK(r["accepted"] == true);
		if (api == "c") {
			CHECK(r["from_env"] == 0);
			CHECK(r["ready"] == 0);
			CHECK(r["status"] == 0);
			CHECK(r["loop"]["set_handler"] == 0);
		}
		// The deadline is the event's timeout_ms after the moment the library read it.
		json &drains = r["loop"]["drains"];
		REQUIRE(drains.size() == 1);
		REQUIRE(drains[0].is_object());
		CHECK(drains[0]["from_call"].get<long long>() >= 5'000'000);
		CHECK(drains[0]["from_handler"].get<long long>() <= 5'000'000);
		CHECK(r["loop"]["ended"]["code"] == ECONNRESET);
		// Received fds are the Client's and close with it; inherited ones belong to the process.
		CHECK(r["listener_open_after"] == tc.inherited);
	}
}

TEST_CASE("brokered: Hello refused or answered badly, and registration by service")
{
	struct Case {
		const char *what;
		Env env;
		json expect; // the Hello parameters the broker must see
		json reply;
		const char *error; // the Varlink error name the worker sees, if any
		int code;
	};
	const json web = {{"service", "web"}, {"instance", "web/1/0"}, {"generation", 1}};
	json fdless = web;
	fdless["sockets"] = json::parse(R"([{"name": "http", "address": "tcp://[::]:80", "kind": "stream"}])");
	const Case cases[] = {
	        {"token refused", {{"BROKER_TOKEN", "wrong"}}, {{"token", "wrong"}, {"want_fds", true}},
	         {{"error", "io.brokerd.Worker.InvalidToken"}, {"parameters", json::object()}},
	         "io.brokerd.Worker.InvalidToken", EREMOTEIO},
	        {"external worker not allowed",
	         {{"BROKER_SERVICE", "web"}, {"BROKER_VERSION", "2.1"}},
	         {{"service", "web"}, {"version", "2.1"}, {"want_fds", true}},
	         {{"error", "org.varlink.service.PermissionDenied"}, {"parameters", json::object()}},
	         "org.varlink.service.PermissionDenied", EACCES},
	        {"reply without sockets", {{"BROKER_TOKEN", "t"}}, {{"token", "t"}, {"want_fds", true}},
	         {{"parameters", web}}, "", EBADMSG},
	        {"socket without its fd", {{"BROKER_TOKEN", "t"}}, {{"token", "t"}, {"want_fds", true}},
	         {{"parameters", fdless}}, "", EBADMSG},
	};
	for (const Case &tc : cases) {
		std::string what = tc.what;
		CAPTURE(what);
		std::string name = abstract_name("broker");
		FakeBroker broker(name);
		Env env = tc.env;
		env["BROKER_SOCKET"] = name;
		Worker w(env, {}, [] {
			json out;
			try {
				broker::Client::from_env();
				out["cpp"] = "no error";
			} catch (const broker::Error &e) {
				out["cpp"] = error_json(e);
			}
			broker_client *c = nullptr;
			out["c"] = broker_client_from_env(&c);
			return out;
		});
		auto deadline = Clock::now() + kTimeout;
		for (int i = 0; i < 2; i++) { // once for C++, once for C
			REQUIRE(broker.accept(deadline));
			json hello = broker.receive(deadline);
			CHECK(hello["method"] == "io.brokerd.Worker.Hello");
			CHECK(hello["parameters"] == tc.expect);
			broker.send(tc.reply);
			broker.close();
		}
		json r = w.result();
		INFO(r.dump());
		REQUIRE(r.is_object());
		CHECK(r["cpp"]["varlink_error"] == tc.error);
		CHECK(r["cpp"]["code"] == tc.code);
		CHECK(r["c"] == -tc.code);
	}
}

TEST_CASE("brokered: a slow broker never blocks the worker")
{
	constexpr int kStatuses = 2000; // about 1 MB: far more than a socket buffer holds
	std::string name = abstract_name("broker");
	FakeBroker broker(name);
	int sync[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sync) == 0);
	Fd sync0(sync[0]), sync1(sync[1]);

	Worker w({{"BROKER_SOCKET", name}, {"BROKER_TOKEN", "t"}}, {sync1.get()}, [] {
		json out;
		broker::Client c = broker::Client::from_env();
		for (int i = 0; i < kStatuses; i++)
			c.status(std::to_string(i) + std::string(500, '.'));
		out["queued_pollout"] = (c.events() & POLLOUT) != 0;
		// Tell the broker to start reading (fd 3 is the sync socket), then flush from the loop.
		out["told"] = ::write(3, "!", 1) == 1;
		auto deadline = Clock::now() + kTimeout;
		while (c.events() & POLLOUT) {
			if (!wait_for(c.fd(), c.events(), deadline))
				break;
			c.process();
		}
		out["events_after"] = c.events();
		return out;
	});

	auto deadline = Clock::now() + kTimeout;
	REQUIRE(broker.accept(deadline));
	CHECK(broker.receive(deadline)["method"] == "io.brokerd.Worker.Hello");
	broker.send({{"parameters", {{"service", "web"}, {"instance", "web/1/0"}, {"generation", 1},
	                             {"sockets", json::array()}}}});
	REQUIRE(wait_for(sync0.get(), POLLIN, deadline));
	CHECK(broker.receive(deadline)["method"] == "io.brokerd.Worker.Events");
	int in_order = 0;
	for (int i = 0; i < kStatuses; i++) {
		json m = broker.receive(deadline);
		std::string text = std::to_string(i) + std::string(500, '.');
		if (m["method"] == "io.brokerd.Worker.Status" && m["parameters"]["text"] == text)
			in_order++;
	}
	CHECK(in_order == kStatuses);

	json r = w.result();
	INFO(r.dump());
	REQUIRE(r.is_object());
	CHECK(r["queued_pollout"] == true);
	CHECK(r["told"] == true);
	CHECK(r["events_after"] == POLLIN);
}

TEST_CASE("brokered: no broker listening")
{
	Worker w({{"BROKER_SOCKET", abstract_name("nobody")}, {"BROKER_TOKEN", "t"}}, {}, [] {
		broker_client *c = nullptr;
		return json{{"c", broker_client_from_env(&c)}};
	});
	json r = w.result();
	REQUIRE(r.is_object());
	CHECK(r["c"] == -ECONNREFUSED);
}
