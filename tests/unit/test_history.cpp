// A service's history as a table: records begin and end, the oldest go past kLength, and the names
// History sends are those io.brokerd.Control.varlink declares.
#include "supervisor/history.hpp"

#include "proto/names.hpp"

#include <doctest/doctest.h>

#include <algorithm>

using namespace brokerd;

namespace {

HistoryRecord record(std::uint64_t generation, GenerationOrigin how = GenerationOrigin::Upgrade)
{
	HistoryRecord r;
	r.generation = generation;
	r.cfg.version = "v" + std::to_string(generation);
	r.started = 1000 * generation;
	r.how = how;
	return r;
}

} // namespace

TEST_CASE("history: each step of a service's life, and what it leaves in the records")
{
	using enum GenerationResult;
	struct Step {
		const char *what;
		void (*apply)(History &h);
		std::vector<std::uint64_t> known;
		std::vector<GenerationResult> results; // of the records, oldest first
	};
	const Step steps[] = {
		{"gen 1 starts from the config", [](History &h) { h.begin(record(1, GenerationOrigin::Start)); }, {1}, {Serving}},
		{"gen 2 begins an upgrade", [](History &h) { h.begin(record(2)); }, {1, 2}, {Serving, Serving}},
		{"it is done: gen 1 replaced", [](History &h) { h.end(1, Replaced, 5000); }, {1, 2}, {Replaced, Serving}},
		{"gen 3 fails and rolls back",
		 [](History &h) {
			 h.begin(record(3));
			 h.end(3, RolledBack, 6000);
		 },
		 {1, 2, 3},
		 {Replaced, Serving, RolledBack}},
		{"an ended record keeps its result", [](History &h) { h.end(1, Stopped, 7000); }, {1, 2, 3},
		 {Replaced, Serving, RolledBack}},
		{"stop ends what serves", [](History &h) { h.end_all(Stopped, 8000); }, {1, 2, 3},
		 {Replaced, Stopped, RolledBack}},
	};
	History h;
	for (const Step &s : steps) {
		INFO(s.what);
		s.apply(h);
		CHECK(h.known() == s.known);
		std::vector<GenerationResult> results;
		for (const HistoryRecord &r : h.records())
			results.push_back(r.result);
		CHECK(results == s.results);
	}
	REQUIRE(h.find(1));
	CHECK(h.find(1)->ended == 5000);
	CHECK(h.find(2)->ended == 8000);
	CHECK(h.find(3)->cfg.version == "v3");
	CHECK(h.find(4) == nullptr);
}

TEST_CASE("history: past kLength generations the oldest are forgotten")
{
	History h;
	for (std::uint64_t g = 1; g <= History::kLength + 5; g++)
		h.begin(record(g));
	REQUIRE(h.records().size() == History::kLength);
	CHECK(h.known().front() == 6);
	CHECK(h.known().back() == History::kLength + 5);
	CHECK(h.find(5) == nullptr);
	CHECK(h.find(6) != nullptr);
}

TEST_CASE("history: how and result go by the names the .varlink file declares, both ways")
{
	namespace how = proto::names::control::history_entry_how;
	namespace result = proto::names::control::history_entry_result;
	std::vector<std::string_view> hows, results;
	for (auto o : {GenerationOrigin::Start, GenerationOrigin::Upgrade, GenerationOrigin::Rollback,
	               GenerationOrigin::Restart, GenerationOrigin::Takeover, GenerationOrigin::Registration}) {
		hows.push_back(origin_name(o));
		CHECK(origin_named(origin_name(o)) == o);
	}
	for (auto r : {GenerationResult::Serving, GenerationResult::Replaced, GenerationResult::RolledBack,
	               GenerationResult::Failed, GenerationResult::Stopped}) {
		results.push_back(result_name(r));
		CHECK(result_named(result_name(r)) == r);
	}
	CHECK(std::ranges::equal(hows, how::kValues));
	CHECK(std::ranges::equal(results, result::kValues));
	CHECK(result_name(GenerationResult::RolledBack) == result::kRolledBack);
	CHECK_FALSE(origin_named("reload"));
	CHECK_FALSE(result_named("rolled_back"));
}
