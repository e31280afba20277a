// SIGKILL of brokerd in the middle of a connection handoff, under load: the batches its senders
// had handed and its receivers had not acknowledged are in doubt, and the restarted brokerd
// settles them from what both sides say (Worker.Resume). Every connection is answered once, by
// the receiver that has it or by its sender; none is lost, none served twice.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <csignal>

using namespace utest;
using namespace utest::handoff;

namespace {

constexpr std::size_t kConnections = 2000;
// Every connection holds part of a request's headers: 0.6 kB of state each, 0.8 kB in base64.
// brokerd forwards a chunk of some 125 of them (100 kB) in one message; a stopped receiver's
// socket takes one or two, and the rest wait in brokerd's memory: those die with it, and only
// their senders still have them.
const std::string kBigHalf = kRequest.substr(0, kRequest.size() - 2) + "X-Padding: " + std::string(600, 'p');
const std::string kBigRest = "\r\n\r\n";

// Status's account of the handoffs in doubt.
json in_doubt(Broker &b)
{
	json st = b.status();
	const json &rec = member(st, "recovered");
	return rec.is_object() ? rec.value("in_doubt", json::object()) : json::object();
}

void signal_all(const std::vector<pid_t> &pids, int sig)
{
	for (pid_t p : pids)
		REQUIRE_MESSAGE(::kill(p, sig) == 0, "kill(", p, ", ", sig, "): ", std::strerror(errno));
}

bool is_event(const StreamCall::Reply &r, const char *event, int generation)
{
	return r.parameters.value("event", "") == event && r.parameters.value("generation", 0) == generation;
}

} // namespace

TEST_CASE("crash: SIGKILL of brokerd mid-handoff of 2000 keep-alive connections under load: restarted it settles every batch in doubt and each connection is answered once")
{
	take_nofile_limit(kConnections);
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	// "aux" comes before "web" in brokerd's books: its worker, killed while brokerd is down, is
	// found gone before web's workers are found again, and must not close the books on the
	// handoffs in doubt before they are opened.
	// On brokerd's path: only there does brokerd hold batches that its death leaves in doubt.
	std::uint16_t port = start_web(
		tb, {{"aux", {{"exec", {"/bin/sleep", "1000"}}, {"sockets", json::array()}, {"ready", "exec"}}}}, "broker");
	// brokerd's fds and memory as it serves, before any connection.
	auto idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	const std::size_t start_fds = idle->size();
	const std::size_t start_rss = rss_kb(b.pid());

	// Established and idle at generation 1, then handed to generation 2 in a first upgrade: its
	// instances remember receiving them from instances that are gone by the time they say so.
	Clients clients(kConnections);
	Tally opening;
	clients.open_all(port, opening);
	answers_by_pid(clients, opening, 1, [](const Answer &) { return true; });
	INFO("opening: ", opening.describe());
	REQUIRE(opening.failures() == 0);
	upgrade(b, "web");
	check_serves_alone(b, "web", 2, 2);
	const std::vector<pid_t> old_pids = running_pids(b.status(), "web");
	REQUIRE(old_pids.size() == 2);
	const HandoffCounts first = handoff_counts(b.status("web"), "web");
	CHECK(first.received == kConnections);
	std::size_t halves = send_half_requests(port, clients, 1, kBigHalf);

	Load load(b, port, "hello from web gen ", 100);
	load.begin_upgrade();
	StreamCall watch(b.control_path(), "io.brokerd.Control.Watch", {{"service", "web"}});
	StreamCall rollout(b.control_path(), "io.brokerd.Control.Upgrade", {{"service", "web"}});
	// The senders wait, stopped, until both receivers are ready and both senders told to drain;
	// then the receivers stop, and the senders hand everything to a brokerd that can forward it
	// but hear no acknowledgement: every batch is in flight when brokerd dies.
	REQUIRE(watch.until([](const StreamCall::Reply &r) { return is_event(r, "started", 3); }, kRolloutDeadline));
	signal_all(old_pids, SIGSTOP);
	int draining = 0;
	REQUIRE_MESSAGE(watch.until([&](const StreamCall::Reply &r) { return is_event(r, "draining", 2) && ++draining == 2; },
	                            kRolloutDeadline),
	                watch.transcript());
	json st = b.status("web");
	std::vector<pid_t> new_pids;
	for (const json &inst : generation_instances(st, "web", 3)) {
		CHECK(inst.value("state", "") == "ready");
		new_pids.push_back(inst.value("pid", 0));
	}
	std::sort(new_pids.begin(), new_pids.end());
	REQUIRE(new_pids.size() == 2);
	signal_all(new_pids, SIGSTOP);
	signal_all(old_pids, SIGCONT);
	HandoffCounts before{};
	bool handed = wait_until(
		[&] {
			before = handoff_counts(b.status("web"), "web");
			return before.handed >= first.handed + kConnections;
		},
		30s);
	INFO("handed ", before.handed, ", received ", before.received, ", returned ", before.returned);
	REQUIRE(handed);
	// The receivers never acknowledged: nothing has landed or come back yet.
	CHECK(before.received == first.received);
	CHECK(before.returned == first.returned);

	const std::vector<pid_t> aux = running_pids(b.status(), "aux");
	REQUIRE(aux.size() == 1);
	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("survivors of brokerd:\n", describe(survivors));
	REQUIRE(kill9(aux[0]));
	REQUIRE(wait_until([&] { return !process_exists(aux[0]); }, 10s));
	// The receivers read what reached them, serve it, and find brokerd gone.
	signal_all(new_pids, SIGCONT);
	tb.restart();

	// Both senders and both receivers said their part: every batch is settled, and nothing
	// had to be abandoned.
	json doubt;
	bool settled = wait_until(
		[&] {
			doubt = in_doubt(b);
			std::uint64_t n = count_of(doubt, "connections");
			return n >= before.handed - first.handed && count_of(doubt, "pending") == 0 &&
			       count_of(doubt, "landed") + count_of(doubt, "returned") + count_of(doubt, "abandoned") == n;
		},
		30s);
	INFO("in doubt after the restart: ", doubt.dump());
	REQUIRE(settled);
	CHECK(count_of(doubt, "batches") >= 2);
	CHECK(count_of(doubt, "abandoned") == 0);
	// Some reached a receiver before brokerd died; the others were still in brokerd.
	CHECK(count_of(doubt, "landed") > 0);
	const std::uint64_t returned = count_of(doubt, "returned");
	CHECK(returned > 0);
	json rec = member(b.status(), "recovered");
	CHECK(rec.value("interrupted", json::array()) == json{"web: an upgrade the crash interrupted: completed at gen 3"});
	CHECK(rec.value("lost", json::array()) == json{"aux/1/0"});

	// The rest of each request, on the same connections: a connection that landed is answered
	// by generation 3 and kept; one that came back, by its sender, which closes it after.
	for (std::size_t i = 0; i < clients.size(); i++)
		clients.request(i, kBigRest);
	Tally after;
	clients.run(after);
	std::size_t by_new = 0, by_old = 0, closed_after = 0;
	for (std::size_t i = 0; i < clients.size(); i++) {
		const Answer &a = clients[i].answer;
		if (a.status == 0)
			continue; // no answer: the tally has it as a reset, an end of stream or a timeout
		bool is_new = std::binary_search(new_pids.begin(), new_pids.end(), a.pid);
		bool is_old = std::find(old_pids.begin(), old_pids.end(), a.pid) != old_pids.end();
		if (a.status == 200 && a.generation == 3 && a.keep_alive && is_new && clients[i].phase == Clients::Phase::Idle) {
			by_new++;
		} else if (a.status == 200 && a.generation == 2 && !a.keep_alive && is_old) {
			by_old++;
			closed_after += clients[i].phase == Clients::Phase::Dead;
		} else {
			after.note(after.wrong, i, "status " + std::to_string(a.status) + ", gen " + std::to_string(a.generation) +
			                                   ", pid " + std::to_string(a.pid));
		}
	}
	MESSAGE("after the restart: ", by_new, " answered by the receivers, ", by_old, " by their senders; ", halves,
	        " held part of a request; in doubt: ", doubt.dump());
	INFO("after the restart: ", after.describe());
	// A connection that came back is closed by its sender after its answer: that end is no
	// failure, and it is the only one.
	CHECK(after.resets + after.connect_errors + after.wrong + after.timeouts == 0);
	CHECK(after.eofs == closed_after);
	CHECK(by_new + by_old == kConnections);
	CHECK(by_old <= returned);

	// The senders exit once settled; the receivers are the ones that crossed the crash.
	check_serves_alone(b, "web", 3, 2);
	CHECK(running_pids(b.status(), "web") == new_pids);
	load.end_upgrade();

	// An upgrade after it works, handing the connections on again.
	RunResult up = brokerctl(b, {"upgrade", "web"});
	INFO("brokerctl upgrade: ", up.describe());
	CHECK(up.exit_code == 0);
	check_serves_alone(b, "web", 4, 2);
	CHECK(generation_answering(port) == 4);
	load.finish_and_check();
	// Once settled, brokerd holds what the first one held but its sentinel's pidfd (the
	// sentinel is not the restarted brokerd's child), and about as much memory.
	bool settled_fds = wait_until([&] { return (idle = idle_fds(b.pid(), 1s)) && idle->size() + 1 == start_fds; }, 15s);
	CHECK_MESSAGE(settled_fds, "brokerd holds ", idle ? idle->size() : 0, " fds once settled, not ", start_fds - 1, ":\n",
	              idle ? listing(*idle) : std::string("(never idle)"));
	std::size_t rss = rss_kb(b.pid());
	MESSAGE("brokerd's VmRSS: ", start_rss, " kB at the first start, ", rss, " kB once settled after the restart");
#if !defined(__SANITIZE_ADDRESS__)
	// AddressSanitizer keeps what is freed in its quarantine (up to 256 MB) rather than giving it
	// back: brokerd's memory then grows with the megabytes of handoff events it handled, and its
	// LeakSanitizer, at brokerd's exit, is what finds a leak there.
	CHECK(rss <= start_rss + kRssMarginKb);
#endif
	std::vector<StrayProcess> orphans = b.end_survivors();
	INFO("left of the killed brokerd's workers:\n", describe(orphans));
	CHECK(orphans.empty());
	b.stop();
}
