// Unit tests of brokerd's own events as journal records: which events, their ids, texts and fields.
#include "daemon/journal_events.hpp"
#include "os/journal_ids.hpp"

#include <doctest/doctest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

using namespace brokerd;
namespace ids = brokerd::journal::ids;

namespace {

Event service_event(EventKind kind, std::optional<std::uint64_t> generation, std::string kind_name = "upgrade")
{
	Event e;
	e.kind = kind;
	e.service = "web";
	e.generation = generation;
	e.upgrade_kind = std::move(kind_name);
	return e;
}

std::map<std::string, std::string> fields(const log::EventRecord &r)
{
	std::map<std::string, std::string> out;
	for (const auto &[k, v] : r.fields)
		out[std::string(k)] = v;
	return out;
}

} // namespace

TEST_CASE("an upgrade's records: started, then done with its duration and the handoff summary")
{
	EventJournal j;
	auto started = j.records(service_event(EventKind::Upgrade, 3), 2, uid_t{1000});
	REQUIRE(started.size() == 1);
	CHECK(started[0].message_id == ids::kUpgradeStarted);
	CHECK(started[0].level == log::Level::Notice);
	CHECK(started[0].message == "web: upgrade from gen 2 to gen 3 started");
	CHECK(fields(started[0]) == std::map<std::string, std::string>{{"BROKER_SERVICE", "web"},
	                                                               {"BROKER_GENERATION", "3"},
	                                                               {"BROKER_FROM_GENERATION", "2"},
	                                                               {"BROKER_UPGRADE_KIND", "upgrade"},
	                                                               {"BROKER_REQUESTED_UID", "1000"}});

	Event handoff = service_event(EventKind::Handoff, 3);
	handoff.handoff = HandoffTotals{{10, 8, 2}, 0};
	CHECK(j.records(handoff).empty());
	handoff.handoff = HandoffTotals{{120, 117, 3}, 0};
	CHECK(j.records(handoff).empty());

	Event done = service_event(EventKind::Done, 3);
	done.duration = 1'234'567;
	auto end = j.records(done);
	REQUIRE(end.size() == 2);
	CHECK(end[0].message_id == ids::kUpgradeDone);
	CHECK(end[0].message == "web: upgrade to gen 3 done in 1.23s");
	CHECK(fields(end[0]) == std::map<std::string, std::string>{{"BROKER_SERVICE", "web"},
	                                                           {"BROKER_GENERATION", "3"},
	                                                           {"BROKER_FROM_GENERATION", "2"},
	                                                           {"BROKER_UPGRADE_KIND", "upgrade"},
	                                                           {"BROKER_REQUESTED_UID", "1000"},
	                                                           {"BROKER_RESULT", "done"},
	                                                           {"BROKER_DURATION_USEC", "1234567"}});
	CHECK(end[1].message_id == ids::kHandoffSummary);
	CHECK(end[1].level == log::Level::Info);
	CHECK(end[1].message == "web: upgrade to gen 3: 120 connection(s) handed off, 117 received, 3 returned");
	CHECK(fields(end[1]).at("BROKER_HANDED") == "120");
	CHECK(fields(end[1]).at("BROKER_RECEIVED") == "117");
	CHECK(fields(end[1]).at("BROKER_RETURNED") == "3");

	// The next upgrade starts afresh: no handoff summary of the one before.
	j.records(service_event(EventKind::Upgrade, 4, "restart"), 3);
	Event again = service_event(EventKind::Done, 4, "restart");
	again.duration = 500'000;
	auto next = j.records(again);
	REQUIRE(next.size() == 1);
	CHECK(next[0].message == "web: restart to gen 4 done in 0.50s");
	CHECK(fields(next[0]).at("BROKER_UPGRADE_KIND") == "restart");
	// brokerd's own (a takeover's, say) names nobody.
	CHECK(!fields(next[0]).contains("BROKER_REQUESTED_UID"));
}

TEST_CASE("a failed upgrade's records: failed, then rolled back, each with its own id")
{
	EventJournal j;
	j.records(service_event(EventKind::Upgrade, 5), 4);
	Event failed = service_event(EventKind::Rollback, 5);
	failed.message = "web/5/0 exited with status 1";
	auto turn = j.records(failed);
	REQUIRE(turn.size() == 1);
	CHECK(turn[0].message_id == ids::kUpgradeFailed);
	CHECK(turn[0].level == log::Level::Warning);
	CHECK(turn[0].message == "web: upgrade to gen 5 failed (web/5/0 exited with status 1), rolling back");
	CHECK(fields(turn[0]).at("BROKER_RESULT") == "failed");

	Event back = service_event(EventKind::RolledBack, 4); // the generation that serves again
	back.message = failed.message;
	back.duration = 2'000'000;
	auto end = j.records(back);
	REQUIRE(end.size() == 1);
	CHECK(end[0].message_id == ids::kUpgradeRolledBack);
	CHECK(end[0].level == log::Level::Warning);
	CHECK(end[0].message == "web: upgrade to gen 5 rolled back to gen 4 in 2.00s: web/5/0 exited with status 1");
	CHECK(fields(end[0]) == std::map<std::string, std::string>{{"BROKER_SERVICE", "web"},
	                                                           {"BROKER_GENERATION", "5"},
	                                                           {"BROKER_FROM_GENERATION", "4"},
	                                                           {"BROKER_UPGRADE_KIND", "upgrade"},
	                                                           {"BROKER_RESULT", "rolled-back"},
	                                                           {"BROKER_DURATION_USEC", "2000000"}});
}

TEST_CASE("which events the journal keeps: a crash loop yes, an instance's ordinary steps no")
{
	EventJournal j;
	Event loop;
	loop.kind = EventKind::CrashLoop;
	loop.service = "web";
	loop.generation = 2;
	loop.instance = "web/2/1";
	loop.message = "crash loop (6 failures within 60s), not restarting; last: exited with status 1";
	auto r = j.records(loop);
	REQUIRE(r.size() == 1);
	CHECK(r[0].message_id == ids::kCrashLoop);
	CHECK(r[0].level == log::Level::Error);
	CHECK(r[0].message == "instance web/2/1: " + loop.message);
	CHECK(fields(r[0]) == std::map<std::string, std::string>{
	                              {"BROKER_SERVICE", "web"}, {"BROKER_INSTANCE", "web/2/1"}, {"BROKER_GENERATION", "2"}});

	for (EventKind k : {EventKind::Started, EventKind::Ready, EventKind::Draining, EventKind::Exited, EventKind::Failed,
	                    EventKind::Accepted, EventKind::Start, EventKind::Stop}) {
		Event e = loop;
		e.kind = k;
		CAPTURE(static_cast<int>(k));
		CHECK(j.records(e).empty());
	}
}

TEST_CASE("brokerd's own records: reload, reexec and shutdown; every id distinct and 128-bit hex")
{
	auto reload = reload_record("/etc/brokerd/brokerd.json");
	CHECK(reload.message_id == ids::kReload);
	CHECK(reload.message == "reloaded /etc/brokerd/brokerd.json");
	auto reexec = reexec_record("1.2.3", 2, 5);
	CHECK(reexec.message_id == ids::kReexec);
	CHECK(reexec.message == "re-executed: brokerd 1.2.3 carries on with 2 service(s), 5 worker connection(s)");
	CHECK(fields(reexec).at("BROKER_VERSION") == "1.2.3");
	auto stop = shutdown_record("SIGTERM", 90'000'000);
	CHECK(stop.message_id == ids::kShutdown);
	CHECK(stop.message == "received SIGTERM, shutting down within 90.00s");
	CHECK(fields(stop).at("BROKER_TIMEOUT_USEC") == "90000000");

	const std::string_view all[] = {ids::kUpgradeStarted, ids::kUpgradeDone,     ids::kUpgradeRolledBack,
	                                ids::kUpgradeFailed,  ids::kCrashLoop,       ids::kHandoffSummary,
	                                ids::kReexec,         ids::kReload,          ids::kShutdown};
	std::set<std::string_view> distinct(std::begin(all), std::end(all));
	CHECK(distinct.size() == std::size(all));
	for (std::string_view id : all) {
		CAPTURE(id);
		CHECK(id.size() == 32);
		CHECK(id.find_first_not_of("0123456789abcdef") == std::string_view::npos);
	}
}
