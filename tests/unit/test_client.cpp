// libbroker-client through its public API only: plain systemd fallback, and Hello/Ready/Status/drain
// against a fake broker speaking NUL-framed JSON over a real socket.
#include <broker/client.h>
#include <broker/client.hpp>

#include "fake_broker.hpp"

#include "../skip.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
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
		CHECK_MESSAGE(WIFEXITED(status), "the worker was killed by signal ", WTERMSIG(status),
		              std::string(WTERMSIG(status) == SIGSYS ? " (SIGSYS: it started a thread or a process)" : ""));
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

// Runs the worker's event loop until process() throws, as it does once the broker is gone: the
// error's code, or 0 when the deadline passed first.
int cpp_event_loop_until_error(broker::Client &c)
{
	auto deadline = Clock::now() + kTimeout;
	try {
		while (wait_for(c.fd(), c.events(), deadline))
			while (c.process()) {
			}
	} catch (const broker::Error &e) {
		return e.code();
	}
	return 0;
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

// Every place a library could speak without being asked, watched in a worker's child for one life
// of the library: stdout and stderr go to a memfd; in a mount namespace of the child's own,
// /dev/log and the journal's socket are sockets the child reads, and the console, the kernel log
// and the tty are empty files; a seccomp filter kills the child (SIGSYS) if anything clones, so a
// thread that comes and goes is caught too; checkpoint() counts the threads there are.
class Traps {
public:
	// Sets them all, or returns what failed (the life is not run then).
	std::string set()
	{
		std::fflush(nullptr); // the parent's buffered output, inherited, is not the library's
		if (::unshare(CLONE_NEWNS) < 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) < 0)
			return std::string("mount namespace: ") + std::strerror(errno);
		for (const char *dir : {"/dev", "/run"})
			if (::mount("tmpfs", dir, "tmpfs", 0, "mode=0755") < 0)
				return std::string("tmpfs on ") + dir + ": " + std::strerror(errno);
		::mkdir("/run/systemd", 0755);
		::mkdir("/run/systemd/journal", 0755);
		for (const char *path : {"/dev/log", "/run/systemd/journal/socket"}) {
			Fd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
			sockaddr_un sa{};
			sa.sun_family = AF_UNIX;
			std::strcpy(sa.sun_path, path);
			if (::bind(s.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) < 0)
				return std::string("bind ") + path + ": " + std::strerror(errno);
			sockets_.emplace_back(path, std::move(s));
		}
		for (const char *path : {"/dev/console", "/dev/kmsg", "/dev/tty"})
			if (Fd(::open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0666)).get() < 0)
				return std::string("create ") + path + ": " + std::strerror(errno);
		output_ = Fd(::memfd_create("output", MFD_CLOEXEC));
		if (output_.get() < 0 || ::dup2(output_.get(), 1) < 0 || ::dup2(output_.get(), 2) < 0)
			return std::string("memfd: ") + std::strerror(errno);
		sock_filter filter[] = {
		        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
		        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 3, 0),
		        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 2, 0),
#ifdef __NR_vfork
		        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_vfork, 1, 0),
#else
		        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 1, 0),
#endif
		        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		};
		sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
		if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
			return std::string("seccomp: ") + std::strerror(errno);
		return {};
	}

	static int threads()
	{
		int n = 0;
		for ([[maybe_unused]] const auto &e : std::filesystem::directory_iterator("/proc/self/task"))
			n++;
		return n;
	}
	void checkpoint() { threads_.push_back(threads()); }

	// What each trap caught, as text; empty where nothing came.
	json caught()
	{
		std::fflush(nullptr);
		json out = {{"threads", threads_}};
		out["stdout and stderr"] = contents(output_.get());
		for (const auto &[path, s] : sockets_) {
			std::string got;
			char buf[4096];
			for (ssize_t n; (n = ::recv(s.get(), buf, sizeof buf, 0)) >= 0;)
				got += std::string(buf, static_cast<std::size_t>(n)) + "\n";
			out[path] = got;
		}
		for (const char *path : {"/dev/console", "/dev/kmsg", "/dev/tty"})
			out[path] = contents(Fd(::open(path, O_RDONLY | O_CLOEXEC)).get());
		return out;
	}

private:
	static std::string contents(int fd)
	{
		std::string out;
		char buf[4096];
		for (ssize_t n; (n = ::pread(fd, buf, sizeof buf, static_cast<off_t>(out.size()))) > 0;)
			out.append(buf, static_cast<std::size_t>(n));
		return out;
	}

	std::vector<std::pair<std::string, Fd>> sockets_;
	Fd output_;
	std::vector<int> threads_;
};

// Runs `life` under Traps in a worker's child and returns {"life": what it returned, "caught": ...}.
json trapped(const std::function<json(Traps &)> &life)
{
	Traps traps;
	if (std::string why = traps.set(); !why.empty())
		return {{"traps", why}};
	json out;
	try {
		out["life"] = life(traps);
	} catch (const broker::Error &e) {
		out["life"] = {{"uncaught", error_json(e)}};
	}
	out["caught"] = traps.caught();
	return out;
}

// What Traps must have seen after `checkpoints` checkpoints: one thread at each, nothing said.
void check_silent(const json &r, std::size_t checkpoints)
{
	REQUIRE(r.is_object());
	REQUIRE(r.value("traps", "") == "");
	const json &caught = r["caught"];
	CHECK(caught["threads"] == std::vector<int>(checkpoints, 1));
	for (std::string trap : {"stdout and stderr", "/dev/log", "/run/systemd/journal/socket", "/dev/console", "/dev/kmsg", "/dev/tty"}) {
		CAPTURE(trap);
		CHECK(caught[trap] == "");
	}
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
					broker::Client c = broker::Client::from_env(broker::ClientOptions{.reconnect = false});
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
				out["from_env"] = broker_client_from_env_with_flags(&c, BROKER_CLIENT_NO_RECONNECT);
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
		// goes away, which ends the loop with ECONNRESET (reconnect is off).
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

TEST_CASE("the library starts no thread and never writes to stdout, stderr, syslog, the journal or the console")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root for a mount namespace of its own (unshare CLONE_NEWNS)");
	// A brokered life: Hello with fds, Ready, Status, refusals, connections handed to it, a drain
	// on which it hands three on (two land, one comes back), an unknown event, end of stream.
	std::string name = abstract_name("broker");
	FakeBroker broker(name);
	std::string listen_name = abstract_name("http");
	Fd http = bind_abstract(SOCK_STREAM, listen_name);
	int a[2], b[2], c[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0);
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) == 0);
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, c) == 0);
	Fd a0(a[0]), a1(a[1]), b0(b[0]), b1(b[1]), c0(c[0]), c1(c[1]);
	// Its own connections to hand off, at fds 3, 4 and 5.
	Worker w({{"BROKER_SOCKET", name}, {"BROKER_TOKEN", "t"}}, {a1.get(), b1.get(), c1.get()}, [] {
		return trapped([](Traps &traps) {
			json out = {{"errors", json::array()}, {"connections", json::array()}, {"returned", json::array()}};
			broker::ClientOptions options;
			options.accept_handoff = true;
			options.reconnect = false; // the loop ends when brokerd does
			broker::Client cl = broker::Client::from_env(options);
			traps.checkpoint();
			out["listener"] = cl.listener("http") >= 0;
			auto refused = [&](const std::function<void()> &call) {
				try {
					call();
					out["errors"].push_back(0);
				} catch (const broker::Error &e) {
					out["errors"].push_back(e.code());
				}
			};
			refused([&] { cl.listener("nope"); });
			cl.ready();
			cl.status("serving");
			refused([&] { cl.status("two\nlines"); });
			refused([&] {
				broker::Connection closed{63, "x"};
				cl.handoff(&closed, 1);
			});
			cl.on_connection([&](int fd, std::string state) {
				traps.checkpoint();
				out["connections"].push_back(state);
				::close(fd);
			});
			cl.on_returned([&](int fd, std::string state) {
				out["returned"].push_back({fd, state});
				::close(fd);
			});
			cl.on_handoff_done([&](const broker::HandoffSummary &s) {
				traps.checkpoint();
				out["done"] = {s.handed, s.landed, s.returned, s.abandoned};
			});
			cl.on_drain([&](const broker::DrainRequest &) {
				traps.checkpoint();
				broker::Connection mine[] = {{3, "one"}, {4, "two"}, {5, ""}};
				cl.handoff(mine, 3);
			});
			out["loop"] = cpp_event_loop_until_error(cl);
			traps.checkpoint();
			return out;
		});
	});

	auto deadline = Clock::now() + kTimeout;
	REQUIRE(broker.accept(deadline));
	json hello = broker.receive(deadline);
	CHECK(hello["parameters"]["accept_handoff"] == true);
	broker.send({{"parameters", {{"service", "web"}, {"instance", "web/2/0"}, {"generation", 2},
	                             {"sockets", {{{"name", "http"}, {"address", "unix:@" + listen_name.substr(1)}, {"kind", "stream"}, {"fd", 0}}}}}}},
	            {http.get()});
	CHECK(broker.receive(deadline)["method"] == "io.brokerd.Worker.Events");
	CHECK(broker.receive(deadline)["method"] == "io.brokerd.Worker.Ready");
	CHECK(broker.receive(deadline)["method"] == "io.brokerd.Worker.Status");
	// Two connections for it, one with state ("abc"), and their acknowledgement.
	int d[2], e[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, d) == 0);
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, e) == 0);
	Fd d0(d[0]), d1(d[1]), e0(e[0]), e1(e[1]);
	broker.event({{"event", "connections"}, {"batch", 7}, {"connections", {{{"fd", 0}, {"state", "YWJj"}}, {{"fd", 1}}}}},
	             {d1.get(), e1.get()});
	json received = broker.receive(deadline);
	CHECK(received["method"] == "io.brokerd.Worker.Received");
	CHECK(received["parameters"] == json{{"batch", 7}});
	// Drained, it hands its three on: the third comes back.
	broker.event({{"event", "drain"}, {"timeout_ms", 5000}});
	json handoff = broker.receive(deadline);
	CHECK(handoff["method"] == "io.brokerd.Worker.Handoff");
	CHECK(broker.take_fds().size() == 3);
	broker.event({{"event", "handoff"}, {"batch", handoff["parameters"]["batch"]}, {"landed", 2}, {"returned", {2}}});
	broker.event({{"event", "rebalance"}});
	// End of stream: the worker reads what is buffered first.
	broker.close();

	json r = w.result();
	INFO(r.dump());
	check_silent(r, 6);
	const json &life = r["life"];
	CHECK(life["listener"] == true);
	CHECK(life["errors"] == json{ENOENT, EINVAL, EBADF});
	CHECK(life["connections"] == json{"abc", ""});
	CHECK(life["returned"] == json{{5, ""}});
	CHECK(life["done"] == json{3, 2, 1, 0});
	CHECK(life["loop"] == ECONNRESET);
}

TEST_CASE("the library starts no thread and never writes to stdout, stderr or syslog under plain systemd")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root for a mount namespace of its own (unshare CLONE_NEWNS)");
	int a[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0);
	Fd a0(a[0]), a1(a[1]);
	std::string notify_name = abstract_name("notify");
	Fd notify = bind_abstract(SOCK_DGRAM, notify_name);
	Env env = {{"LISTEN_FDS", "1"}, {"LISTEN_PID", "$PID"}, {"LISTEN_FDNAMES", "x"}, {"NOTIFY_SOCKET", notify_name}};
	Worker w(env, {a1.get()}, [] {
		return trapped([](Traps &traps) {
			json out = {{"errors", json::array()}};
			{
				broker::Client cl = broker::Client::from_env();
				traps.checkpoint();
				cl.ready();
				cl.status("serving");
				for (const std::function<void()> &call : std::vector<std::function<void()>>{
				             [&] { cl.listener("nope"); }, [&] { cl.status("\x1B[31mred"); },
				             [&] {
					             broker::Connection mine{3, ""};
					             cl.handoff(&mine, 1);
				             }}) {
					try {
						call();
						out["errors"].push_back(0);
					} catch (const broker::Error &e) {
						out["errors"].push_back(e.code());
					}
				}
				out["process"] = cl.process();
			}
			broker_client *c = nullptr;
			out["c"] = {broker_client_from_env(&c), broker_client_ready(c), broker_client_status(c, "two\nlines"),
			            broker_client_listener(c, "nope")};
			broker_client_free(c);
			traps.checkpoint();
			return out;
		});
	});
	json r = w.result();
	INFO(r.dump());
	check_silent(r, 2);
	CHECK(r["life"]["errors"] == json{ENOENT, EINVAL, ENOTCONN});
	CHECK(r["life"]["process"] == false);
	CHECK(r["life"]["c"] == json{0, 0, -EINVAL, -ENOENT});
}
