// The upgrade state machine as a table: event sequences and the steps and phases they lead to.
#include "upgrade/rollout.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using brokerd::Rollout;
using brokerd::RolloutPhase;
using brokerd::RolloutStep;

namespace {

// One event and what the rollout must answer. Events: "begin", "ready" (a new instance),
// "exit" (a drained old one), "lost" (an old one not drained, gone for good), "fail", "restored"
// (a refilled old one).
struct Expect {
	const char *event;
	RolloutStep step;
	RolloutPhase phase;
};

struct Case {
	const char *name;
	unsigned old_total, new_total, batch;
	bool all_at_once;
	std::vector<Expect> steps;
};

RolloutStep start(unsigned n) { return {.start_new = n}; }
RolloutStep drain(unsigned n) { return {.drain_old = n}; }
RolloutStep drain_start(unsigned d, unsigned s) { return {.start_new = s, .drain_old = d}; }
RolloutStep nothing() { return {}; }
RolloutStep finished() { return {.finished = true}; }
// A restored old instance is ready: one serving new instance may go.
RolloutStep replaced(bool last) { return {.drain_replaced = true, .finished = last}; }
RolloutStep rollback(unsigned restore) { return {.stop_new = true, .restore_old = restore, .finished = restore == 0}; }

constexpr auto Rolling = RolloutPhase::Rolling;
constexpr auto RollingBack = RolloutPhase::RollingBack;
constexpr auto Done = RolloutPhase::Done;
constexpr auto RolledBack = RolloutPhase::RolledBack;

const std::vector<Case> cases = {
	{"batch 1 of 2: one new, one old drained behind it, then the next", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"exit", nothing(), Rolling},
	  {"ready", drain(1), Rolling},
	  {"exit", finished(), Done}}},
	{"old exits before the next new is ready", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"ready", drain(1), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", finished(), Done}}},
	{"batch 2 of 4", 4, 4, 2, false,
	 {{"begin", start(2), Rolling},
	  {"ready", nothing(), Rolling},
	  {"ready", drain_start(2, 2), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", nothing(), Rolling},
	  {"ready", nothing(), Rolling},
	  {"ready", drain(2), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", finished(), Done}}},
	{"all at once: every new ready before any old drains", 3, 3, 1, true,
	 {{"begin", start(3), Rolling},
	  {"ready", nothing(), Rolling},
	  {"ready", nothing(), Rolling},
	  {"ready", drain(3), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", finished(), Done}}},
	{"scale up: 1 old, 3 new", 1, 3, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"ready", start(1), Rolling},
	  {"exit", nothing(), Rolling},
	  {"ready", finished(), Done}}},
	{"scale down: 3 old, 1 new", 3, 1, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain(3), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", nothing(), Rolling},
	  {"exit", finished(), Done}}},
	{"no old generation", 0, 2, 1, false,
	 {{"begin", start(1), Rolling}, {"ready", start(1), Rolling}, {"ready", finished(), Done}}},
	{"first new fails: nothing drained, rolled back at once", 2, 2, 1, false,
	 {{"begin", start(1), Rolling}, {"fail", rollback(0), RolledBack}, {"ready", nothing(), RolledBack}}},
	{"second new fails: one old was drained and is refilled", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"fail", rollback(1), RollingBack},
	  {"exit", nothing(), RollingBack},
	  {"ready", nothing(), RollingBack},
	  {"restored", replaced(true), RolledBack}}},
	{"failure after every old drained refills them all", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"ready", drain(1), Rolling},
	  {"fail", rollback(2), RollingBack},
	  {"restored", replaced(false), RollingBack},
	  {"restored", replaced(true), RolledBack},
	  {"restored", nothing(), RolledBack}}},
	{"a second failure during rollback changes nothing", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"fail", rollback(1), RollingBack},
	  {"fail", nothing(), RollingBack},
	  {"restored", replaced(true), RolledBack}}},
	{"all at once, one of three fails", 3, 3, 1, true,
	 {{"begin", start(3), Rolling}, {"ready", nothing(), Rolling}, {"fail", rollback(0), RolledBack}}},
	{"duplicate ready and exit reports are ignored", 1, 1, 1, false,
	 {{"begin", start(1), Rolling},
	  {"exit", nothing(), Rolling},
	  {"ready", drain(1), Rolling},
	  {"ready", nothing(), Rolling},
	  {"exit", finished(), Done},
	  {"exit", nothing(), Done}}},
	{"an old instance lost mid-takeover is one fewer to drain", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"exit", nothing(), Rolling},
	  {"lost", nothing(), Rolling},
	  {"ready", finished(), Done}}},
	{"an old instance lost before any new one is ready", 2, 2, 1, false,
	 {{"begin", start(1), Rolling},
	  {"lost", nothing(), Rolling},
	  {"ready", drain_start(1, 1), Rolling},
	  {"exit", nothing(), Rolling},
	  {"ready", finished(), Done}}},
	{"a loss when every old one is drained already is ignored", 1, 1, 1, false,
	 {{"begin", start(1), Rolling}, {"ready", drain(1), Rolling}, {"lost", nothing(), Rolling}, {"exit", finished(), Done}}},
	{"failure after done is ignored", 1, 1, 1, false,
	 {{"begin", start(1), Rolling}, {"ready", drain(1), Rolling}, {"exit", finished(), Done}, {"fail", nothing(), Done}}},
};

RolloutStep feed(Rollout &r, const std::string &event)
{
	if (event == "begin")
		return r.begin();
	if (event == "ready")
		return r.new_ready();
	if (event == "exit")
		return r.old_exited();
	if (event == "lost")
		return r.old_lost();
	if (event == "fail")
		return r.fail("instance web/2/0 exited with status 1");
	if (event == "restored")
		return r.restored_ready();
	FAIL("unknown event " << event);
	return {};
}

std::string show(const RolloutStep &s)
{
	return "{start_new " + std::to_string(s.start_new) + ", drain_old " + std::to_string(s.drain_old) +
	       ", stop_new " + std::to_string(s.stop_new) + ", restore_old " + std::to_string(s.restore_old) +
	       ", drain_replaced " + std::to_string(s.drain_replaced) + ", finished " + std::to_string(s.finished) + "}";
}

} // namespace

TEST_CASE("rollout: event sequences")
{
	for (const Case &c : cases) {
		CAPTURE(c.name);
		Rollout r(c.old_total, c.new_total, c.batch, c.all_at_once);
		int i = 0;
		for (const Expect &e : c.steps) {
			CAPTURE(i);
			CAPTURE(e.event);
			RolloutStep got = feed(r, e.event);
			CHECK_MESSAGE(got == e.step, "got " << show(got) << ", want " << show(e.step));
			CHECK(r.phase() == e.phase);
			i++;
		}
	}
}

TEST_CASE("rollout: capacity never drops below the old total")
{
	// Replay batch rollouts and check serving instances (old not drained + new ready) at every step.
	for (unsigned n = 1; n <= 6; n++)
		for (unsigned batch = 1; batch <= n; batch++) {
			CAPTURE(n);
			CAPTURE(batch);
			Rollout r(n, n, batch, false);
			unsigned started = r.begin().start_new, ready = 0, drained = 0, exited = 0;
			while (r.phase() == RolloutPhase::Rolling) {
				RolloutStep s;
				if (ready < started) {
					ready++;
					s = r.new_ready();
				} else {
					REQUIRE(exited < drained);
					exited++;
					s = r.old_exited();
				}
				started += s.start_new;
				drained += s.drain_old;
				CHECK(ready + (n - drained) >= n);
				CHECK(started - ready <= batch);
			}
			CHECK(r.phase() == RolloutPhase::Done);
			CHECK(started == n);
			CHECK(drained == n);
		}
}

TEST_CASE("rollout: the failure reason is kept")
{
	Rollout r(1, 1, 1, false);
	r.begin();
	r.fail("aborted by the operator");
	CHECK(r.reason() == "aborted by the operator");
	CHECK(!r.active());
}
