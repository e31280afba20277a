// Every transition keeps the listener brokerd bound at the start, and a rolling upgrade never lowers the ready count.
#include "support.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstdio>
#include <map>
#include <sstream>
#include <thread>

using namespace utest;

namespace {

// How much brokerd's RSS may grow over a whole run of transitions: its generations' history
// (the configs of the generations it keeps) and the allocator's own slack. AddressSanitizer's
// quarantine would hold every freed block back, so that RSS grew with the work done rather than
// with what is kept: under it, brokerd runs with no quarantine and returns freed memory at once
// (as in the limits test), and the margin is that of its larger allocator.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
constexpr std::size_t kRssMarginKb = 8 * 1024;
#else
constexpr bool kSanitized = false;
constexpr std::size_t kRssMarginKb = 2 * 1024;
#endif

std::vector<std::string> measured_env()
{
	if (!kSanitized)
		return {};
	const char *inherited = std::getenv("ASAN_OPTIONS");
	return {std::string("ASAN_OPTIONS=") + (inherited ? inherited : "") +
	        ":quarantine_size_mb=0:allocator_release_to_os_interval_ms=0"};
}

// The inode of the socket a process holds at `fd`, or 0.
std::uint64_t socket_at(pid_t pid, int fd)
{
	auto fds = proc_fds(pid);
	auto it = fds.find(fd);
	return it == fds.end() ? 0 : socket_inode(it->second).value_or(0);
}

// Instances of a service in state "ready", over every generation listed.
std::size_t ready_count(const json &status, const std::string &service)
{
	std::size_t n = 0;
	for (const auto &i : instances(status, service))
		n += i.value("state", "") == "ready" && i.value("pid", 0) > 0;
	return n;
}

std::string text_of(const std::map<int, int> &counts)
{
	std::string s;
	for (const auto &[k, n] : counts)
		s += (s.empty() ? "" : " ") + std::to_string(k) + ":" + std::to_string(n);
	return s;
}

std::string text_of(const std::set<std::uint64_t> &inodes)
{
	std::string s;
	for (auto i : inodes)
		s += (s.empty() ? "" : " ") + std::to_string(i);
	return "{" + s + "}";
}

// A listener as brokerd bound it at the start: the port and the socket object's inode.
struct Bound {
	std::string socket;
	std::uint16_t port = 0;
	std::uint64_t inode = 0;
};

// The services of the identity test, each on a socket of its own, each worker exec'ed through
// the fd-probe, which records the fds it got.
struct Served {
	std::string service;
	std::string socket;
	int generation = 1; // the one that serves
	int newest = 1;     // the last generation number brokerd gave out
	std::map<int, int> started = {{1, 2}}; // generation -> workers exec'ed
};

// Checks, after each transition, what the listeners are and who holds them, and keeps the table
// of brokerd's fd count and RSS.
class Identity {
public:
	Identity(Broker &b, std::vector<Served> &served) : b_(b), served_(served) {}

	// Takes the start: the listeners brokerd holds, its fd count and RSS.
	void baseline()
	{
		json st = b_.status();
		for (const auto &s : served_) {
			Bound l;
			l.socket = s.socket;
			l.port = socket_port(st, s.socket);
			std::set<std::uint64_t> on = listening_on(l.port);
			REQUIRE_MESSAGE(on.size() == 1, "listeners on port ", l.port, ": ", text_of(on));
			l.inode = *on.begin();
			REQUIRE(socket_inodes(b_.pid()).count(l.inode) == 1);
			bound_[s.service] = l;
		}
		settle_fds(brokerd_fds(b_.pid()).size());
		start_fds_ = brokerd_fds(b_.pid());
		fds_ = start_fds_.size();
		rss_ = rss_kb(b_.pid());
		row("start", 0);
	}

	// After `transition`: each service serves alone from its generation, every worker holds the
	// listener of the start at fd 3 (and no other listener), brokerd still holds each one and
	// nobody else listens on their ports, and brokerd's fds are back to the start's plus
	// `extra_fds` (listeners added by a reload).
	void check(const std::string &transition, std::size_t extra_fds = 0)
	{
		INFO("after ", transition);
		std::size_t workers = 0;
		for (const auto &s : served_) {
			check_serves_alone(b_, s.service, s.generation, 2);
			const Bound &l = bound_.at(s.service);
			json st = b_.status(s.service);
			CHECK(socket_port(b_.status(), s.socket) == l.port);
			std::set<std::uint64_t> on = listening_on(l.port);
			CHECK_MESSAGE(on == std::set<std::uint64_t>{l.inode}, "listeners on port ", l.port, ": ", text_of(on),
			              ", bound at the start: ", l.inode);
			CHECK_MESSAGE(socket_inodes(b_.pid()).count(l.inode) == 1, "brokerd no longer holds socket ", l.inode);
			auto all = tcp_listeners();
			for (pid_t pid : worker_pids(st, s.service)) {
				CAPTURE(pid);
				CHECK_MESSAGE(socket_at(pid, 3) == l.inode, s.service, " worker ", pid, " holds socket ",
				              socket_at(pid, 3), " at fd 3, not ", l.inode);
				std::set<std::uint64_t> listeners;
				for (auto ino : socket_inodes(pid))
					if (all.count(ino))
						listeners.insert(ino);
				CHECK(listeners == std::set<std::uint64_t>{l.inode});
				workers++;
			}
		}
		std::size_t want = fds_ + extra_fds;
		settle_fds(want);
		std::map<int, std::string> now = brokerd_fds(b_.pid());
		std::size_t fds = now.size();
		CHECK_MESSAGE(fds == want, "brokerd holds ", fds, " fds, not ", want, "; at the start:\n", listing(start_fds_),
		              "now:\n", listing(now));
		std::size_t rss = rss_kb(b_.pid());
		CHECK_MESSAGE(rss <= rss_ + kRssMarginKb, "brokerd's RSS is ", rss, " kB, ", rss - rss_,
		              " kB over the start's");
		row(transition, workers);
	}

	// Every worker the fd-probe recorded, of every generation (including those of a failed
	// upgrade and those a rollback restored): fd 3 was the listener of the start.
	void check_probe_records()
	{
		for (const auto &s : served_) {
			std::map<int, int> per_generation;
			for (const ProbeRecord &rec : probe_records(b_.dir().path(), "probe-" + s.service)) {
				CAPTURE(rec.pid);
				int gen = std::stoi(rec.env.count("BROKER_GENERATION") ? rec.env.at("BROKER_GENERATION") : "0");
				per_generation[gen]++;
				std::string want = "socket:[" + std::to_string(bound_.at(s.service).inode) + "]";
				std::string got = rec.fds.count(3) ? rec.fds.at(3) : "nothing";
				CHECK_MESSAGE(got == want, s.service, " gen ", gen, " pid ", rec.pid, " got ", got, " at fd 3, not ", want);
				CHECK(rec.env.count("LISTEN_FDS") == 1);
			}
			std::printf("fd-probe records of %s (gen:workers): %s\n", s.service.c_str(), text_of(per_generation).c_str());
			CHECK_MESSAGE(per_generation == s.started, s.service, " workers exec'ed by generation: ",
			              text_of(per_generation), ", not ", text_of(s.started));
		}
	}

	void print_table() const
	{
		std::printf("\nbrokerd across transitions (start: %zu fds without timerfds, %zu kB RSS; margin +%zu kB)\n", fds_, rss_,
		            kRssMarginKb);
		std::printf("%-34s %8s %6s %9s %8s %8s\n", "after", "workers", "fds", "RSS kB", "delta", "at ms");
		for (const auto &r : rows_)
			std::printf("%-34s %8zu %6zu %9zu %+8lld %8lld\n", r.what.c_str(), r.workers, r.fds, r.rss,
			            static_cast<long long>(r.rss) - static_cast<long long>(rss_), r.ms);
		std::fflush(stdout);
	}

private:
	// brokerd closes a client's connection once it has seen the client close it, and a dropped
	// peer fd on its closer thread: the count settles on the event, not at once.
	void settle_fds(std::size_t want)
	{
		wait_until([&] { return brokerd_fds(b_.pid()).size() == want; }, 10s);
	}

	void row(const std::string &what, std::size_t workers)
	{
		auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - begin_).count();
		rows_.push_back({what, workers, brokerd_fds(b_.pid()).size(), rss_kb(b_.pid()), ms});
	}

	struct Row {
		std::string what;
		std::size_t workers, fds, rss;
		long long ms; // since the start
	};
	Clock::time_point begin_ = Clock::now();
	Broker &b_;
	std::vector<Served> &served_;
	std::map<std::string, Bound> bound_;
	std::map<int, std::string> start_fds_;
	std::size_t fds_ = 0, rss_ = 0;
	std::vector<Row> rows_;
};

} // namespace

TEST_CASE("transitions: every worker and brokerd keep the listener of the start through upgrades and reloads and reexec and rollback and restart")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	const std::string probe = fd_probe();
	json web = http_service(2, {{"drain", {{"timeout", "20s"}}}});
	web["exec"] = {probe, b.path("probe-web"), env("EXAMPLE_HTTP")};
	json py = python_service(2, {{"drain", {{"timeout", "20s"}}}, {"sockets", {"pysock"}}});
	py["exec"] = {probe, b.path("probe-py"), "python3", env("EXAMPLE_PYTHON")};
	json cfg = {{"sockets", {{"http", tcp_socket()}, {"pysock", tcp_socket()}}}, {"services", {{"web", web}, {"py", py}}}};
	tb.start(cfg, measured_env());
	std::vector<Served> served = {{"web", "http"}, {"py", "pysock"}};
	Served &w = served[0], &p = served[1];
	check_serves_alone(b, "web", 1, 2);
	check_serves_alone(b, "py", 1, 2);
	Identity id(b, served);
	id.baseline();
	std::uint16_t port = socket_port(b.status(), "http");
	Load load(b, port, "hello from web gen ", 50);
	auto next = [](Served &s) {
		s.generation = ++s.newest;
		s.started[s.generation] = 2;
	};

	// Upgrades: a client-lib worker, and a LISTEN_FDS one.
	load.begin_upgrade();
	brokerctl_ok(b, {"upgrade", "web"});
	next(w);
	id.check("upgrade web (client-lib)");
	brokerctl_ok(b, {"upgrade", "py"});
	next(p);
	id.check("upgrade py (LISTEN_FDS, notify)");

	// A handoff upgrade: connections the old generation answered are answered by the new one.
	std::vector<HttpConnection> held;
	for (int i = 0; i < 16; ++i) {
		held.emplace_back(port);
		REQUIRE(held.back().get("/").body.find("gen " + std::to_string(w.generation)) != std::string::npos);
	}
	brokerctl_ok(b, {"upgrade", "web"});
	next(w);
	int moved = 0;
	for (auto &c : held)
		moved += c.get("/").body.find("gen " + std::to_string(w.generation)) != std::string::npos;
	CHECK(moved == 16);
	held.clear();
	id.check("handoff upgrade web");

	// Reloads: one that keeps every socket, one that adds another socket, one that removes it.
	cfg["services"]["web"]["env"] = {{"RELEASE", "r2"}};
	write_config(b, cfg);
	json r = json::parse(brokerctl_ok(b, {"reload", "--json"}).out);
	CHECK(r["added_sockets"].empty());
	CHECK(r["removed_sockets"].empty());
	id.check("reload, sockets kept");
	cfg["sockets"]["extra"] = tcp_socket();
	write_config(b, cfg);
	r = json::parse(brokerctl_ok(b, {"reload", "--json"}).out);
	CHECK(r["added_sockets"] == json::array({"extra"}));
	std::uint16_t extra = socket_port(b.status(), "extra");
	CHECK(listening_on(extra).size() == 1);
	id.check("reload, socket added", 1);
	cfg["sockets"].erase("extra");
	write_config(b, cfg);
	r = json::parse(brokerctl_ok(b, {"reload", "--json"}).out);
	CHECK(r["removed_sockets"] == json::array({"extra"}));
	CHECK(wait_until([&] { return listening_on(extra).empty(); }, 10s));
	id.check("reload, socket removed");

	// brokerd re-executes itself.
	brokerctl_ok(b, {"reexec"});
	CHECK(b.status().value("pid", 0) == b.pid());
	id.check("reexec");

	// A failed upgrade: the first new instance serves, the second fails, and the rollback
	// starts an old-generation instance again in the first one's place.
	TempDir scratch;
	std::string worker = shell_quote(env("EXAMPLE_HTTP"));
	RunResult failed = brokerctl(b, {"upgrade", "web", "--exec", "--", probe, b.path("probe-web"), "/bin/sh", "-c",
	                                 "if mkdir " + shell_quote(scratch / "once") + " 2>/dev/null; then exec " +
	                                         worker + "; fi; exit 4"});
	INFO("brokerctl upgrade: ", failed.describe());
	CHECK(failed.exit_code == 6);
	w.started[++w.newest] = 2;
	w.started[w.generation]++;
	id.check("upgrade web rolled back");

	brokerctl_ok(b, {"rollback", "web"});
	next(w);
	id.check("rollback web");
	brokerctl_ok(b, {"restart", "web"});
	next(w);
	brokerctl_ok(b, {"restart", "py"});
	next(p);
	id.check("restart web and py");
	load.end_upgrade();

	id.check_probe_records();
	id.print_table();
	load.finish_and_check();
	b.stop();
}

namespace {

// What was seen of the ready count: its minimum and maximum over a number of samples.
struct Seen {
	bool of_status = true;  // false: counted from the events, not from Status
	std::size_t samples = 0;
	std::size_t during = 0; // Status samples taken while an upgrade was under way
	std::size_t min = SIZE_MAX, max = 0;
	std::set<int> generations; // of the ready instances
	std::string first_low;     // the first sample under the floor

	void add(std::size_t ready, std::size_t floor, const std::string &what)
	{
		samples++;
		min = std::min(min, ready);
		max = std::max(max, ready);
		if (ready < floor && first_low.empty())
			first_low = what;
	}
	std::string describe() const
	{
		return std::to_string(samples) + " samples" +
		       (of_status ? " (" + std::to_string(during) + " during an upgrade)" : std::string()) + ", ready " +
		       std::to_string(min) + " to " + std::to_string(max);
	}
};

void add_status(Seen &seen, const json &st, std::size_t floor)
{
	seen.add(ready_count(st, "web"), floor, st.dump());
	const json *svc = service_of(st, "web");
	if (svc && svc->contains("upgrade") && !(*svc)["upgrade"].is_null())
		seen.during++;
	if (svc)
		for (const auto &g : member(*svc, "generations"))
			for (const auto &i : member(g, "instances"))
				if (i.value("state", "") == "ready")
					seen.generations.insert(g.value("number", 0));
}

json status_on(proto::varlink::SyncClient &c)
{
	return c.call("io.brokerd.Control.Status", {{"service", "web"}}).body.value("parameters", json::object());
}

} // namespace

TEST_CASE("transitions: a rolling upgrade of 3 instances with batch 1 never has fewer than 3 ready")
{
	constexpr std::size_t kInstances = 3;
	constexpr int kUpgrades = 3;
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(kInstances, {{"upgrade", {{"batch", 1}}}, {"drain", {{"timeout", "20s"}}}})}}));
	check_serves_alone(b, "web", 1, kInstances);
	std::uint16_t port = socket_port(b.status(), "http");
	Load load(b, port, "hello from web gen ", 200);

	// The Watch is opened before brokerctl, a process started after, makes its call.
	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	std::map<std::string, std::string> states; // instance -> state, as the events tell it
	for (const auto &i : instances(b.status("web"), "web"))
		states[i.value("id", "")] = i.value("state", "");

	std::atomic<bool> stop{false};
	Seen polled;
	std::string sampler_error;
	std::thread sampler([&] {
		try {
			proto::varlink::SyncClient c(b.control_path(), 10s);
			while (!stop) {
				json st = status_on(c);
				add_status(polled, st, kInstances);
			}
		} catch (const std::exception &e) {
			sampler_error = e.what();
		}
	});

	// The Watch's events are read while the upgrades run: at each, a Status at once, and the
	// ready count as the events themselves tell it (every state change is one event, in order).
	Seen at_event, told;
	told.of_status = false;
	std::map<std::string, int> counts; // "event gen N" -> how many
	std::atomic<int> done{0};
	std::string watcher_error;
	std::thread watcher([&] {
		try {
			proto::varlink::SyncClient c(b.control_path(), 10s);
			while (done < kUpgrades) {
				auto e = watch.next(200ms);
				if (watch.ended())
					throw std::runtime_error("the Watch ended: " + watch.transcript());
				if (!e)
					continue;
				const json &ev = e->parameters;
				std::string event = ev.value("event", "");
				counts[event + " gen " + std::to_string(ev.value("generation", 0))]++;
				done += event == "done";
				if (ev.contains("instance") && ev.contains("state")) {
					states[ev["instance"].get<std::string>()] = ev["state"].get<std::string>();
					std::size_t ready = 0;
					for (const auto &[inst, state] : states)
						ready += state == "ready";
					told.add(ready, kInstances, ev.dump());
				}
				add_status(at_event, status_on(c), kInstances);
			}
		} catch (const std::exception &e) {
			watcher_error = e.what();
		}
	});

	load.begin_upgrade();
	for (int to = 2; to <= kUpgrades + 1; ++to) {
		CAPTURE(to);
		RunResult r = brokerctl(b, {"upgrade", "web"});
		INFO("brokerctl upgrade: ", r.describe());
		CHECK(r.exit_code == 0);
		check_serves_alone(b, "web", to, kInstances);
	}
	load.end_upgrade();
	bool all_done = wait_until([&] { return done == kUpgrades || !watcher_error.empty(); }, 30s);
	stop = true;
	sampler.join();
	if (!all_done)
		done = kUpgrades; // ends the watcher's loop
	watcher.join();

	REQUIRE(sampler_error.empty());
	REQUIRE_MESSAGE(watcher_error.empty(), watcher_error);
	REQUIRE_MESSAGE(all_done, "Watch:\n", watch.transcript());
	std::printf("\nready instances of web through %d rolling upgrades of %zu instances, batch 1:\n", kUpgrades, kInstances);
	std::printf("  Status polled as fast as it answers: %s\n", polled.describe().c_str());
	std::printf("  Status at each Watch event:          %s\n", at_event.describe().c_str());
	std::printf("  as the Watch events tell it:         %s\n", told.describe().c_str());
	std::fflush(stdout);
	for (const Seen *s : {&polled, &at_event, &told}) {
		CAPTURE(s->describe());
		CHECK_MESSAGE(s->first_low.empty(), "fewer than ", kInstances, " ready: ", s->first_low, "\nWatch:\n",
		              watch.transcript());
		CHECK(s->min == kInstances);
	}
	// One new instance is ready before each old one drains: never more than one over.
	CHECK(told.max == kInstances + 1);
	CHECK(polled.generations == std::set<int>{1, 2, 3, 4});
	CHECK(at_event.generations == std::set<int>{1, 2, 3, 4});
	// Every step of each upgrade was an event: each new instance started and got ready, each
	// old one drained and exited.
	for (int to = 2; to <= kUpgrades + 1; ++to) {
		CAPTURE(to);
		for (const char *event : {"started", "ready"})
			CHECK(counts["" + std::string(event) + " gen " + std::to_string(to)] == static_cast<int>(kInstances));
		for (const char *event : {"draining", "exited"})
			CHECK(counts[std::string(event) + " gen " + std::to_string(to - 1)] == static_cast<int>(kInstances));
	}
	std::set<int> gens = load.finish_and_check();
	CHECK(gens == std::set<int>{1, 2, 3, 4});
	b.stop();
}
