// Unit tests of broker/metrics/counters: events in, counts out, as a table; kept across a re-exec.
#include "metrics/counters.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using brokerd::Event;
using brokerd::EventKind;
using brokerd::metrics::Counters;

namespace {

Event instance_event(EventKind kind, const std::string &id, const std::string &service = "web")
{
	Event e;
	e.kind = kind;
	e.service = service;
	e.instance = id;
	return e;
}

Event service_event(EventKind kind, const std::string &upgrade_kind = {}, std::optional<brokerd::usec_t> duration = {})
{
	Event e;
	e.kind = kind;
	e.service = "web";
	e.upgrade_kind = upgrade_kind;
	e.duration = duration;
	return e;
}

struct Counts {
	std::uint64_t restarts = 0, crash_loops = 0, rollbacks = 0, done = 0, rolled_back = 0;
};

Counts counts(const Counters &c, const std::string &service = "web")
{
	Counts out;
	auto it = c.services().find(service);
	if (it == c.services().end())
		return out;
	out.restarts = it->second.restarts;
	out.crash_loops = it->second.crash_loops;
	out.rollbacks = it->second.rollbacks;
	for (const auto &[key, n] : it->second.upgrades)
		(key.second == "done" ? out.done : out.rolled_back) += n;
	return out;
}

} // namespace

TEST_CASE("events in, counts out")
{
	using enum EventKind;
	struct Row {
		const char *what;
		std::vector<Event> events;
		Counts want;
	};
	const std::vector<Row> rows = {
		{"a first start is no restart", {instance_event(Started, "web/1/0")}, {}},
		{"a crash and a start of the same slot is one restart",
		 {instance_event(Started, "web/1/0"), instance_event(Failed, "web/1/0"), instance_event(Started, "web/1/0")},
		 {.restarts = 1}},
		{"a clean exit restarted (restart always) is one too",
		 {instance_event(Started, "web/1/0"), instance_event(Exited, "web/1/0"), instance_event(Started, "web/1/0")},
		 {.restarts = 1}},
		{"another slot's start is not this one's restart",
		 {instance_event(Failed, "web/1/0"), instance_event(Started, "web/2/0")},
		 {}},
		{"a drained instance's exit is not waiting for a restart",
		 {instance_event(Draining, "web/1/0"), instance_event(Exited, "web/1/0"), instance_event(Started, "web/1/0")},
		 {}},
		{"three crashes, then a crash loop: 2 restarts, one loop",
		 {instance_event(Started, "web/1/0"), instance_event(Failed, "web/1/0"), instance_event(Started, "web/1/0"),
		  instance_event(Failed, "web/1/0"), instance_event(Started, "web/1/0"), instance_event(Failed, "web/1/0"),
		  instance_event(CrashLoop, "web/1/0")},
		 {.restarts = 2, .crash_loops = 1}},
		{"an upgrade done", {service_event(Upgrade, "upgrade"), service_event(Done, "upgrade", 1'500'000)}, {.done = 1}},
		{"an upgrade that failed: one rollback, rolled back",
		 {service_event(Rollback, "upgrade"), service_event(RolledBack, "upgrade", 2'000'000)},
		 {.rollbacks = 1, .rolled_back = 1}},
		{"ready, handoff, start, stop count nothing",
		 {instance_event(Ready, "web/1/0"), service_event(Handoff), service_event(Start), service_event(Stop),
		  service_event(Accepted)},
		 {}},
	};
	for (const Row &row : rows) {
		INFO(row.what);
		Counters c;
		for (const Event &e : row.events)
			c.observe(e);
		Counts got = counts(c);
		CHECK(got.restarts == row.want.restarts);
		CHECK(got.crash_loops == row.want.crash_loops);
		CHECK(got.rollbacks == row.want.rollbacks);
		CHECK(got.done == row.want.done);
		CHECK(got.rolled_back == row.want.rolled_back);
	}
}

TEST_CASE("upgrades by kind and result, and their durations by result")
{
	using enum EventKind;
	Counters c;
	c.observe(service_event(Done, "upgrade", 1'500'000));
	c.observe(service_event(Done, "restart", 700'000));
	c.observe(service_event(Done, "upgrade", 45'000'000));
	c.observe(service_event(RolledBack, "rollback", 3'000'000));
	c.observe(service_event(Done, "takeover")); // interrupted by a crash: no duration
	const auto &web = c.services().at("web");
	CHECK(web.upgrades.at({"upgrade", "done"}) == 2);
	CHECK(web.upgrades.at({"restart", "done"}) == 1);
	CHECK(web.upgrades.at({"rollback", "rolled-back"}) == 1);
	CHECK(web.upgrades.at({"takeover", "done"}) == 1);
	CHECK(web.upgrades.size() == 4);
	CHECK(web.durations.at("done").count == 3);
	CHECK(web.durations.at("done").sum == 47'200'000);
	CHECK(web.durations.at("rolled-back").count == 1);
}

TEST_CASE("the counts and the slots waiting for a restart survive save and restore")
{
	using enum EventKind;
	Counters c;
	c.observe(instance_event(Failed, "web/1/0"));
	c.observe(instance_event(Started, "web/1/0"));
	c.observe(instance_event(Failed, "web/1/1")); // restarts after the re-exec
	c.observe(instance_event(Draining, "web/1/2"));
	c.observe(service_event(Done, "upgrade", 2'000'000));
	c.observe(instance_event(CrashLoop, "db/1/0", "db"));
	Counters r = Counters::restore(nlohmann::json::parse(c.save().dump()));
	CHECK(r.save() == c.save());
	r.observe(instance_event(Started, "web/1/1"));
	r.observe(instance_event(Exited, "web/1/2")); // drained before: not waiting
	r.observe(instance_event(Started, "web/1/2"));
	CHECK(counts(r).restarts == 2);
	CHECK(counts(r).done == 1);
	CHECK(counts(r, "db").crash_loops == 1);
	CHECK_THROWS_AS(Counters::restore(nlohmann::json{{"services", 1}}), std::runtime_error);
}

TEST_CASE("slots that are never restarted are forgotten past a bound")
{
	using enum EventKind;
	Counters c;
	for (std::size_t i = 0; i < Counters::kMaxEnded + 10; i++)
		c.observe(instance_event(Failed, "web/1/" + std::to_string(i)));
	CHECK(c.save().at("ended").size() == Counters::kMaxEnded);
	// The oldest went; the newest is still known.
	c.observe(instance_event(Started, "web/1/0"));
	CHECK(counts(c).restarts == 0);
	c.observe(instance_event(Started, "web/1/" + std::to_string(Counters::kMaxEnded + 9)));
	CHECK(counts(c).restarts == 1);
}
