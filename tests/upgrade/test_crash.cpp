// SIGKILL of brokerd under load, then a restart as systemd does it (Restart=on-failure): the new
// brokerd gets the fd store its predecessor filled, serves on the very same listener, and carries
// on with the same workers.
#include "support.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fstream>
#include <netinet/in.h>
#include <poll.h>
#include <sstream>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>

using namespace utest;

namespace {

// A connection to 127.0.0.1:port with a whole request written and nothing read yet.
UniqueFd send_request(std::uint16_t port)
{
	UniqueFd fd = tcp_connect(port);
	std::string req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
	REQUIRE(::send(fd.get(), req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
	return fd;
}

// Everything the server sends on `fd` until it closes, or what came by the deadline.
std::string read_to_end(int fd, std::chrono::milliseconds timeout)
{
	std::string out;
	auto deadline = Clock::now() + timeout;
	for (;;) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
		pollfd p{fd, POLLIN, 0};
		if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0)
			return out;
		char buf[4096];
		ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return out;
		if (n > 0)
			out.append(buf, static_cast<std::size_t>(n));
	}
}

// The sockets among the store's names: brokerd also keeps its crash state ("state"), the
// workers' notify socket ("notify"), their output pipes ("pipe.<inode>") and its stop sentinel's
// pipe ("sentinel") there.
std::string stored_sockets(const ServiceManager &manager)
{
	std::vector<std::string> sockets;
	for (const auto &n : manager.names())
		if (n != "state" && n != "notify" && n != "sentinel" && !n.starts_with("pipe."))
			sockets.push_back(n);
	std::sort(sockets.begin(), sockets.end());
	return joined(sockets);
}

std::size_t stored_pipes(const ServiceManager &manager)
{
	std::size_t n = 0;
	for (const auto &name : manager.names())
		n += name.starts_with("pipe.");
	return n;
}

std::vector<pid_t> pids_of(const std::vector<StrayProcess> &procs)
{
	std::vector<pid_t> out;
	for (const auto &p : procs)
		out.push_back(p.pid);
	std::sort(out.begin(), out.end());
	return out;
}

// The two kinds of worker a crash must not disturb.
struct Kind {
	const char *name;
	json (*service)(int instances, const json &extra);
	// Links libbroker-client: it reconnects to the restarted brokerd on its own, with a line in
	// its output ("reconnected to the broker"), and hands its connections off as it drains.
	bool client_lib;
};
const Kind kNotify{"broker-example-python (LISTEN_FDS, sd_notify)", python_service, false};
const Kind kClientLib{"broker-example-http (libbroker-client)", http_service, true};

// Each load mode's requests per second.
constexpr int kRate = 500;

// A libbroker-client worker reconnects to the restarted brokerd and says so in its output, which
// reaches brokerd's log through the pipe kept in the store: waits until `total` such lines are
// there (this Broker's whole log). Nothing to wait for with a LISTEN_FDS worker.
void wait_reconnected(Broker &b, const Kind &kind, std::size_t total)
{
	if (!kind.client_lib)
		return;
	bool back = wait_until([&] { return occurrences(b.log(), "reconnected to the broker") >= total; }, 20s);
	REQUIRE_MESSAGE(back, total, " reconnections of libbroker-client workers expected in the log, ",
	                occurrences(b.log(), "reconnected to the broker"), " seen");
}

std::vector<pid_t> sorted(std::vector<pid_t> pids)
{
	std::sort(pids.begin(), pids.end());
	return pids;
}

// Killed at rest: the workers serve on while no brokerd runs, and the restarted one carries on
// with them on the very same listener, fds and memory back to what the first one held.
void at_rest(const Kind &kind)
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	INFO("worker: ", std::string(kind.name));
	tb.start(config_with({{"web", kind.service(2, json::object())}}));
	// Before any control connection: brokerd's fds and memory as it serves.
	auto idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	const std::map<int, std::string> start_fds = *idle;
	std::size_t start_rss = rss_kb(b.pid());

	check_serves_alone(b, "web", 1, 2);
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	std::set<std::uint64_t> on = listening_on(port);
	REQUIRE_MESSAGE(on.size() == 1, "listeners on port ", port, ": ", on.size());
	const std::uint64_t listener = *on.begin();
	std::vector<pid_t> workers = running_pids(st, "web");
	REQUIRE(workers.size() == 2);
	// What brokerd bound is in the store, with its crash state, the notify socket and the two
	// workers' stdout and stderr.
	tb.notify.sync();
	REQUIRE(stored_sockets(tb.notify) == "control, http");
	CHECK(stored_pipes(tb.notify) == 4);
	CHECK(inode_of(tb.notify.dup("http").get()) == listener);
	const std::vector<std::string> stored_before = tb.notify.names();
	const std::string events = joined(tb.notify.store_events());

	Load load(b, port, "hello from web gen ", 200);
	// The crash is a window of its own in the load's report: requests must succeed in it too.
	load.begin_upgrade();
	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("survivors of brokerd:\n", describe(survivors));
	// Only the workers ran below brokerd, and they outlive it.
	CHECK(pids_of(survivors) == workers);
	// The store keeps what brokerd put there; nothing else holds the control socket now.
	CHECK(tb.notify.names() == stored_before);

	// A client connecting while no brokerd runs reaches the kept listener, the only one on the
	// port: the kernel queues its connection there until someone accepts it.
	UniqueFd queued = send_request(port);
	CHECK(listening_on(port) == std::set<std::uint64_t>{listener});

	tb.restart();
	// A libbroker-client worker's connection to brokerd counts among brokerd's fds.
	wait_reconnected(b, kind, 2);
	load.end_upgrade();
	// Measured as at the first start.
	idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	const std::map<int, std::string> restart_fds = *idle;
	std::size_t restart_rss = rss_kb(b.pid());
	// No more than the first one: that one also held a pidfd for its stop sentinel, its child,
	// which the restarted brokerd carries on with but does not reap.
	CHECK_MESSAGE(restart_fds.size() + 1 == start_fds.size(), "brokerd holds ", restart_fds.size(),
	              " fds after the restart, not ", start_fds.size() - 1, " (the first start's less its sentinel's pidfd):\n",
	              listing(start_fds), "after the restart:\n", listing(restart_fds));
	MESSAGE("brokerd's VmRSS: ", start_rss, " kB at the first start, ", restart_rss, " kB after the restart");
	CHECK(restart_rss <= start_rss + kRssMarginKb);

	// The restarted brokerd took the stored listener back: same socket, origin "fdstore", and it
	// released nothing and stored nothing again.
	st = b.status();
	const json *http = find_named(member(st, "sockets"), "http");
	REQUIRE(http);
	CHECK(http->value("origin", "") == "fdstore");
	CHECK(socket_port(st, "http") == port);
	CHECK(listening_on(port) == std::set<std::uint64_t>{listener});
	CHECK(socket_inodes(b.pid()).count(listener) == 1);
	tb.notify.sync();
	CHECK(tb.notify.names() == stored_before);
	CHECK(joined(tb.notify.store_events()) == events);

	// The request made while brokerd was dead is answered.
	std::string answer = read_to_end(queued.get(), 10s);
	CHECK_MESSAGE(answer.starts_with("HTTP/1.1 200 "), "the request queued while brokerd was dead got: '", answer, "'");
	CHECK(answer.find("hello from web gen 1 ") != std::string::npos);

	check_serves_alone(b, "web", 1, 2);
	// The workers brokerd started before the crash still run, and they are the ones it reports.
	for (pid_t w : workers)
		CHECK_MESSAGE(process_exists(w), "worker ", w, " of the killed brokerd is gone");
	st = b.status();
	CHECK(running_pids(st, "web") == workers);
	CHECK(member(member(st, "recovered"), "kept") == 2);

	// An upgrade after the restart works, under load.
	load.begin_upgrade();
	RunResult up = brokerctl(b, {"upgrade", "web"});
	load.end_upgrade();
	INFO("brokerctl upgrade: ", up.describe());
	CHECK(up.exit_code == 0);
	check_serves_alone(b, "web", 2, 2);
	// Once the old instances are gone, brokerd's fds are what they were after the restart.
	bool settled = wait_until([&] { return (idle = idle_fds(b.pid(), 1s)) && idle->size() == restart_fds.size(); }, 10s);
	CHECK_MESSAGE(settled, "brokerd holds ", idle ? idle->size() : 0, " fds after the upgrade, not ",
	              restart_fds.size(), ":\n", idle ? listing(*idle) : std::string("(never idle)"));

	std::set<int> gens = load.finish_and_check();
	std::vector<std::string> answered;
	for (int g : gens)
		answered.push_back(std::to_string(g));
	// The upgrade drained the re-adopted workers, so gen 2 answered after it.
	CHECK(joined(answered) == "1, 2");

	// None of the killed brokerd's workers is left for the test to end: the new one drained them.
	std::vector<StrayProcess> orphans = b.end_survivors();
	INFO("left of the killed brokerd's workers:\n", describe(orphans));
	CHECK(orphans.empty());
	// stop() checks that the control socket's file is gone: the crash state says the first
	// brokerd bound it, so the restarted one removes it.
	b.stop();
}

// brokerd's fds and VmRSS as it serves, idle, before any control connection.
struct Baseline {
	std::size_t fds = 0;
	std::size_t rss_kb = 0;
};

Baseline baseline(Broker &b)
{
	auto idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	return {idle->size(), rss_kb(b.pid())};
}

// brokerd started with `cfg` and its service "web" of 2 instances serving: its baseline, the
// port of its socket "http" and web's pids.
struct Serving {
	Baseline start;
	std::uint16_t port = 0;
	std::vector<pid_t> workers;
};

Serving start_web(TestBroker &tb, const json &cfg)
{
	tb.start(cfg);
	Serving s;
	s.start = baseline(tb.b);
	check_serves_alone(tb.b, "web", 1, 2);
	json st = tb.b.status();
	s.port = socket_port(st, "http");
	s.workers = running_pids(st, "web");
	REQUIRE(s.workers.size() == 2);
	return s;
}

bool is_event(const StreamCall::Reply &r, const std::string &event, int generation)
{
	return r.parameters.value("event", "") == event && r.parameters.value("generation", 0) == generation;
}

// The Watch's next event of that kind for that generation of web.
StreamCall::Reply watch_event(StreamCall &watch, const std::string &event, int generation)
{
	auto r = watch.until([&](const StreamCall::Reply &reply) { return is_event(reply, event, generation); }, 30s);
	REQUIRE_MESSAGE(r, "no \"", event, "\" of gen ", generation, " within 30 s:\n", watch.transcript());
	return *r;
}

// Status `recovered` of the restarted brokerd, exactly: `kept` processes found again, none lost,
// and the interrupted operations named.
void check_recovered(const json &status, pid_t crashed, unsigned kept, const std::vector<std::string> &interrupted)
{
	const json &rec = member(status, "recovered");
	INFO("recovered: ", rec.dump());
	CHECK(rec.value("crashed_pid", 0) == crashed);
	CHECK(rec.value("kept", 0u) == kept);
	CHECK(rec.value("lost", json()) == json::array());
	CHECK(rec.value("interrupted", json()) == json(interrupted));
}

// Each pid's process ends within `timeout`.
void check_exit(const std::vector<pid_t> &pids, std::chrono::milliseconds timeout, const char *what)
{
	std::vector<UniqueFd> fds;
	for (pid_t p : pids)
		fds.push_back(pidfd_of(p));
	auto deadline = Clock::now() + timeout;
	for (std::size_t i = 0; i < pids.size(); i++) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
		CHECK_MESSAGE((!fds[i] || exits_within(fds[i].get(), std::max(left, 0ms))), what, " ", pids[i],
		              " still runs ", timeout.count(), " ms on");
	}
}

// What every phase ends with, once the restarted brokerd carries on: an upgrade of "web" under
// the load works (to generation `to`); once it settled, brokerd holds `fds` fds, and about the
// memory it held at the first start; the load lost no request; no process of the killed brokerd
// is left for the test to end.
void upgrade_and_settle(TestBroker &tb, Load &load, int to, std::size_t fds, std::size_t start_rss,
                        const std::vector<StrayProcess> &survivors, const std::vector<pid_t> &still_served = {})
{
	Broker &b = tb.b;
	load.begin_upgrade();
	RunResult up = brokerctl(b, {"upgrade", "web"});
	load.end_upgrade();
	INFO("brokerctl upgrade after the restart: ", up.describe());
	CHECK(up.exit_code == 0);
	CHECK(up.out.find("gen " + std::to_string(to)) != std::string::npos);
	check_serves_alone(b, "web", to, 2);

	std::optional<std::map<int, std::string>> idle;
	bool settled = wait_until([&] { return (idle = idle_fds(b.pid(), 1s)) && idle->size() == fds; }, 15s);
	CHECK_MESSAGE(settled, "brokerd holds ", idle ? idle->size() : 0, " fds once settled after the upgrade, not ",
	              fds, ":\n", idle ? listing(*idle) : std::string("(never idle)"));
	std::size_t rss = rss_kb(b.pid());
	MESSAGE("brokerd's VmRSS: ", start_rss, " kB at the first start, ", rss, " kB once settled after the restart");
	CHECK(rss <= start_rss + kRssMarginKb);

	std::set<int> gens = load.finish_and_check();
	CHECK(gens.count(to) == 1);
	// Of the killed brokerd's processes, only those the restarted one still serves run.
	std::vector<pid_t> running;
	for (const auto &p : survivors)
		if (process_exists(p.pid))
			running.push_back(p.pid);
	CHECK_MESSAGE(sorted(running) == sorted(still_served), "of the killed brokerd's processes:\n", describe(survivors));
	b.stop();
	// And the restarted brokerd's stop ended those.
	std::vector<StrayProcess> orphans = b.end_survivors();
	INFO("left of the killed brokerd's processes after the stop:\n", describe(orphans));
	CHECK(orphans.empty());
}

// What a handoff that brokerd's death cut short says: the lines of the workers' output about their
// handoffs, for a failure's message.
std::string handoff_lines(const Broker &b)
{
	std::string out, log = b.log();
	std::size_t at = 0;
	while ((at = log.find("handoff settled", at)) != std::string::npos) {
		std::size_t begin = log.rfind('\n', at);
		begin = begin == std::string::npos ? 0 : begin + 1;
		std::size_t end = log.find('\n', at);
		out += log.substr(begin, end == std::string::npos ? std::string::npos : end - begin) + "\n";
		at = end;
	}
	return out.empty() ? "(none)\n" : out;
}

// The command of a version of `kind` that takes 5 s to begin: it starts, and stays starting long
// after the restart of a brokerd killed meanwhile.
json slow_exec(const Kind &kind)
{
	json exec = json::array({"/bin/sh", "-c", "sleep 5; exec \"$0\" \"$@\""});
	const json service = kind.service(1, json::object());
	for (const auto &arg : service.at("exec"))
		exec.push_back(arg);
	return exec;
}

// Whether the process runs a shell: past the go byte brokerd sends a child once its crash state
// names it.
bool runs_shell(pid_t pid)
{
	std::vector<std::string> argv = proc_cmdline(pid);
	return !argv.empty() && argv[0] == "/bin/sh";
}

// Killed while the new generation starts: an upgrade of 2 instances with batch 1, killed once its
// first new instance runs, long before it is ready. The restarted brokerd rolls back to the last
// complete generation: the old workers serve on at full capacity, the new one is drained away.
void while_starting(const Kind &kind)
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	INFO("worker: ", std::string(kind.name));
	const Serving first = start_web(tb, config_with({{"web", kind.service(2, {{"drain", {{"timeout", "20s"}}}})}}));
	const Baseline &start = first.start;
	const std::uint16_t port = first.port;
	const std::vector<pid_t> &workers = first.workers;
	json st;

	Load load(b, port, "hello from web gen ", kRate);
	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	load.begin_upgrade();
	StreamCall upgrade(b.control_path(), "io.brokerd.Control.Upgrade",
	                   {{"service", "web"}, {"exec", slow_exec(kind)}, {"batch", 1}, {"start_timeout_ms", 60000}});
	auto started = watch_event(watch, "started", 2);
	const pid_t fresh = started.parameters.value("pid", 0);
	REQUIRE(fresh > 0);
	REQUIRE_MESSAGE(wait_until([&] { return runs_shell(fresh); }, 10s), "gen 2's instance ", fresh, " never ran");
	const pid_t crashed = b.pid();
	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("survivors of brokerd:\n", describe(survivors));
	std::vector<pid_t> alive = pids_of(survivors);
	for (pid_t p : workers)
		CHECK(std::count(alive.begin(), alive.end(), p) == 1);
	CHECK(std::count(alive.begin(), alive.end(), fresh) == 1);

	tb.restart();
	wait_reconnected(b, kind, 2);
	load.end_upgrade();
	st = b.status();
	check_recovered(st, crashed, 3, {"web: an upgrade the crash interrupted: rolled back to gen 1"});
	// The half-started instance is drained away; the old workers serve on, the same pids.
	check_exit({fresh}, 20s, "gen 2's half-started instance");
	check_serves_alone(b, "web", 1, 2);
	CHECK(running_pids(b.status(), "web") == workers);

	// The same services as at the first start: its fds, less its stop sentinel's pidfd.
	upgrade_and_settle(tb, load, 3, start.fds - 1, start.rss_kb, survivors);
}

// The inode of the server's end of the connection from 127.0.0.1:client to 127.0.0.1:port, from
// /proc/net/tcp: 0 until a worker accepted it.
std::uint64_t accepted_inode(std::uint16_t port, std::uint16_t client)
{
	std::ifstream f("/proc/net/tcp");
	std::string line;
	std::getline(f, line); // header
	auto port_of = [](const std::string &address) { return std::stoul(address.substr(address.rfind(':') + 1), nullptr, 16); };
	while (std::getline(f, line)) {
		std::istringstream in(line);
		std::string sl, local, remote, st, queues, timer, retr, uid, timeout;
		std::uint64_t inode = 0;
		in >> sl >> local >> remote >> st >> queues >> timer >> retr >> uid >> timeout >> inode;
		if (st == "01" && port_of(local) == port && port_of(remote) == client) // TCP_ESTABLISHED
			return inode;
	}
	return 0;
}

// A keep-alive connection that holds up the drain of the worker that accepted it: it pipelines
// requests and reads none of the answers, until the worker's output to it is full. A worker
// cannot finish its drain with an answer unsent, nor hand the connection off; it goes on once
// the client reads.
class Clog {
public:
	explicit Clog(std::uint16_t port)
	{
		fd_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
		REQUIRE(fd_);
		int small = 4096; // a small window, so that the worker's output fills soon
		::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
		sockaddr_in to{};
		to.sin_family = AF_INET;
		to.sin_port = htons(port);
		to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		REQUIRE(::connect(fd_.get(), reinterpret_cast<sockaddr *>(&to), sizeof to) == 0);
		sockaddr_in me{};
		socklen_t len = sizeof me;
		REQUIRE(::getsockname(fd_.get(), reinterpret_cast<sockaddr *>(&me), &len) == 0);
		port_ = port;
		client_ = ntohs(me.sin_port);
	}

	// Which of `pids` accepted it, once one did (0 when none within 5 s).
	pid_t holder(const std::vector<pid_t> &pids) const
	{
		pid_t found = 0;
		wait_until(
			[&] {
				std::uint64_t inode = accepted_inode(port_, client_);
				for (pid_t p : pids)
					if (inode && socket_inodes(p).count(inode))
						found = p;
				return found != 0;
			},
			5s);
		return found;
	}

	// Pipelines requests until the worker takes no more for 500 ms: its answers fill the way back.
	void fill()
	{
		std::string chunk;
		for (int i = 0; i < 64; i++)
			chunk += "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
		std::size_t at = 0, total = 0;
		auto quiet_since = Clock::now();
		while (Clock::now() - quiet_since < 500ms) {
			REQUIRE_MESSAGE(total < (64u << 20), "64 MiB of requests and the worker still takes more");
			ssize_t n = ::send(fd_.get(), chunk.data() + at, chunk.size() - at, MSG_NOSIGNAL | MSG_DONTWAIT);
			if (n > 0) {
				at = (at + static_cast<std::size_t>(n)) % chunk.size();
				total += static_cast<std::size_t>(n);
				quiet_since = Clock::now();
				continue;
			}
			REQUIRE_MESSAGE((n < 0 && (errno == EAGAIN || errno == EINTR)), "send: ", std::strerror(errno));
			pollfd p{fd_.get(), POLLOUT, 0};
			::poll(&p, 1, 100);
		}
	}

	// Reads what came, without waiting; false once the worker closed it.
	bool read_some()
	{
		char buf[65536];
		for (;;) {
			ssize_t n = ::recv(fd_.get(), buf, sizeof buf, MSG_DONTWAIT);
			if (n > 0) {
				in_.append(buf, static_cast<std::size_t>(n));
				continue;
			}
			return n < 0 && (errno == EAGAIN || errno == EINTR);
		}
	}

	// The status lines of the answers read so far, but for "200 OK".
	std::vector<std::string> not_ok() const
	{
		std::vector<std::string> out;
		for (auto at = in_.find("HTTP/1.1 "); at != std::string::npos; at = in_.find("HTTP/1.1 ", at + 1))
			if (in_.size() >= at + 15 && in_.compare(at, 15, "HTTP/1.1 200 OK") != 0)
				out.push_back(in_.substr(at, 15));
		return out;
	}
	std::size_t answers() const { return occurrences(in_, "HTTP/1.1 "); }

private:
	UniqueFd fd_;
	std::uint16_t port_ = 0, client_ = 0;
	std::string in_;
};

// Clogs, one held by each of `workers` (as many connections are made as it takes).
std::vector<std::unique_ptr<Clog>> clog_each(std::uint16_t port, const std::vector<pid_t> &workers)
{
	std::vector<std::unique_ptr<Clog>> clogs;
	std::set<pid_t> held;
	for (int tries = 0; held.size() < workers.size() && tries < 64; tries++) {
		auto c = std::make_unique<Clog>(port);
		pid_t by = c->holder(workers);
		if (by && held.insert(by).second) {
			c->fill();
			clogs.push_back(std::move(c));
		}
	}
	REQUIRE_MESSAGE(held.size() == workers.size(), "64 connections reached only ", held.size(), " of the ",
	                workers.size(), " workers");
	return clogs;
}

// Killed while the old generation drains: an upgrade of 2 instances killed on the first
// "draining" event, once the old workers told to drain said so (they are told after the crash
// state's write). A connection to each old worker whose answers are not read holds its drain up
// over the kill. With batch 2 both new instances are ready by then: the restarted brokerd
// completes the upgrade, the new generation serves and the old workers end their drain. With
// batch 1 (to a version that takes 5 s to begin) one old worker drains behind the first new
// one, which takes connections, while the second new one is still starting: the restarted
// brokerd rolls back, drains both new ones, and refills gen 1 beside the old worker that never
// drained. Either way the held answers are all 200.
void while_draining(const Kind &kind, int batch)
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	INFO("worker: ", std::string(kind.name), ", batch ", batch);
	const Serving first = start_web(tb, config_with({{"web", kind.service(2, {{"drain", {{"timeout", "20s"}}}})}}));
	const Baseline &start = first.start;
	const std::uint16_t port = first.port;
	const std::vector<pid_t> &workers = first.workers;
	const bool completes = batch == 2;
	json st;

	Load load(b, port, "hello from web gen ", kRate);
	std::vector<std::unique_ptr<Clog>> clogs = clog_each(port, workers);
	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	load.begin_upgrade();
	json params = {{"service", "web"}, {"batch", batch}};
	if (!completes)
		params.update({{"exec", slow_exec(kind)}, {"start_timeout_ms", 60000}});
	StreamCall upgrade(b.control_path(), "io.brokerd.Control.Upgrade", params);
	const pid_t drained_first = watch_event(watch, "draining", 1).parameters.value("pid", 0);
	// A kill between the event and the state's write would be one before the drain: the state
	// does not have the new instances ready either, so the upgrade would roll back.
	REQUIRE_MESSAGE(wait_until([&] { return occurrences(b.log(), ": draining (") == static_cast<std::size_t>(batch); }, 10s),
	                "the old workers told to drain did not say they drain");
	const pid_t crashed = b.pid();
	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("Watch before the kill:\n", watch.transcript());
	INFO("survivors of brokerd:\n", describe(survivors));
	std::vector<pid_t> fresh;
	for (const auto &r : watch.seen())
		if (is_event(r, "started", 2))
			fresh.push_back(r.parameters.value("pid", 0));
	fresh = sorted(fresh);
	REQUIRE(fresh.size() == 2);
	std::vector<pid_t> all = workers;
	all.insert(all.end(), fresh.begin(), fresh.end());
	std::vector<pid_t> alive = pids_of(survivors);
	for (pid_t p : all)
		CHECK_MESSAGE(std::count(alive.begin(), alive.end(), p) == 1, "pid ", p, " did not outlive brokerd");

	tb.restart();
	// The libbroker-client workers reconnect: the old ones to be told to drain again. A new one
	// the rollback drains is signalled at once, before it can (the second of batch 1 is still
	// a shell).
	wait_reconnected(b, kind, completes ? 4 : 2);
	st = b.status();
	check_recovered(st, crashed, 4,
	                {completes ? "web: an upgrade the crash interrupted: completed at gen 2"
	                           : "web: an upgrade the crash interrupted: rolled back to gen 1"});
	// The drain goes on: once the clogged clients read, the old workers that drain end it.
	const std::vector<pid_t> draining = completes ? workers : std::vector<pid_t>{drained_first};
	bool drained = wait_until(
		[&] {
			for (auto &c : clogs)
				c->read_some();
			return std::none_of(draining.begin(), draining.end(), process_exists);
		},
		25s);
	CHECK_MESSAGE(drained, "the old workers told to drain still run 25 s after the restart");
	for (auto &c : clogs) {
		CHECK(c->answers() > 0);
		CHECK(c->not_ok() == std::vector<std::string>{});
	}
	// Handed off, a clog would hold up the next drain too: its clients go.
	clogs.clear();
	if (!completes)
		check_exit(fresh, 20s, "a new instance of the rolled back upgrade");
	load.end_upgrade();
	check_serves_alone(b, "web", completes ? 2 : 1, 2);
	std::vector<pid_t> serving = running_pids(b.status(), "web");
	if (completes) {
		CHECK(serving == fresh);
	} else {
		// The old worker that never drained, and one started to refill gen 1.
		pid_t kept = workers[0] == drained_first ? workers[1] : workers[0];
		CHECK(std::count(serving.begin(), serving.end(), kept) == 1);
	}
	// The old libbroker-client workers hand their keep-alive connections off as they drain,
	// through brokerd: one killed with some on their way is followed by one that does not know
	// them, and the sender closes them (HandoffSummary::abandoned) until the handoff's in-doubt
	// resolution lands. A failed request of this case with fewer taken than handed below is that.
	INFO("handoffs the workers reported (a connection handed and not taken was in transit at the kill):\n",
	     handoff_lines(b));
	upgrade_and_settle(tb, load, 3, start.fds - 1, start.rss_kb, survivors);
}

// The state letter of /proc/PID/stat ('T' when stopped), or 0.
char process_state(pid_t pid)
{
	std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
	auto close = stat.rfind(')');
	return close != std::string::npos && close + 2 < stat.size() ? stat[close + 2] : 0;
}

// A reload that adds a socket and a service on it and removes a service whose worker ignores
// SIGTERM, and a kill of brokerd either right after the reload's reply (`answered`) or between
// its SIGHUP and its handling (brokerd is stopped, signalled, then killed, so it never ran in
// between). After the restart the reload is all there or not at all: the added socket from the
// store and its service serving, the removed service's worker drained to the reload's deadline
// and the service gone; or the config before it, until the reload is made again, which then
// does all of that. "web" serves on with the same workers throughout.
void crash_reload(const Kind &kind, bool answered)
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	INFO("worker: ", std::string(kind.name));
	json cfg = config_with({{"web", kind.service(2, json::object())}, {"gone", stubborn_service("6s")}});
	const Serving first = start_web(tb, cfg);
	const Baseline &start = first.start;
	const std::uint16_t port = first.port;
	const std::vector<pid_t> &workers = first.workers;
	check_serves_alone(b, "gone", 1, 1);
	json st = b.status();
	const std::vector<pid_t> gone = running_pids(st, "gone");
	REQUIRE(gone.size() == 1);
	REQUIRE(wait_until([&] { return ignores(gone[0], SIGTERM); }, 20s));

	Load load(b, port, "hello from web gen ", kRate);
	cfg["services"].erase("gone");
	cfg["sockets"]["extra"] = tcp_socket();
	cfg["services"]["added"] = python_service(1, {{"sockets", {"extra"}}});
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump(2));
	auto reload = [&] {
		RunResult r = brokerctl(b, {"reload", "--json"});
		INFO("brokerctl reload: ", r.describe());
		REQUIRE(r.exit_code == 0);
		json changes = json::parse(r.out);
		CHECK(changes["added_sockets"] == json::array({"extra"}));
		CHECK(changes["added_services"] == json::array({"added"}));
		CHECK(changes["removed_services"] == json::array({"gone"}));
	};
	auto stored_extra = [&] {
		tb.notify.sync();
		const std::vector<std::string> stored = tb.notify.names();
		return std::count(stored.begin(), stored.end(), "extra");
	};

	load.begin_upgrade();
	const pid_t crashed = b.pid();
	auto reloaded = Clock::now();
	std::vector<StrayProcess> survivors;
	std::uint64_t extra_inode = 0;
	if (answered) {
		reload();
		survivors = tb.kill9();
		// The reload's socket went into the store before its reply.
		REQUIRE(stored_extra() == 1);
		extra_inode = inode_of(tb.notify.dup("extra").get());
	} else {
		REQUIRE(::kill(crashed, SIGSTOP) == 0);
		REQUIRE(wait_until([&] { return process_state(crashed) == 'T'; }, 10s));
		REQUIRE(::kill(crashed, SIGHUP) == 0);
		survivors = tb.kill9();
		CHECK(stored_extra() == 0);
	}
	INFO("survivors of brokerd:\n", describe(survivors));

	tb.restart();
	wait_reconnected(b, kind, 2);
	load.end_upgrade();
	st = b.status();
	CHECK(running_pids(st, "web") == workers);
	if (answered) {
		// web's 2, gone's draining one and added's one.
		check_recovered(st, crashed, 4, {});
		const json *extra = find_named(member(st, "sockets"), "extra");
		REQUIRE(extra);
		CHECK(extra->value("origin", "") == "fdstore");
		CHECK(listening_on(socket_port(st, "extra")) == std::set<std::uint64_t>{extra_inode});
	} else {
		// Nothing of it: the state's config, not the file's, with gone's worker serving on.
		check_recovered(st, crashed, 3, {});
		CHECK(!find_named(member(st, "sockets"), "extra"));
		CHECK(!service_of(st, "added"));
		CHECK(running_pids(st, "gone") == gone);
		CHECK(stored_extra() == 0);
		reloaded = Clock::now();
		reload();
		st = b.status();
	}
	const std::uint16_t extra_port = socket_port(st, "extra");
	check_serves_alone(b, "added", 1, 1);
	CHECK(generation_answering(extra_port) == 1);
	// The removed service's worker drains to the reload's deadline, not one a restart began
	// afresh: killed by 6 s after the reload (3 s slack), and the service is gone.
	auto left = std::chrono::duration_cast<std::chrono::milliseconds>(reloaded + 9s - Clock::now());
	check_exit(gone, std::max(left, 0ms), "the removed service's instance");
	CHECK(wait_until([&] { return !service_of(b.status(), "gone"); }, 10s));
	check_serves_alone(b, "web", 1, 2);

	// The reload's services: gone's instance and the start's sentinel pidfd out, the extra
	// socket and added's instance in. added's worker is the killed brokerd's when it reloaded.
	std::vector<pid_t> still_served;
	if (answered)
		still_served = running_pids(b.status(), "added");
	upgrade_and_settle(tb, load, 2, start.fds, start.rss_kb, survivors, still_served);
}

// broker-example-http started by the test (not by brokerd), registering as `version` of the
// service "ext"; its output goes to ext-<version>.log in brokerd's dir.
Process registered_worker(const Broker &b, const std::string &version)
{
	SpawnOptions so;
	so.env = {"BROKER_SOCKET=" + b.control_path(), "BROKER_SERVICE=ext", "BROKER_VERSION=" + version};
	so.unset_env = {"BROKER_TOKEN", "BROKER_INSTANCE", "BROKER_GENERATION", "LISTEN_FDS", "LISTEN_PID"};
	so.stderr_path = b.path("ext-" + version + ".log");
	return Process::spawn({env("EXAMPLE_HTTP")}, so);
}

// The pid of the one ready instance of "ext" when it serves alone (no takeover under way, no
// other process), or 0.
pid_t ext_serving(Broker &b)
{
	json st = b.status("ext");
	const json *svc = service_of(st, "ext");
	if (!svc || !svc->value("upgrade", json()).is_null())
		return 0;
	std::vector<pid_t> pids = running_pids(st, "ext");
	std::vector<json> ready;
	for (const auto &g : member(*svc, "generations"))
		for (const auto &i : member(g, "instances"))
			if (i.value("state", "") == "ready")
				ready.push_back(i);
	return pids.size() == 1 && ready.size() == 1 ? pids[0] : 0;
}

} // namespace

TEST_CASE("crash: SIGKILL of brokerd at rest under load; restarted with its fd store it serves on the same listener with the same workers")
{
	at_rest(kNotify);
}

TEST_CASE("crash: SIGKILL of brokerd at rest under load with a libbroker-client worker")
{
	at_rest(kClientLib);
}

TEST_CASE("crash: SIGKILL while new instances start under load with a LISTEN_FDS worker rolls back to the old workers")
{
	while_starting(kNotify);
}

TEST_CASE("crash: SIGKILL while new instances start under load with a libbroker-client worker rolls back to the old workers")
{
	while_starting(kClientLib);
}

TEST_CASE("crash: SIGKILL while old instances drain under load with a LISTEN_FDS worker completes the upgrade")
{
	while_draining(kNotify, 2);
}

TEST_CASE("crash: SIGKILL while old instances drain under load with a libbroker-client worker completes the upgrade")
{
	while_draining(kClientLib, 2);
}

TEST_CASE("crash: SIGKILL right after a reload under load with a LISTEN_FDS worker keeps all of the reload")
{
	crash_reload(kNotify, true);
}

TEST_CASE("crash: SIGKILL right after a reload under load with a libbroker-client worker keeps all of the reload")
{
	crash_reload(kClientLib, true);
}

TEST_CASE("crash: SIGKILL of brokerd under load with a registered worker; it says Hello again and is the same instance")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json ext = {{"sockets", {"http"}}, {"instances", 1}, {"ready", "broker"}, {"drain", {{"timeout", "20s"}}},
	            {"register", {{"users", {"root"}}}}};
	tb.start(config_with({{"ext", ext}}));
	const std::uint16_t port = socket_port(b.status(), "http");
	Process v1 = registered_worker(b, "v1");
	INFO("v1's output:\n", read_file(b.path("ext-v1.log")));
	REQUIRE_MESSAGE(wait_until([&] { return ext_serving(b) == v1.pid(); }, 20s), "v1 did not register and get ready");
	const json before = *find_named(member(b.status("ext"), "services"), "ext");
	// Measured with the worker's connections open, as after its Hello again.
	const Baseline start = baseline(b);

	Load load(b, port, "hello from ext gen ", kRate);
	load.begin_upgrade();
	const pid_t crashed = b.pid();
	std::vector<StrayProcess> survivors = tb.kill9();
	// The worker is no child of brokerd: nothing of brokerd's survives but its sentinel.
	CHECK(survivors.empty());
	tb.restart();
	// The worker's library reconnects and says Hello again from the same process: it is the same
	// instance, not a new one, and the service has no takeover to make.
	REQUIRE_MESSAGE(wait_until([&] { return occurrences(b.log(), "is back after the crash") == 1; }, 20s),
	                "the registered worker did not re-attach");
	load.end_upgrade();
	json st = b.status();
	check_recovered(st, crashed, 1, {});
	CHECK(ext_serving(b) == v1.pid());
	const json *after = find_named(member(st, "services"), "ext");
	REQUIRE(after);
	CHECK(member(*after, "generations") == member(before, "generations"));
	CHECK(b.log().find("instance ext/" + std::to_string(generation_answering(port)) + "/0: registered pid " +
	                   std::to_string(v1.pid()) + " is back after the crash") != std::string::npos);

	// A takeover afterwards: v2 registers, v1 drains by itself and exits.
	load.begin_upgrade();
	Process v2 = registered_worker(b, "v2");
	auto exited = v1.wait(kRolloutDeadline);
	load.end_upgrade();
	INFO("v2's output:\n", read_file(b.path("ext-v2.log")));
	REQUIRE_MESSAGE(exited.has_value(), "v1 did not exit after v2 took over");
	CHECK(describe_status(*exited) == "exited with 0");
	CHECK(wait_until([&] { return ext_serving(b) == v2.pid(); }, 20s));
	std::optional<std::map<int, std::string>> idle;
	bool settled = wait_until([&] { return (idle = idle_fds(b.pid(), 1s)) && idle->size() + 1 == start.fds; }, 15s);
	CHECK_MESSAGE(settled, "brokerd holds ", idle ? idle->size() : 0, " fds after the takeover, not ", start.fds - 1,
	              " (the first start's less its sentinel's pidfd):\n", idle ? listing(*idle) : std::string("(never idle)"));
	CHECK(rss_kb(b.pid()) <= start.rss_kb + kRssMarginKb);
	std::set<int> gens = load.finish_and_check();
	CHECK(gens.size() == 2);

	v2.signal(SIGTERM);
	auto st2 = v2.wait(20s);
	REQUIRE(st2.has_value());
	CHECK(describe_status(*st2) == "exited with 0");
	b.stop();
}

TEST_CASE("crash: SIGKILL between a SIGHUP and its reload under load leaves none of the reload until it is made again")
{
	crash_reload(kNotify, false);
}

TEST_CASE("crash: SIGKILL while an old instance drains behind a new one with batch 1 under load with a LISTEN_FDS worker rolls back")
{
	while_draining(kNotify, 1);
}

TEST_CASE("crash: SIGKILL while an old instance drains behind a new one with batch 1 under load with a libbroker-client worker rolls back")
{
	while_draining(kClientLib, 1);
}
