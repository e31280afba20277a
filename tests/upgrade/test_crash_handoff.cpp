// brokerd killed, or re-executed, in the middle of a connection handoff under load. On brokerd's
// path the batches its senders had handed and its receivers had not acknowledged are in doubt,
// and the restarted brokerd settles them from what both sides say (Worker.Resume). On the direct
// channels brokerd holds nothing of a handoff: the workers finish it without brokerd. Either way
// every connection is answered once, by the receiver that has it or by its sender; none is lost,
// none served twice.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <csignal>
#include <optional>

using namespace utest;
using namespace utest::handoff;

namespace {

constexpr std::size_t kConnections = 2000;
// Every connection holds part of a request's headers: 0.6 kB of state each, 0.8 kB in base64.
// On brokerd's path, brokerd forwards a chunk of some 125 of them (100 kB) in one message; a
// stopped receiver's socket takes one or two, and the rest wait in brokerd's memory: those die
// with it, and only their senders still have them.
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

// Status `recovered.in_doubt` with nothing in it: no batch was in flight through brokerd.
bool nothing_in_doubt(const json &doubt)
{
	for (const char *key : {"batches", "connections", "landed", "returned", "abandoned", "pending"})
		if (count_of(doubt, key) != 0)
			return false;
	return true;
}

// The upgrade from generation 2 to 3 of "web" under load, held in the middle of its handoff:
// 2000 keep-alive connections, established at generation 1 and handed to generation 2 in a
// first upgrade (its instances remember receiving them from instances gone since), each then
// holding part of a request. The senders (generation 2) wait, stopped, until both receivers
// are ready and both senders told to drain; then the receivers stop and the senders go on:
// whatever they hand from then on waits, unacknowledged.
struct MidHandoff {
	Broker &b;
	std::uint16_t port = 0;
	std::size_t start_fds = 0; // brokerd's, as it serves before any connection
	std::size_t start_rss = 0;
	Clients clients{kConnections};
	std::size_t halves = 0;
	HandoffCounts first; // after the first upgrade
	std::vector<pid_t> old_pids, new_pids; // the senders and the receivers, sorted
	std::optional<Load> load;
	std::optional<StreamCall> watch, rollout;

	// `handoff`: the service's path, as start_web() takes it; `others`: services beside web.
	MidHandoff(TestBroker &tb, const json &others, const std::string &handoff);
	// The answers to the rest of each request, on the same connections (they come after the
	// handoff settled): a connection that landed is answered by generation 3 and kept; one that
	// came back, by its sender, which closes it after. Anything else is noted in `after`.
	struct Answers {
		std::size_t by_new = 0, by_old = 0;
		std::size_t closed_after = 0; // by_old whose connection then ended
	};
	Answers rest_of_requests(Tally &after);
	// Once generation 3 serves alone: an upgrade to 4 works, handing the connections on again,
	// the load saw no failure, and brokerd holds what it held at the start but `fds_gone` and
	// about as much memory.
	void upgrade_after(std::size_t fds_gone);
};

MidHandoff::MidHandoff(TestBroker &tb, const json &others, const std::string &handoff) : b(tb.b)
{
	take_nofile_limit(kConnections); // before brokerd starts: it and its workers inherit it
	port = start_web(tb, others, handoff);
	auto idle = idle_fds(b.pid());
	REQUIRE_MESSAGE(idle, "brokerd did not sleep in its event loop within 10 s of READY=1");
	start_fds = idle->size();
	start_rss = rss_kb(b.pid());

	Tally opening;
	clients.open_all(port, opening);
	answers_by_pid(clients, opening, 1, [](const Answer &) { return true; });
	INFO("opening: ", opening.describe());
	REQUIRE(opening.failures() == 0);
	upgrade(b, "web");
	check_serves_alone(b, "web", 2, 2);
	old_pids = running_pids(b.status(), "web");
	REQUIRE(old_pids.size() == 2);
	first = handoff_counts(b.status("web"), "web");
	CHECK(first.received == kConnections);
	halves = send_half_requests(port, clients, 1, kBigHalf);

	load.emplace(b, port, "hello from web gen ", 100);
	load->begin_upgrade();
	watch.emplace(b.control_path(), "io.brokerd.Control.Watch", json{{"service", "web"}});
	rollout.emplace(b.control_path(), "io.brokerd.Control.Upgrade", json{{"service", "web"}});
	REQUIRE(watch->until([](const StreamCall::Reply &r) { return is_event(r, "started", 3); }, kRolloutDeadline));
	signal_all(old_pids, SIGSTOP);
	int draining = 0;
	REQUIRE_MESSAGE(watch->until([&](const StreamCall::Reply &r) { return is_event(r, "draining", 2) && ++draining == 2; },
	                             kRolloutDeadline),
	                watch->transcript());
	json st = b.status("web");
	for (const json &inst : generation_instances(st, "web", 3)) {
		CHECK(inst.value("state", "") == "ready");
		new_pids.push_back(inst.value("pid", 0));
	}
	std::sort(new_pids.begin(), new_pids.end());
	REQUIRE(new_pids.size() == 2);
	signal_all(new_pids, SIGSTOP);
	signal_all(old_pids, SIGCONT);
}

MidHandoff::Answers MidHandoff::rest_of_requests(Tally &after)
{
	for (std::size_t i = 0; i < clients.size(); i++)
		clients.request(i, kBigRest);
	clients.run(after);
	Answers out;
	for (std::size_t i = 0; i < clients.size(); i++) {
		const Answer &a = clients[i].answer;
		if (a.status == 0)
			continue; // no answer: the tally has it as a reset, an end of stream or a timeout
		bool is_new = std::binary_search(new_pids.begin(), new_pids.end(), a.pid);
		bool is_old = std::binary_search(old_pids.begin(), old_pids.end(), a.pid);
		if (a.status == 200 && a.generation == 3 && a.keep_alive && is_new && clients[i].phase == Clients::Phase::Idle) {
			out.by_new++;
		} else if (a.status == 200 && a.generation == 2 && !a.keep_alive && is_old) {
			out.by_old++;
			out.closed_after += clients[i].phase == Clients::Phase::Dead;
		} else {
			after.note(after.wrong, i, "status " + std::to_string(a.status) + ", gen " + std::to_string(a.generation) +
			                                   ", pid " + std::to_string(a.pid));
		}
	}
	return out;
}

void MidHandoff::upgrade_after(std::size_t fds_gone)
{
	watch.reset(); // their control connections were not there at the start
	rollout.reset();
	load->end_upgrade();
	RunResult up = brokerctl(b, {"upgrade", "web"});
	INFO("brokerctl upgrade: ", up.describe());
	CHECK(up.exit_code == 0);
	check_serves_alone(b, "web", 4, 2);
	CHECK(generation_answering(port) == 4);
	load->finish_and_check();
	std::optional<std::map<int, std::string>> idle;
	bool settled_fds =
		wait_until([&] { return (idle = idle_fds(b.pid(), 1s)) && idle->size() + fds_gone == start_fds; }, 15s);
	CHECK_MESSAGE(settled_fds, "brokerd holds ", idle ? idle->size() : 0, " fds once settled, not ", start_fds - fds_gone,
	              ":\n", idle ? listing(*idle) : std::string("(never idle)"));
	std::size_t rss = rss_kb(b.pid());
	MESSAGE("brokerd's VmRSS: ", start_rss, " kB at the start, ", rss, " kB once settled");
#if !defined(__SANITIZE_ADDRESS__)
	// AddressSanitizer keeps what is freed in its quarantine (up to 256 MB) rather than giving it
	// back: brokerd's memory then grows with the megabytes of handoff events it handled, and its
	// LeakSanitizer, at brokerd's exit, is what finds a leak there.
	CHECK(rss <= start_rss + kRssMarginKb);
#endif
}

// On the direct channels every connection landed in a receiver, which answers the rest of its
// request and keeps it: none is answered by a sender, none fails.
void all_landed(MidHandoff &m, const char *after_what)
{
	Tally after;
	MidHandoff::Answers answers = m.rest_of_requests(after);
	MESSAGE("after ", after_what, ": ", answers.by_new, " answered by the receivers, ", answers.by_old,
	        " by their senders; ", m.halves, " held part of a request");
	INFO("after ", after_what, ": ", after.describe());
	CHECK(after.failures() == 0);
	CHECK(answers.by_new == kConnections);
	CHECK(answers.by_old == 0);
}

// Nothing is left of the killed brokerd's workers that the restarted one did not take.
void check_no_orphans(Broker &b)
{
	std::vector<StrayProcess> orphans = b.end_survivors();
	INFO("left of the killed brokerd's workers:\n", describe(orphans));
	CHECK(orphans.empty());
}

// On the direct channels, with the receivers stopped: both senders wrote frames that wait in
// the channels, unacknowledged (each told brokerd what it sent, Worker.Handed). Returns the
// service's counts then.
HandoffCounts frames_wait_in_channels(MidHandoff &m)
{
	auto sent_by = [&](const json &st, pid_t pid) {
		for (const json &inst : generation_instances(st, "web", 2))
			if (inst.value("pid", 0) == pid)
				return count_of(inst.value("handoff", json::object()), "handed");
		return std::uint64_t{0};
	};
	json st;
	bool sent = wait_until(
		[&] {
			st = m.b.status("web");
			return std::all_of(m.old_pids.begin(), m.old_pids.end(), [&](pid_t p) { return sent_by(st, p) > 0; });
		},
		30s);
	INFO("Status: ", st.dump());
	REQUIRE_MESSAGE(sent, "both senders did not say they wrote frames within 30 s");
	HandoffCounts now = handoff_counts(st, "web");
	// The receivers never acknowledged: nothing has landed or come back yet.
	CHECK(now.received == m.first.received);
	CHECK(now.returned == m.first.returned);
	return now;
}

} // namespace

TEST_CASE("crash: SIGKILL of brokerd mid-handoff of 2000 keep-alive connections under load: restarted it settles every batch in doubt and each connection is answered once")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	// "aux" comes before "web" in brokerd's books: its worker, killed while brokerd is down, is
	// found gone before web's workers are found again, and must not close the books on the
	// handoffs in doubt before they are opened.
	// On brokerd's path: only there does brokerd hold batches that its death leaves in doubt.
	MidHandoff m(tb, {{"aux", {{"exec", {"/bin/sleep", "1000"}}, {"sockets", json::array()}, {"ready", "exec"}}}},
	             "broker");
	// The senders hand everything to a brokerd that can forward it but hear no
	// acknowledgement: every batch is in flight when brokerd dies.
	HandoffCounts before{};
	bool handed = wait_until(
		[&] {
			before = handoff_counts(b.status("web"), "web");
			return before.handed >= m.first.handed + kConnections;
		},
		30s);
	INFO("handed ", before.handed, ", received ", before.received, ", returned ", before.returned);
	REQUIRE(handed);
	// The receivers never acknowledged: nothing has landed or come back yet.
	CHECK(before.received == m.first.received);
	CHECK(before.returned == m.first.returned);

	const std::vector<pid_t> aux = running_pids(b.status(), "aux");
	REQUIRE(aux.size() == 1);
	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("survivors of brokerd:\n", describe(survivors));
	REQUIRE(kill9(aux[0]));
	REQUIRE(wait_until([&] { return !process_exists(aux[0]); }, 10s));
	// The receivers read what reached them, serve it, and find brokerd gone.
	signal_all(m.new_pids, SIGCONT);
	tb.restart();

	// Both senders and both receivers said their part: every batch is settled, and nothing
	// had to be abandoned.
	json doubt;
	bool settled = wait_until(
		[&] {
			doubt = in_doubt(b);
			std::uint64_t n = count_of(doubt, "connections");
			return n >= before.handed - m.first.handed && count_of(doubt, "pending") == 0 &&
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

	Tally after;
	MidHandoff::Answers answers = m.rest_of_requests(after);
	MESSAGE("after the restart: ", answers.by_new, " answered by the receivers, ", answers.by_old, " by their senders; ",
	        m.halves, " held part of a request; in doubt: ", doubt.dump());
	INFO("after the restart: ", after.describe());
	// A connection that came back is closed by its sender after its answer: that end is no
	// failure, and it is the only one.
	CHECK(after.resets + after.connect_errors + after.wrong + after.timeouts == 0);
	CHECK(after.eofs == answers.closed_after);
	CHECK(answers.by_new + answers.by_old == kConnections);
	CHECK(answers.by_old <= returned);

	// The senders exit once settled; the receivers are the ones that crossed the crash.
	check_serves_alone(b, "web", 3, 2);
	CHECK(running_pids(b.status(), "web") == m.new_pids);
	// Once settled, brokerd holds what the first one held but its sentinel's pidfd (the
	// sentinel is not the restarted brokerd's child).
	m.upgrade_after(1);
	check_no_orphans(b);
	b.stop();
}

// The twin on the direct channels: brokerd never holds a connection of the handoff, so its death
// leaves nothing in doubt, and the workers finish the handoff while it is down.
TEST_CASE("crash: SIGKILL of brokerd mid-handoff of 2000 keep-alive connections under load on the direct channels: the workers finish it without brokerd; nothing is in doubt and each connection is answered once")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	MidHandoff m(tb, json::object(), "direct");
	const HandoffCounts before = frames_wait_in_channels(m);
	MESSAGE("in the channels when brokerd dies: ", before.handed - m.first.handed, " connections, none acknowledged");

	std::vector<StrayProcess> survivors = tb.kill9();
	INFO("survivors of brokerd:\n", describe(survivors));
	// The receivers read the frames waiting for them and acknowledge them; the senders write
	// the rest and, all landed, exit: the handoff completes before any brokerd is back.
	// 20 s: well before the senders' drain deadline (30 s, start_web()), which would end them
	// too, with what they still hold.
	signal_all(m.new_pids, SIGCONT);
	bool senders_gone = wait_until(
		[&] { return std::none_of(m.old_pids.begin(), m.old_pids.end(), [](pid_t p) { return process_exists(p); }); },
		20s);
	REQUIRE_MESSAGE(senders_gone, "the senders did not finish their handoff while brokerd was down");
	CHECK(std::all_of(m.new_pids.begin(), m.new_pids.end(), [](pid_t p) { return process_exists(p); }));
	tb.restart();

	// Only the receivers are left to reconnect, and they say nothing is in doubt.
	const std::string reconnected = "reconnected to the broker";
	REQUIRE_MESSAGE(wait_until([&] { return occurrences(b.log(), reconnected) >= 2; }, 20s),
	                occurrences(b.log(), reconnected), " reconnections in the log, 2 expected");
	json rec = member(b.status(), "recovered");
	INFO("recovered: ", rec.dump());
	REQUIRE(rec.is_object());
	CHECK(nothing_in_doubt(rec.value("in_doubt", json::object())));
	CHECK(rec.value("interrupted", json::array()) == json{"web: an upgrade the crash interrupted: completed at gen 3"});
	check_serves_alone(b, "web", 3, 2);
	CHECK(running_pids(b.status(), "web") == m.new_pids);

	all_landed(m, "the restart");

	m.upgrade_after(1);
	// The receivers' Resume came before the drain that upgrade sent them: it is counted by now.
	CHECK(nothing_in_doubt(in_doubt(b)));
	check_no_orphans(b);
	b.stop();
}

// brokerctl reexec while frames wait in the channels: refused, as an upgrade is under way (the
// senders drain until every connection landed), and brokerd serves on; the handoff completes,
// and the reexec then carries the receivers with the connections they took.
TEST_CASE("reexec: refused mid-handoff on the direct channels and done once it settles; each connection is answered once")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	MidHandoff m(tb, json::object(), "direct");
	frames_wait_in_channels(m);

	RunResult busy = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", busy.describe());
	CHECK(busy.exit_code == 7);
	CHECK(busy.err.find("not now: an upgrade of web is in progress") != std::string::npos);
	CHECK(occurrences(b.log(), "re-executing") == 0);

	signal_all(m.new_pids, SIGCONT);
	StreamCall::Reply end = final_reply(*m.rollout);
	CHECK_MESSAGE(member(end.parameters, "progress").value("event", "") == "done", m.rollout->transcript());
	check_serves_alone(b, "web", 3, 2);
	CHECK(running_pids(b.status(), "web") == m.new_pids);
	// Every connection landed (the load's keep-alive ones too), and Worker.Handed told brokerd.
	const HandoffCounts settled = handoff_counts(b.status("web"), "web");
	CHECK(settled.handed >= m.first.handed + kConnections);
	CHECK(settled.received - m.first.received == settled.handed - m.first.handed);
	CHECK(settled.returned == m.first.returned);

	RunResult done = brokerctl(b, {"reexec"});
	INFO("brokerctl reexec: ", done.describe());
	CHECK(done.exit_code == 0);
	CHECK(occurrences(b.log(), "re-executing") == 1);
	CHECK(b.status().value("pid", 0) == b.pid());
	CHECK(b.status().value("recovered", json()).is_null()); // no crash to recover from
	CHECK(nothing_in_doubt(in_doubt(b)));

	all_landed(m, "the reexec");
	m.upgrade_after(0);
	b.stop();
}
