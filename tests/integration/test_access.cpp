// Integration: who may do what on the control socket (the tiers of control.admin_* and read_*,
// by user and by group), root's own choice of binary, and the limits every caller meets: all
// connections, message size, time before Hello, replies it does not read.
#include "harness.hpp"
#include "../skip.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>

using namespace itest;
using proto::varlink::SyncClient;
namespace vl = proto::varlink;

namespace {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;
// Debian's base-passwd users, each with its own group of the same id.
constexpr uid_t kDaemon = 1, kBin = 2, kSys = 3;

// A group made with groupadd for one test, removed with groupdel at its end.
class ScratchGroup {
public:
	explicit ScratchGroup(const std::string &suffix)
		: name_("brokerd-itest-" + std::to_string(::getpid()) + "-" + suffix)
	{
		RunResult r = run({"groupadd", name_});
		REQUIRE_MESSAGE(r.exit_code == 0, "groupadd ", name_, ": ", r.describe());
		const group *g = ::getgrnam(name_.c_str());
		REQUIRE(g != nullptr);
		gid_ = g->gr_gid;
	}
	~ScratchGroup()
	{
		RunResult r = run({"groupdel", name_});
		if (r.exit_code != 0)
			MESSAGE("groupdel ", name_, ": ", r.describe());
	}
	ScratchGroup(const ScratchGroup &) = delete;
	ScratchGroup &operator=(const ScratchGroup &) = delete;

	const std::string &name() const { return name_; }
	gid_t gid() const { return gid_; }

private:
	std::string name_;
	gid_t gid_ = 0;
};

// Who a client child runs as.
struct Identity {
	uid_t uid;
	gid_t gid;
	std::vector<gid_t> groups; // supplementary
};

// Runs `fn` in a child as `who`, its stdout and stderr into files of the broker's directory
// (opened by the test, so that any user writes them).
Process run_as(const Broker &b, const Identity &who, const std::string &name, const std::function<int()> &fn)
{
	SpawnOptions so;
	so.stdout_path = b.path(name + ".out");
	so.stderr_path = b.path(name + ".err");
	std::fflush(nullptr); // the child's copy of doctest's buffered output would go to its stdout
	return Process::fork_run(
		[who, fn] {
			if (::setgroups(who.groups.size(), who.groups.data()) < 0 || ::setgid(who.gid) < 0 ||
			    ::setuid(who.uid) < 0) {
				std::perror("switching user");
				return 99;
			}
			return fn();
		},
		so);
}

// The child's exit code, or -1 when it was killed or did not exit within `timeout`.
int exit_code(Process &p, std::chrono::milliseconds timeout = 30s)
{
	auto st = p.wait(timeout);
	if (!st) {
		p.kill();
		return -1;
	}
	return WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
}

// A call on `c`: "ok", or the error's name (with its message after a colon, if any).
std::string outcome(SyncClient &c, const std::string &method, const json &params, bool more = false)
{
	c.send(vl::make_call(method, params, more));
	json reply = c.receive().body;
	if (!reply.contains("error"))
		return "ok";
	std::string message = reply["parameters"].is_object() ? reply["parameters"].value("message", "") : "";
	return reply["error"].get<std::string>() + (message.empty() ? "" : ": " + message);
}

// The calls that tell the tiers apart, each made so that it does nothing once allowed: it fails
// after the tier check, on the service that does not exist (or the binary root alone names).
struct Probe {
	std::string name;
	const char *method;
	json params;
	bool more = false;
};
std::vector<Probe> tier_probes(const std::string &binary)
{
	return {
		{"Status", "io.brokerd.Control.Status", json::object()},
		{"Sockets", "io.brokerd.Control.Sockets", json::object()},
		{"Watch", "io.brokerd.Control.Watch", {{"service", "nosuch"}}, true},
		{"Upgrade", "io.brokerd.Control.Upgrade", {{"service", "nosuch"}}},
		{"Stop", "io.brokerd.Control.Stop", {{"service", "nosuch"}}},
		{"Reload", "io.brokerd.Control.Reload", {{"nosuch", true}}},
		{"Reexec --binary", "io.brokerd.Control.Reexec", {{"binary", binary}}},
	};
}

std::string brokerd_exe(pid_t pid)
{
	return std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/exe").string();
}

// As nobody: connects, then until brokerd closes the connection or 20 s pass, either sends
// nothing or calls GetInfo every 250 ms. Prints how long the connection lived; 0 when brokerd
// closed it, 2 when it did not, 3 when a call was not answered.
int until_closed(const std::string &control, bool busy)
{
	auto begin = Clock::now();
	auto deadline = begin + 20s;
	UniqueFd fd = unix_connect(control);
	if (!fd)
		return 4;
	const std::string call = std::string(R"({"method":"org.varlink.service.GetInfo"})") + '\0';
	int answered = 0;
	auto report = [&](const char *how) {
		auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - begin).count();
		std::fprintf(stderr, "%s after %lld ms, %d calls answered\n", how, static_cast<long long>(ms), answered);
	};
	char buf[4096];
	// Waits up to `ms` for input: 1 a reply, 0 nothing came, -1 the end of the connection.
	auto input = [&](int ms) {
		pollfd p{fd.get(), POLLIN, 0};
		if (::poll(&p, 1, ms) <= 0)
			return 0;
		ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
		return n > 0 ? 1 : -1;
	};
	while (Clock::now() < deadline) {
		if (busy) {
			if (::send(fd.get(), call.data(), call.size(), MSG_NOSIGNAL) < 0)
				return report("closed (send failed)"), 0;
			int r = input(5000);
			if (r < 0)
				return report("closed"), 0;
			if (r == 0)
				return report("no answer"), 3;
			answered++;
		}
		if (input(busy ? 250 : 20000) < 0)
			return report("closed"), 0;
	}
	report("still open");
	return 2;
}

// One GetInfo call of exactly `size` bytes (its NUL not counted) on a new connection: "answered",
// or "closed" when brokerd ended the connection without a reply.
std::string message_of_size(const std::string &control, std::size_t size)
{
	const std::string head = R"({"method":"org.varlink.service.GetInfo","parameters":{"pad":")", tail = R"("}})";
	std::string call = head + std::string(size - head.size() - tail.size(), 'a') + tail + '\0';
	UniqueFd fd = unix_connect(control);
	if (!fd)
		return std::string("connect: ") + std::strerror(errno);
	timeval tv{10, 0};
	::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	for (std::size_t off = 0; off < call.size();) {
		ssize_t n = ::send(fd.get(), call.data() + off, call.size() - off, MSG_NOSIGNAL);
		if (n <= 0)
			break; // closed before it took the whole message; what it said is still there to read
		off += static_cast<std::size_t>(n);
	}
	std::string in;
	char buf[4096];
	while (in.find('\0') == std::string::npos) {
		ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
		if (n == 0 || (n < 0 && (errno == ECONNRESET || errno == EPIPE)))
			return in.empty() ? "closed" : "closed after " + in;
		if (n < 0)
			return std::string("recv: ") + std::strerror(errno);
		in.append(buf, static_cast<std::size_t>(n));
	}
	return in.rfind(R"({"parameters":)", 0) == 0 ? "answered" : in;
}

} // namespace

TEST_CASE("each tier by user and by supplementary group may do its calls and no more; reexec --binary is root's")
{
	if (::geteuid() != 0)
		TEST_SKIP("runs clients as other users and makes groups: needs root");
	ScratchGroup admins("admin"), readers("read");
	Broker b;
	BROKER_CONTEXT(b);
	json svc = service({"sleep", "infinity"}, {}, 1, "exec");
	svc["user"] = "nobody";
	b.start({{"control",
	          {{"admin_users", {"daemon"}},
	           {"admin_groups", {admins.name()}},
	           {"read_users", {"bin"}},
	           {"read_groups", {readers.name()}}}},
	         {"services", {{"svc", svc}}}});
	const std::string installed = brokerd_exe(b.pid());
	// A brokerd that would run, for the binary only root names.
	std::string other = b.path("other-brokerd");
	std::filesystem::copy_file(env("BROKERD"), other);
	REQUIRE(::chmod(other.c_str(), 0755) == 0);

	const std::string denied = "org.varlink.service.PermissionDenied";
	const std::string nosuch = "io.brokerd.Control.NoSuchService";
	const std::string bad_param = "org.varlink.service.InvalidParameter";
	const std::string binary_denied = denied + ": only root names a binary: it runs as brokerd's user";
	// Outcomes of tier_probes() for each tier.
	const std::map<std::string, std::vector<std::string>> expected = {
		{"admin", {"ok", "ok", nosuch, nosuch, nosuch, bad_param, binary_denied}},
		{"reader", {"ok", "ok", nosuch, denied, denied, denied, denied}},
		{"none", {denied, denied, denied, denied, denied, denied, denied}},
	};
	struct Case {
		std::string who;
		Identity id;
		std::string tier;
	};
	const Case cases[] = {
		{"admin_users", {kDaemon, kDaemon, {}}, "admin"},
		{"admin_groups, supplementary", {kSys, kSys, {admins.gid()}}, "admin"},
		{"admin_groups, primary", {kSys, admins.gid(), {}}, "admin"},
		{"read_users", {kBin, kBin, {}}, "reader"},
		{"read_groups, supplementary", {kSys, kSys, {readers.gid()}}, "reader"},
		{"in none", {kSys, kSys, {}}, "none"},
		{"nobody", {kNobody, kNogroup, {}}, "none"},
	};
	std::vector<Probe> probes = tier_probes(other);
	for (const Case &c : cases) {
		CAPTURE(c.who);
		Process p = run_as(b, c.id, "tier", [&] {
			SyncClient client(b.control_path(), 20s);
			json out = json::array();
			for (const Probe &probe : probes)
				out.push_back(outcome(client, probe.method, probe.params, probe.more));
			std::printf("%s\n", out.dump().c_str());
			return 0;
		});
		int code = exit_code(p);
		INFO("child's stderr: ", read_file(b.path("tier.err")));
		REQUIRE(code == 0);
		json got = json::parse(read_file(b.path("tier.out")));
		const auto &want = expected.at(c.tier);
		for (std::size_t i = 0; i < probes.size(); i++) {
			CAPTURE(probes[i].name);
			CHECK(got.at(i) == want[i]);
		}
		std::filesystem::remove(b.path("tier.out"));
		CHECK(brokerd_exe(b.pid()) == installed);
	}

	// The allowed calls take effect: an admin by group upgrades, an admin by name re-executes the
	// installed brokerd (the same process goes on).
	auto admin_call = [&](const Identity &id, const std::string &method, const json &params) {
		Process p = run_as(b, id, "admin", [&] {
			SyncClient client(b.control_path(), 30s);
			std::string r = outcome(client, method, params);
			std::fprintf(stderr, "%s: %s\n", method.c_str(), r.c_str());
			return r == "ok" ? 0 : 1;
		});
		int code = exit_code(p, 60s);
		INFO(method, " as uid ", id.uid, ": ", read_file(b.path("admin.err")));
		CHECK(code == 0);
	};
	admin_call({kSys, kSys, {admins.gid()}}, "io.brokerd.Control.Upgrade", {{"service", "svc"}});
	json st = b.status("svc");
	INFO("Status: ", st.dump());
	CHECK(member(member(st, "services")[0], "generations").back().value("number", 0) == 2);
	admin_call({kDaemon, kDaemon, {}}, "io.brokerd.Control.Reexec", json::object());
	CHECK(b.status().value("pid", 0) == b.pid());
	CHECK(brokerd_exe(b.pid()) == installed);
	CHECK(b.log().find("Reexec of " + other + " from pid") != std::string::npos);
	b.stop();
}

TEST_CASE("control.max_connections bounds all connections, root's too, and a freed slot is taken again")
{
	Broker b;
	BROKER_CONTEXT(b);
	constexpr int kMax = 12;
	b.start({{"control", {{"max_connections", kMax}}}, {"sockets", json::object()}, {"services", json::object()}});

	std::vector<std::unique_ptr<SyncClient>> held;
	for (int i = 0; i < kMax; i++) {
		held.push_back(std::make_unique<SyncClient>(b.control_path(), 10s));
		CHECK(outcome(*held.back(), "io.brokerd.Control.Status", json::object()) == "ok");
	}
	const std::string refused = "io.brokerd.Control.TooManyConnections: brokerd has " + std::to_string(kMax) +
	                            " connections, its most (control.max_connections)";
	{
		SyncClient over(b.control_path(), 10s);
		CHECK(outcome(over, "io.brokerd.Control.Status", json::object()) == refused);
	}
	// The held ones still answer.
	for (auto &c : held)
		CHECK(outcome(*c, "org.varlink.service.GetInfo", json::object()) == "ok");

	held.pop_back();
	std::unique_ptr<SyncClient> again;
	CHECK(wait_until(
		[&] {
			again = std::make_unique<SyncClient>(b.control_path(), 10s);
			return outcome(*again, "io.brokerd.Control.Status", json::object()) == "ok";
		},
		10s));
	SyncClient over(b.control_path(), 10s);
	CHECK(outcome(over, "io.brokerd.Control.Status", json::object()) == refused);
	b.stop();
}

TEST_CASE("a peer that neither says Hello nor is an operator or a reader is closed after 10 s, calls or not")
{
	if (::geteuid() != 0)
		TEST_SKIP("runs clients as other users: needs root");
	Broker b;
	BROKER_CONTEXT(b);
	b.start({{"control", {{"read_users", {"bin"}}}}, {"sockets", json::object()}, {"services", json::object()}});
	const std::string control = b.control_path();

	// Opened at the same time: an operator's connection and a reader's, both idle throughout.
	SyncClient root(control, 10s);
	int release[2];
	REQUIRE(::pipe2(release, O_CLOEXEC) == 0);
	UniqueFd release_r(release[0]), release_w(release[1]);
	Process reader = run_as(b, {kBin, kBin, {}}, "reader", [&] {
		release_w.reset();
		SyncClient c(control, 10s);
		char byte;
		(void)!::read(release_r.get(), &byte, 1); // until the test is done with the others
		std::string r = outcome(c, "io.brokerd.Control.Status", json::object());
		std::fprintf(stderr, "Status after the wait: %s\n", r.c_str());
		return r == "ok" ? 0 : 1;
	});
	Process silent = run_as(b, {kNobody, kNogroup, {}}, "silent", [&] { return until_closed(control, false); });
	Process busy = run_as(b, {kNobody, kNogroup, {}}, "busy", [&] { return until_closed(control, true); });

	int silent_code = exit_code(silent, 30s), busy_code = exit_code(busy, 30s);
	std::string silent_log = read_file(b.path("silent.err")), busy_log = read_file(b.path("busy.err"));
	MESSAGE("silent: ", silent_log, "busy: ", busy_log);
	CHECK(silent_code == 0);
	CHECK(busy_code == 0);
	CHECK(busy_log.find(" 0 calls answered") == std::string::npos);

	release_w.reset();
	CHECK(exit_code(reader) == 0);
	INFO("reader: ", read_file(b.path("reader.err")));
	CHECK(outcome(root, "io.brokerd.Control.Status", json::object()) == "ok");
	std::istringstream log(b.log());
	std::size_t closed = 0;
	for (std::string line; std::getline(log, line);)
		closed += line.find("uid 65534: no Hello within 10s, closing connection") != std::string::npos;
	CHECK(closed == 2);
	b.stop();
}

TEST_CASE("a client that stops reading its replies is paused, not cut off: once it reads, every reply is there")
{
	Broker b;
	BROKER_CONTEXT(b);
	b.start({{"sockets", json::object()}, {"services", json::object()}});
	UniqueFd fd = unix_connect(b.control_path());
	REQUIRE(fd);
	REQUIRE(::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) | O_NONBLOCK) == 0);

	// 50,000 calls of about 190 bytes of reply each: over the 8 MiB any connection may have
	// queued, so a brokerd that read on regardless would have to drop the connection.
	constexpr std::size_t kCalls = 50000;
	const std::string call = std::string(R"({"method":"org.varlink.service.GetInfo"})") + '\0';
	std::string calls;
	for (std::size_t i = 0; i < kCalls; i++)
		calls += call;
	std::size_t sent = 0;
	for (;;) {
		ssize_t n = ::send(fd.get(), calls.data() + sent, calls.size() - sent, MSG_NOSIGNAL);
		if (n > 0) {
			sent += static_cast<std::size_t>(n);
			continue;
		}
		REQUIRE_MESSAGE(errno == EAGAIN, "send: ", std::strerror(errno));
		// Paused: brokerd reads nothing more for a whole second while its replies wait.
		pollfd p{fd.get(), POLLOUT, 0};
		if (::poll(&p, 1, 1000) == 0)
			break;
	}
	MESSAGE("brokerd paused the client after ", sent / call.size(), " of ", kCalls, " calls");
	CHECK(sent < calls.size());
	// Meanwhile everyone else is answered.
	CHECK(b.status()["pid"] == b.pid());

	// The client reads (and sends the rest): every call is answered, in one connection.
	std::size_t replies = 0, wrong = 0;
	std::string in, problem;
	auto deadline = Clock::now() + 60s;
	while (replies < kCalls && problem.empty()) {
		pollfd p{fd.get(), static_cast<short>(POLLIN | (sent < calls.size() ? POLLOUT : 0)), 0};
		if (Clock::now() > deadline || ::poll(&p, 1, 10000) <= 0) {
			problem = "no reply within the deadline";
			break;
		}
		if (p.revents & POLLOUT) {
			ssize_t n = ::send(fd.get(), calls.data() + sent, calls.size() - sent, MSG_NOSIGNAL);
			if (n > 0)
				sent += static_cast<std::size_t>(n);
			else if (errno != EAGAIN)
				problem = std::string("send: ") + std::strerror(errno);
		}
		if (!(p.revents & (POLLIN | POLLHUP | POLLERR)))
			continue;
		char buf[65536];
		ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
		if (n <= 0) {
			problem = std::string("the connection ended: ") + (n < 0 ? std::strerror(errno) : "EOF");
			break;
		}
		in.append(buf, static_cast<std::size_t>(n));
		for (std::size_t end; (end = in.find('\0')) != std::string::npos; in.erase(0, end + 1)) {
			replies++;
			wrong += in.compare(0, 14, R"({"parameters":)") != 0;
		}
	}
	CHECK_MESSAGE(problem.empty(), problem, " after ", replies, " replies");
	CHECK(replies == kCalls);
	CHECK(wrong == 0);
	CHECK(in.empty());
	b.stop();
}

TEST_CASE("a message over its sender's limit closes the connection: 16 KiB for a peer that is no operator, 1 MiB for root")
{
	if (::geteuid() != 0)
		TEST_SKIP("runs a client as nobody: needs root");
	Broker b;
	BROKER_CONTEXT(b);
	b.start({{"sockets", json::object()}, {"services", json::object()}});
	const std::string control = b.control_path();
	constexpr std::size_t kSmall = 16 << 10, kLarge = 1 << 20;

	Process nobody = run_as(b, {kNobody, kNogroup, {}}, "sizes", [&] {
		json out = {message_of_size(control, kSmall), message_of_size(control, kSmall + 1)};
		std::printf("%s\n", out.dump().c_str());
		return 0;
	});
	int code = exit_code(nobody);
	INFO("nobody: ", read_file(b.path("sizes.err")));
	REQUIRE(code == 0);
	CHECK(json::parse(read_file(b.path("sizes.out"))) == json{"answered", "closed"});

	CHECK(message_of_size(control, kSmall + 1) == "answered");
	CHECK(message_of_size(control, kLarge) == "answered");
	CHECK(message_of_size(control, kLarge + 1) == "closed");
	std::istringstream log(b.log());
	std::size_t small = 0, large = 0;
	for (std::string line; std::getline(log, line);) {
		small += line.find("uid 65534: protocol error: a message over 16384 bytes") != std::string::npos;
		large += line.find("uid 0: protocol error: a message over 1048576 bytes") != std::string::npos;
	}
	CHECK(small == 1);
	CHECK(large == 1);
	b.stop();
}
