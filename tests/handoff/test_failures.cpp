// Connection handoff against real brokerd and real workers: receivers that die, refuse or are
// missing, and two receivers sharing the load. Every connection must be accounted for, seen
// closed cleanly or still served by the client, and brokerd must hold no fd it did not hold before.
#include "../upgrade/support.hpp"
#include "proto/handoff_channel.hpp"

#include <doctest/doctest.h>

#include <linux/capability.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <algorithm>
#include <filesystem>

using namespace utest;

namespace {

constexpr auto kDeadline = 60s;

// Every case runs twice (meson.build): on the direct channels, and with HANDOFF_PATH=broker on
// brokerd's own path, which workers of other libraries take.
bool brokered()
{
	const char *path = std::getenv("HANDOFF_PATH");
	return path && std::string(path) == "broker";
}

// brokerd_handoff_channels_total for the service, from Metrics: the direct channels it made.
std::uint64_t channels_made(Broker &b, const std::string &service)
{
	proto::varlink::SyncClient c(b.control_path(), 10s);
	std::string text = c.call("io.brokerd.Control.Metrics", json::object()).body["parameters"].value("text", "");
	std::string key = "brokerd_handoff_channels_total{service=\"" + service + "\"} ";
	auto at = text.find(key);
	REQUIRE_MESSAGE(at != std::string::npos, "no ", key, "in the metrics");
	return std::stoull(text.substr(at + key.size()));
}

json worker_service(int instances, const std::string &mode, const std::string &report_dir)
{
	json s = service({env("HANDOFF_WORKER")}, {"http"}, instances, "broker");
	s["env"] = {{"HT_MODE", mode}, {"HT_REPORT_DIR", report_dir}};
	s["handoff"] = brokered() ? "broker" : "direct";
	s["drain"] = {{"timeout", "60s"}};
	return s;
}

void raise_fd_limit()
{
	rlimit rl{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &rl) == 0);
	rl.rlim_cur = rl.rlim_max;
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &rl) == 0);
}

// What one client connection saw.
enum class Seen { Open, Eof, Reset, Data };

const char *name(Seen s)
{
	switch (s) {
	case Seen::Open:
		return "open";
	case Seen::Eof:
		return "EOF";
	case Seen::Reset:
		return "reset";
	case Seen::Data:
		return "unexpected data";
	}
	return "?";
}

// N client connections to the service, driven together with poll().
class Clients {
public:
	Clients(std::uint16_t port, std::size_t n)
	{
		for (std::size_t i = 0; i < n; i++)
			fds_.push_back(tcp_connect(port));
		in_.resize(n);
	}

	std::size_t size() const { return fds_.size(); }

	// Sends line to each connection in `which` and waits for one answer line from each; returns
	// them, or fails the test for any that closes or stays silent past the deadline.
	std::vector<std::string> exchange(const std::vector<std::size_t> &which, const std::string &line)
	{
		for (auto i : which)
			REQUIRE(::send(fds_[i].get(), line.data(), line.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(line.size()));
		std::vector<std::string> answers(which.size());
		std::vector<std::size_t> waiting(which.size());
		for (std::size_t k = 0; k < which.size(); k++)
			waiting[k] = k;
		auto deadline = Clock::now() + 30s;
		while (!waiting.empty()) {
			std::vector<pollfd> p;
			for (auto k : waiting)
				p.push_back({fds_[which[k]].get(), POLLIN, 0});
			auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
			REQUIRE_MESSAGE(left > 0, waiting.size(), " connections did not answer \"", line, "\" in time");
			REQUIRE(::poll(p.data(), p.size(), static_cast<int>(left)) >= 0);
			std::vector<std::size_t> still;
			for (std::size_t j = 0; j < waiting.size(); j++) {
				std::size_t k = waiting[j];
				std::size_t i = which[k];
				if (p[j].revents) {
					char buf[4096];
					ssize_t n = ::recv(fds_[i].get(), buf, sizeof buf, 0);
					REQUIRE_MESSAGE(n > 0, "connection ", i, " closed (", n < 0 ? std::strerror(errno) : "EOF",
					                ") instead of answering \"", line, "\"");
					in_[i].append(buf, static_cast<std::size_t>(n));
				}
				std::size_t nl = in_[i].find('\n');
				if (nl == std::string::npos) {
					still.push_back(k);
					continue;
				}
				answers[k] = in_[i].substr(0, nl);
				in_[i].erase(0, nl + 1);
			}
			waiting = std::move(still);
		}
		return answers;
	}

	std::vector<std::size_t> all() const
	{
		std::vector<std::size_t> v(fds_.size());
		for (std::size_t i = 0; i < v.size(); i++)
			v[i] = i;
		return v;
	}

	// What each connection shows now, without sending anything.
	std::vector<Seen> look()
	{
		std::vector<pollfd> p;
		for (const auto &fd : fds_)
			p.push_back({fd.get(), POLLIN, 0});
		REQUIRE(::poll(p.data(), p.size(), 0) >= 0);
		std::vector<Seen> out;
		for (std::size_t i = 0; i < fds_.size(); i++) {
			if (!p[i].revents) {
				out.push_back(Seen::Open);
				continue;
			}
			char c;
			ssize_t n = ::recv(fds_[i].get(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
			out.push_back(n == 0 ? Seen::Eof : n > 0 ? Seen::Data : errno == EAGAIN ? Seen::Open : Seen::Reset);
		}
		return out;
	}

	// Waits until `count` connections have seen EOF or a reset; returns what all of them show.
	std::vector<Seen> wait_closed(std::size_t count)
	{
		std::vector<Seen> seen;
		wait_until(
			[&] {
				seen = look();
				return static_cast<std::size_t>(std::count_if(seen.begin(), seen.end(), [](Seen s) {
					       return s == Seen::Eof || s == Seen::Reset;
				       })) >= count;
			},
			kDeadline);
		return seen;
	}

private:
	std::vector<UniqueFd> fds_;
	std::vector<std::string> in_;
};

std::size_t count(const std::vector<Seen> &seen, Seen what)
{
	return static_cast<std::size_t>(std::count(seen.begin(), seen.end(), what));
}

// A worker's own account, from its status text while it runs or its report once it exited.
// Whether this process (and so the brokerd it starts) has CAP_NET_ADMIN in effect.
bool has_net_admin()
{
	return (status_mask(::getpid(), "CapEff") >> CAP_NET_ADMIN & 1) != 0;
}

json worker_counts(const json &instance)
{
	json own = json::parse(instance.value("status", "{}"), nullptr, false);
	return own.is_object() ? own : json::object();
}

json read_report(const std::string &dir, pid_t pid)
{
	std::string path = dir + "/report-" + std::to_string(pid) + ".json";
	if (!std::filesystem::exists(path))
		return nullptr;
	return json::parse(read_file(path), nullptr, false);
}

std::string fd_listing(pid_t pid)
{
	std::string s;
	for (const auto &[fd, target] : proc_fds(pid))
		s += std::to_string(fd) + " -> " + target + "\n";
	return s;
}

// One test: brokerd with one service "echo" of the test worker, N connections made to it and
// answered once, and brokerd's fd count taken before any of it.
struct Setup {
	TestBroker tb;
	Broker &b = tb.b;
	std::string reports;
	std::size_t baseline = 0;
	std::string baseline_fds;
	std::uint16_t port = 0;
	std::vector<pid_t> senders;

	// soft_nofile: brokerd's RLIMIT_NOFILE soft limit, when not 0 (systemd starts services with 1024).
	explicit Setup(int instances, const json &env = json::object(), unsigned soft_nofile = 0)
	{
		raise_fd_limit();
		reports = b.path("reports");
		std::filesystem::create_directory(reports);
		json svc = worker_service(instances, "serve", reports);
		svc["env"].update(env);
		json config = config_with({{"echo", svc}});
		config["sockets"]["http"]["backlog"] = 4096;
		if (soft_nofile) {
			// As TestBroker::start, behind prlimit(1), which execs brokerd in place.
			BrokerOptions opts;
			opts.prefix = {"prlimit", "--nofile=" + std::to_string(soft_nofile) + ":", "env",
			               "NOTIFY_SOCKET=" + tb.notify.address()};
			opts.wait_ready = false;
			b.start(config, opts);
			REQUIRE_MESSAGE(tb.notify.wait_ready(20s), "brokerd sent no READY=1 within 20s");
		} else {
			tb.start(config);
		}
		// READY=1 came once every worker said Ready on its connection: nothing else is open now.
		baseline = fd_count(b.pid());
		baseline_fds = fd_listing(b.pid());
		json st = b.status("echo");
		port = socket_port(st, "http");
		senders = worker_pids(st, "echo");
		REQUIRE(senders.size() == static_cast<std::size_t>(instances));
	}

	// The upgrade to generation 2 with HT_MODE=mode; returns its last reply. The call's own
	// connection is closed when this returns.
	StreamCall::Reply upgrade(const std::string &mode, bool all_at_once = false, const json &env = json::object(),
	                          bool expect_progress = true, std::chrono::milliseconds deadline = kRolloutDeadline)
	{
		json e = env;
		e["HT_MODE"] = mode;
		json params = {{"service", "echo"}, {"env", e}};
		if (all_at_once)
			params["all_at_once"] = true;
		StreamCall call(b.control_path(), "io.brokerd.Control.Upgrade", params);
		StreamCall::Reply end = final_reply(call, deadline);
		std::string transcript = call.transcript();
		MESSAGE("upgrade to ", e.dump(), ": ", end.error.empty() ? "done" : end.error);
		bool migrating = transcript.find("migrating connections") != std::string::npos;
		if (expect_progress)
			CHECK_MESSAGE(migrating, "no handoff progress in the upgrade's replies:\n", transcript);
		return end;
	}

	// Waits for every sender to exit with its report, and returns the reports.
	std::vector<json> sender_reports()
	{
		std::vector<json> out;
		for (pid_t pid : senders) {
			json r;
			bool exited = wait_until([&] { return !(r = read_report(reports, pid)).is_null(); }, kDeadline);
			REQUIRE_MESSAGE(exited, "sender ", pid, " wrote no report within the deadline");
			REQUIRE(r.is_object());
			INFO("sender report: ", r.dump());
			CHECK(r["handed"].get<std::size_t>() == r["landed"].get<std::size_t>() + r["returned"].get<std::size_t>());
			CHECK(r["pending"] == 0);
			CHECK(r["open"] == 0);
			// Every returned connection was closed by the worker itself.
			CHECK(r["closed_returned"] == r["returned"]);
			out.push_back(r);
		}
		return out;
	}

	// Status's handoff counters once settled: handed = received + returned = expected.
	json settled_counts()
	{
		json h;
		bool settled = wait_until(
			[&] {
				json st = b.status("echo");
				const json *svc = service_of(st, "echo");
				// Absent until a Handoff call has arrived.
				h = svc ? svc->value("handoff", json({{"handed", 0}, {"received", 0}, {"returned", 0}, {"expected", 0}}))
				        : json();
				return h.is_object() && h["handed"] == h["expected"] &&
				       h["handed"].get<std::uint64_t>() ==
					       h["received"].get<std::uint64_t>() + h["returned"].get<std::uint64_t>();
			},
			kDeadline);
		INFO("Status handoff: ", h.dump());
		CHECK(settled);
		return h;
	}

	// brokerd's fds come back to what it held before the load, give or take the fds of
	// instances added or removed by the upgrade: its pidfd, stdout and stderr pipes and control
	// connection.
	void check_fds(int instances_added = 0)
	{
		constexpr int kFdsPerInstance = 4;
		std::size_t expected = baseline + static_cast<std::size_t>(instances_added * kFdsPerInstance);
		bool back = wait_until([&] { return fd_count(b.pid()) == expected; }, 20s);
		INFO("brokerd fds before the load:\n", baseline_fds, "now:\n", fd_listing(b.pid()));
		CHECK(back);
	}

	// The instances of the newest generation, each with its own counts, once they agree with
	// Status's per-instance counters.
	std::vector<json> receivers(std::size_t expected)
	{
		std::vector<json> out;
		bool agree = wait_until(
			[&] {
				json st = b.status("echo");
				out = generation_instances(st, "echo", newest_generation(st, "echo"));
				if (out.size() != expected)
					return false;
				for (const auto &inst : out) {
					json own = worker_counts(inst);
					std::uint64_t broker_says = inst.contains("handoff") ? inst["handoff"].value("received", 0u) : 0u;
					if (!own.is_object() || own.value("received", 0u) != broker_says)
						return false;
				}
				return true;
			},
			20s);
		INFO("receivers: ", json(out).dump());
		CHECK(agree);
		return out;
	}
};

// A receiver that takes nothing, or dies holding what it took: the connections it did not
// acknowledge go back to the sender, which closes each one cleanly, and the ones it took close
// with it. The client sees EOF on every one, never a reset. received_some: whether the receiver
// acknowledged any before it died.
void all_closed(const std::string &mode, std::size_t n, const json &env, bool expect_success, bool received_some)
{
	Setup s(1);
	BROKER_CONTEXT(s.b);
	Clients clients(s.port, n);
	auto answers = clients.exchange(clients.all(), "ping\n");
	for (const auto &a : answers)
		CHECK(a.find("gen 1 ") == 0);

	StreamCall::Reply end = s.upgrade(mode, false, env);
	if (expect_success)
		CHECK_MESSAGE(end.error.empty(), end.error, " ", end.parameters.dump());

	auto reports = s.sender_reports();
	json h = s.settled_counts();
	INFO("Status handoff: ", h.dump(), "; sender: ", reports[0].dump());
	CHECK(h["handed"] == n);
	CHECK(reports[0]["handed"] == n);
	CHECK(reports[0]["landed"] == h["received"]);
	CHECK(reports[0]["returned"] == h["returned"]);
	if (received_some)
		CHECK(h["received"].get<std::size_t>() > 0);
	else
		CHECK(h["received"] == 0);

	auto seen = clients.wait_closed(n);
	std::string odd;
	for (std::size_t i = 0; i < seen.size() && odd.size() < 200; i++)
		if (seen[i] != Seen::Eof)
			odd += " " + std::to_string(i) + ":" + name(seen[i]);
	INFO("connections that did not see EOF:", odd);
	CHECK(count(seen, Seen::Eof) == n);
	CHECK(count(seen, Seen::Reset) == 0);
	CHECK(count(seen, Seen::Data) == 0);

	s.check_fds();
	s.b.stop();
}

} // namespace

TEST_CASE("handoff: a receiver that dies mid-transfer")
{
	// The new instance _exits at the first batch it is given: the upgrade fails and rolls back,
	// and whatever it held comes back to the sender.
	all_closed("crash", 1000, json::object(), false, false);
}

TEST_CASE("handoff: a receiver that dies after taking some")
{
	// It acknowledges the first batch of 253, then dies in the middle of the second: the first
	// landed (and close with it), the rest go back.
	all_closed("crash", 1000, {{"HT_CRASH_AFTER", "300"}}, false, true);
}

TEST_CASE("handoff: a receiver whose Events connection falls 8 MiB behind")
{
	// It stops reading at the first batch and asks for replies it never reads: brokerd closes
	// its Events connection as too slow, and the batch it held comes back to the sender.
	all_closed("stall", 1000, json::object(), false, false);
}

TEST_CASE("handoff: a successor that does not accept handoffs")
{
	all_closed("refuse", 500, json::object(), true, false);
}

TEST_CASE("handoff: a successor without a connection handler")
{
	all_closed("nohandler", 500, json::object(), true, false);
}

TEST_CASE("handoff: a sender that dies mid-transfer")
{
	// It _exits as soon as handoff() returns, with batches still being written: batches of
	// about 140 KiB, so that the first fits in the socket's buffer and a later one is cut short.
	// What reached the successor is served there, the rest closes with the sender.
	const std::size_t n = 1000;
	Setup s(1, {{"HT_SENDER_EXIT", "1"}, {"HT_STATE_PAD", "400"}});
	BROKER_CONTEXT(s.b);
	Clients clients(s.port, n);
	clients.exchange(clients.all(), "ping\n");

	s.upgrade("serve", false, {{"HT_SENDER_EXIT", ""}, {"HT_STATE_PAD", ""}}, false);
	REQUIRE(wait_until([&] { return !process_exists(s.senders[0]); }, kDeadline));
	json h = s.settled_counts();
	std::size_t received = h["received"].get<std::size_t>();
	MESSAGE("Status handoff after the sender died: ", h.dump());
	CHECK(h["handed"].get<std::size_t>() <= n);

	auto seen = clients.wait_closed(n - received);
	INFO("Status handoff: ", h.dump());
	CHECK(count(seen, Seen::Open) == received);
	CHECK(count(seen, Seen::Eof) == n - received);
	CHECK(count(seen, Seen::Reset) == 0);
	CHECK(count(seen, Seen::Data) == 0);
	std::vector<std::size_t> open;
	for (std::size_t i = 0; i < seen.size(); i++)
		if (seen[i] == Seen::Open)
			open.push_back(i);
	auto answers = clients.exchange(open, "again\n");
	std::size_t carried = 0;
	for (const auto &a : answers)
		carried += a.find("gen 2 ") == 0 && a.find(" seq 2: again") != std::string::npos;
	CHECK(carried == open.size());

	auto rx = s.receivers(1);
	CHECK(worker_counts(rx.at(0)).value("received", 0u) == received);
	s.check_fds();
	s.b.stop();
}

TEST_CASE("handoff: connections carry on with their state in the successor")
{
	const std::size_t n = 1000;
	Setup s(1, {{"HT_STATE_PAD", "16000"}});
	BROKER_CONTEXT(s.b);
	Clients clients(s.port, n);
	clients.exchange(clients.all(), "ping\n");

	StreamCall::Reply end = s.upgrade("serve");
	CHECK_MESSAGE(end.error.empty(), end.error, " ", end.parameters.dump());
	auto reports = s.sender_reports();
	json h = s.settled_counts();
	CHECK(h["handed"] == n);
	CHECK(h["received"] == n);
	CHECK(h["returned"] == 0);
	CHECK(reports[0]["landed"] == n);

	auto seen = clients.look();
	CHECK(count(seen, Seen::Open) == n);
	// Served by generation 2, with the line count carried over in the state.
	auto answers = clients.exchange(clients.all(), "again\n");
	std::size_t carried = 0;
	for (const auto &a : answers)
		carried += a.find("gen 2 ") == 0 && a.find(" seq 2: again") != std::string::npos;
	INFO("first answer: ", answers.empty() ? "" : answers[0]);
	CHECK(carried == n);

	auto rx = s.receivers(1);
	CHECK(worker_counts(rx.at(0)).value("received", 0u) == n);
	s.check_fds();
	// The receiver hands its n connections, 16 KB of state each, back through brokerd on the way
	// out, as in the fan-in case below: bounded by its drain timeout, not by stop()'s 20 s.
	s.b.stop(kDeadline + 30s);
}

TEST_CASE("handoff: two receivers share the connections evenly")
{
	const std::size_t n = 1000;
	Setup s(2);
	BROKER_CONTEXT(s.b);
	Clients clients(s.port, n);
	clients.exchange(clients.all(), "ping\n");

	// All at once: both new instances are ready before either old one drains.
	// What is checked is that nothing is lost, not how fast: under AddressSanitizer, 2000
	// connections with 16 KB of state each (32 MB of base64, parsed and built twice) take about
	// 40 s alone, and more than a minute beside the rest of the suite on 2 cores.
	StreamCall::Reply end = s.upgrade("serve", true, json::object(), true, kRolloutDeadline + 90s);
	CHECK_MESSAGE(end.error.empty(), end.error, " ", end.parameters.dump());
	auto reports = s.sender_reports();
	json h = s.settled_counts();
	CHECK(h["handed"] == n);
	CHECK(h["received"] == n);
	CHECK(h["returned"] == 0);
	std::size_t landed = 0, batches = 0;
	for (const auto &r : reports) {
		landed += r["landed"].get<std::size_t>();
		batches += (r["handed"].get<std::size_t>() + 252) / 253;
	}
	CHECK(landed == n);

	auto rx = s.receivers(2);
	std::size_t a = worker_counts(rx.at(0)).value("received", 0u);
	std::size_t b = worker_counts(rx.at(1)).value("received", 0u);
	MESSAGE("receivers got ", a, " and ", b, " of ", n, " in ", batches, " batches");
	CHECK(a + b == n);
	if (brokered()) {
		// Each batch splits evenly, its odd one rotating: they differ by at most one per batch.
		CHECK((a > b ? a - b : b - a) <= batches);
		CHECK(channels_made(s.b, "echo") == 0);
	} else {
		// Frames go to the channels in turn, skipping one that is full: both take a share, on
		// one channel per sender and receiver.
		CHECK(a > 0);
		CHECK(b > 0);
		CHECK(channels_made(s.b, "echo") == 4);
		// The senders' ends have room for 1 MiB of frames in flight (getsockopt says twice what
		// was set), where the default 208 KiB holds only a dozen frames of 253 connections with
		// 64 bytes of state: brokerd forces it when it has CAP_NET_ADMIN, as it has ours. The
		// receivers' ends, which write only acknowledgements, keep the default.
		for (const auto &r : reports)
			CHECK(r.value("channel_sndbuf", -1L) ==
			      (has_net_admin() ? 2L * proto::handoff::channel::kChannelBuffer : r.value("channel_sndbuf", -1L)));
		for (const auto &r : rx)
			CHECK(worker_counts(r).value("channel_sndbuf", -1L) < 2L * proto::handoff::channel::kChannelBuffer);
	}

	auto answers = clients.exchange(clients.all(), "again\n");
	std::size_t gen2 = 0;
	for (const auto &x : answers)
		gen2 += x.find("gen 2 ") == 0 && x.find(" seq 2: again") != std::string::npos;
	CHECK(gen2 == n);
	s.check_fds();
	s.b.stop();
}

namespace {

// Both old instances of s hand their n connections to the one instance of generation 2, and
// every connection lands.
void fan_in(Setup &s, std::size_t n)
{
	Clients clients(s.port, n);
	clients.exchange(clients.all(), "ping\n");
	// Generation 2 has one instance: the upgrade reads the config again.
	json config = json::parse(read_file(s.b.config_path()));
	config["services"]["echo"]["instances"] = 1;
	write_file(s.b.config_path(), config.dump());

	// What is checked is that nothing is lost, not how fast: under AddressSanitizer, 2000
	// connections with 16 KB of state each (32 MB of base64, parsed and built twice) take about
	// 40 s alone, and more than a minute beside the rest of the suite on 2 cores.
	StreamCall::Reply end = s.upgrade("serve", true, json::object(), true, kRolloutDeadline + 90s);
	CHECK_MESSAGE(end.error.empty(), end.error, " ", end.parameters.dump());
	auto reports = s.sender_reports();
	json h = s.settled_counts();
	MESSAGE("Status handoff: ", h.dump());
	CHECK(h["handed"] == n);
	CHECK(h["received"] == n);
	CHECK(h["returned"] == 0);

	auto seen = clients.look();
	CHECK(count(seen, Seen::Open) == n);
	auto rx = s.receivers(1);
	CHECK(worker_counts(rx.at(0)).value("received", 0u) == n);
	s.check_fds(-1);
	// On the way out the receiver hands its n connections, 16 KB of state each with large
	// states, back through brokerd to nobody: under ASan that alone takes tens of seconds. Its
	// drain timeout (kDeadline) bounds it.
	s.b.stop(kDeadline + 30s);
}

} // namespace

TEST_CASE("handoff: two senders with large states hand to one receiver")
{
	// 2 x 8 batches of about 1 MiB in flight towards one instance: more than a control
	// connection's write queue holds, so the broker must not simply give up on the receiver.
	Setup s(2, {{"HT_STATE_PAD", "16000"}});
	BROKER_CONTEXT(s.b);
	fan_in(s, 2000);
}

TEST_CASE("handoff: brokerd started with systemd's default fd limit")
{
	// A service's soft RLIMIT_NOFILE is 1024 under systemd unless raised. The broker holds a
	// sender's fds until the receiver's socket takes them: 2 x 8 batches of 253 in flight
	// towards one receiver.
	Setup s(2, json::object(), 1024);
	BROKER_CONTEXT(s.b);
	// brokerd raises its own soft limit to the hard one.
	std::string limits = read_file("/proc/" + std::to_string(s.b.pid()) + "/limits");
	INFO("brokerd's limits:\n", limits);
	CHECK(limits.find("Max open files            1024 ") == std::string::npos);
	fan_in(s, 2000);
}
