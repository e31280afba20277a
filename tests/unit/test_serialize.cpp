// The supervisor's reexec state: what Serializer::save writes, Serializer::restore reads back into
// the same model, and Supervisor::adopt serves it on.
#include "supervisor/serialize.hpp"
#include "supervisor/supervisor.hpp"

#include <doctest/doctest.h>

#include <systemd/sd-event.h>

#include <functional>
#include <list>
#include <memory>

using namespace brokerd;
using json = nlohmann::json;

namespace {

config::ServiceConfig service_config(const std::string &version)
{
	config::ServiceConfig cfg;
	cfg.name = "web";
	cfg.exec = {"/bin/worker", "--version", version};
	cfg.sockets = {"http"};
	cfg.instances = 2;
	cfg.version = version;
	cfg.env = {{"MODE", version}};
	cfg.drain_timeout = std::chrono::seconds(7);
	return cfg;
}

// A service as a run leaves it: two generations (the second current), what a rollback would
// deploy, handoff counters, and instances that exited, failed and crashed before.
std::unique_ptr<Service> service_after_a_run()
{
	auto svc = std::make_unique<Service>();
	svc->name = "web";
	svc->cfg = service_config("2");
	svc->previous = service_config("1");
	svc->next_generation = 3;
	svc->handoff = {40, 37, 3};
	for (std::uint64_t number : {1, 2}) {
		auto gen = std::make_unique<Generation>();
		gen->service = svc.get();
		gen->number = number;
		gen->cfg = service_config(std::to_string(number));
		gen->next_index = 2;
		gen->started = 1700000000000000 + number;
		if (number == 2)
			gen->env = {{"MODE", EnvChange::Kind::Changed}, {"TOKEN", EnvChange::Kind::Added}};
		for (unsigned index : {0u, 1u}) {
			auto inst = std::make_unique<Instance>();
			inst->service = svc.get();
			inst->generation = gen.get();
			inst->index = index;
			inst->id = "web/" + std::to_string(number) + "/" + std::to_string(index);
			inst->state = index == 0 ? InstanceState::Exited : InstanceState::Failed;
			inst->since = 1700000000000000 + number * 10 + index;
			inst->token = "token-" + inst->id;
			inst->status_text = "serving " + inst->id;
			inst->exit_reason = index == 0 ? "exited with status 0" : "killed by SIGSEGV";
			inst->purpose = number == 1 ? InstancePurpose::Retired : InstancePurpose::Serving;
			inst->backoff.restarts = index + 1;
			inst->restarts = index + 4;
			inst->backoff.crash_times = {100, 200 + index};
			inst->backoff.ready_since = 50;
			inst->last_lines = {"line one", "line two of " + inst->id};
			inst->accepts_handoff = number == 2;
			inst->handoff = {number * 10, number * 5, number};
			gen->instances.push_back(std::move(inst));
		}
		svc->generations.push_back(std::move(gen));
	}
	svc->current = svc->generations.back().get();
	// Gen 1 from the config, replaced by gen 2, which uid 1000's upgrade began.
	svc->history.begin({1, service_config("1"), 1700000000000000, 1700000060000000, GenerationOrigin::Start,
	                    GenerationResult::Replaced, std::nullopt});
	svc->history.begin({2, service_config("2"), 1700000050000000, 0, GenerationOrigin::Upgrade,
	                    GenerationResult::Serving, 1000});
	return svc;
}

// A loop, the socket "http", and the state a supervisor that went through a run saves.
struct SavedRun {
	SavedRun()
	{
		REQUIRE(sd_event_new(&event) >= 0);
		listeners.push_back(Listener{"http", {}, "tcp://127.0.0.1:8080", "tcp", "bound", ""});
		Supervisor before(event, listeners, "/run/brokerd/control.sock");
		before.adopt(service_after_a_run());
		saved = Serializer::save(before, keep);
	}
	~SavedRun() { sd_event_unref(event); }

	sd_event *event = nullptr;
	std::list<Listener> listeners;
	std::vector<int> keep;
	json saved;
};

} // namespace

TEST_CASE_FIXTURE(SavedRun, "serialize: a saved supervisor restores to the same model, and saves the same again")
{
	CHECK(keep.empty()); // no process runs, so no pidfd or pipe is carried
	{
		Supervisor after(event, listeners, "/run/brokerd/control.sock");
		Serializer::restore(after, saved);
		std::vector<int> keep_again;
		CHECK(Serializer::save(after, keep_again) == saved);

		// The model itself, not only its JSON.
		REQUIRE(after.services().size() == 1);
		const Service &svc = *after.services().front();
		CHECK(svc.name == "web");
		CHECK(svc.next_generation == 3);
		CHECK(svc.handoff.handed == 40);
		CHECK(svc.handoff.received == 37);
		CHECK(svc.handoff.returned == 3);
		REQUIRE(svc.previous);
		CHECK(svc.previous->version == "1");
		CHECK(svc.previous->exec == std::vector<std::string>{"/bin/worker", "--version", "1"});
		REQUIRE(svc.sockets.size() == 1);
		CHECK(svc.sockets[0] == &listeners.front());
		REQUIRE(svc.generations.size() == 2);
		REQUIRE(svc.current == svc.generations[1].get());
		CHECK(svc.current->cfg.env == std::map<std::string, std::string>{{"MODE", "2"}});
		CHECK(svc.current->cfg.drain_timeout == std::chrono::seconds(7));
		const Instance &failed = *svc.current->instances[1];
		CHECK(failed.id == "web/2/1");
		CHECK(failed.supervisor == &after);
		CHECK(failed.state == InstanceState::Failed);
		CHECK(failed.exit_reason == "killed by SIGSEGV");
		CHECK(failed.backoff.restarts == 2);
		CHECK(failed.restarts == 5);
		CHECK(svc.current->started == 1700000000000002);
		CHECK(svc.current->env == std::vector<EnvChange>{{"MODE", EnvChange::Kind::Changed},
		                                                 {"TOKEN", EnvChange::Kind::Added}});
		CHECK(failed.backoff.crash_times == std::deque<std::uint64_t>{100, 201});
		CHECK(failed.last_lines == std::deque<std::string>{"line one", "line two of web/2/1"});
		CHECK(failed.accepts_handoff);
		CHECK(failed.handoff.handed == 20);
		CHECK(failed.token == "token-web/2/1");
		CHECK(svc.generations[0]->instances[0]->retired());
		CHECK_FALSE(failed.retired());

		// The history, each generation's config (env included) kept for rollback --to.
		REQUIRE(svc.history.records().size() == 2);
		const HistoryRecord &first = svc.history.records()[0], &second = svc.history.records()[1];
		CHECK(first.generation == 1);
		CHECK(first.how == GenerationOrigin::Start);
		CHECK(first.result == GenerationResult::Replaced);
		CHECK(first.started == 1700000000000000);
		CHECK(first.ended == 1700000060000000);
		CHECK_FALSE(first.by);
		CHECK(first.cfg.exec == std::vector<std::string>{"/bin/worker", "--version", "1"});
		CHECK(second.generation == 2);
		CHECK(second.how == GenerationOrigin::Upgrade);
		CHECK(second.result == GenerationResult::Serving);
		CHECK(second.ended == 0);
		CHECK(second.by == std::optional<uid_t>(1000));
		CHECK(second.cfg.env == std::map<std::string, std::string>{{"MODE", "2"}});
	}
}

TEST_CASE_FIXTURE(SavedRun, "serialize: a state without history, from an older brokerd, gets one record per generation")
{
	REQUIRE(saved.at(0).contains("history"));
	saved.at(0).erase("history");
	{
		Supervisor after(event, listeners, "/run/brokerd/control.sock");
		Serializer::restore(after, saved);
		const History &history = after.services().front()->history;
		REQUIRE(history.known() == std::vector<std::uint64_t>{1, 2});
		const HistoryRecord &first = history.records()[0], &second = history.records()[1];
		CHECK(first.how == GenerationOrigin::Start);
		CHECK(first.result == GenerationResult::Replaced);
		CHECK(second.how == GenerationOrigin::Upgrade);
		CHECK(second.result == GenerationResult::Serving);
		CHECK(first.started == 0); // not known
		CHECK_FALSE(second.by);
		CHECK(second.cfg.exec == std::vector<std::string>{"/bin/worker", "--version", "2"});
	}
}

TEST_CASE_FIXTURE(SavedRun, "serialize: a history record with an unknown result is refused")
{
	saved.at(0).at("history").at(0)["result"] = "exploded";
	{
		Supervisor after(event, listeners, "/run/brokerd/control.sock");
		CHECK_THROWS_WITH_AS(Serializer::restore(after, saved),
		                     "state: service web: a history record with an unknown how or result", std::runtime_error);
	}
}

TEST_CASE_FIXTURE(SavedRun, "serialize: a state naming a socket that was not passed on is refused")
{
	{
		std::list<Listener> none;
		Supervisor after(event, none, "/run/brokerd/control.sock");
		CHECK_THROWS_WITH_AS(Serializer::restore(after, saved),
		                     "re-exec state: service web uses socket http, which was not passed on",
		                     std::runtime_error);
		CHECK(after.services().empty());
	}
}

TEST_CASE_FIXTURE(SavedRun, "serialize: a state from before restarts and env changes loads without them")
{
	for (json &gen : saved[0]["generations"]) {
		gen.erase("started");
		gen.erase("env");
		for (json &inst : gen["instances"])
			inst.erase("slot_restarts");
	}
	{
		Supervisor after(event, listeners, "/run/brokerd/control.sock");
		Serializer::restore(after, saved);
		const Service &svc = *after.services().front();
		CHECK(svc.current->started == 0);
		CHECK(svc.current->env.empty());
		CHECK(svc.current->instances[1]->restarts == 0);
		CHECK(svc.current->instances[1]->backoff.restarts == 2);
	}
}

TEST_CASE_FIXTURE(SavedRun, "serialize: the crash state's text says what save() says, through every change of the history")
{
	Supervisor sup(event, listeners, "/run/brokerd/control.sock");
	Serializer::restore(sup, saved);
	Service &svc = *sup.services().front();
	Serializer::HistoryTexts cache; // one, kept across the steps, as the daemon keeps it
	const json around = {{"format", 1}, {"pid", 42}};
	// Each step changes the history by one of its ways, or nothing.
	struct Step {
		std::string what;
		std::function<void()> change;
	};
	const Step steps[] = {
	        {"first write", [] {}},
	        {"nothing changed", [] {}},
	        {"a generation begins", [&] {
		         svc.history.begin({3, service_config("3"), 1700000070000000, 0, GenerationOrigin::Upgrade,
		                            GenerationResult::Serving, 0});
	         }},
	        {"a generation ends", [&] { svc.history.end(2, GenerationResult::Replaced, 1700000080000000); }},
	        {"the configs are brought up to date", [&] {
		         svc.history.each_config([](config::ServiceConfig &c) { c.env["RELOADED"] = "1"; });
	         }},
	        {"every generation ends", [&] { svc.history.end_all(GenerationResult::Stopped, 1700000090000000); }},
	        {"past kLength generations", [&] {
		         for (std::uint64_t n = 4; n < 4 + History::kLength; n++)
			         svc.history.begin({n, service_config(std::to_string(n)), n, 0, GenerationOrigin::Upgrade,
			                            GenerationResult::Serving, std::nullopt});
	         }},
	};
	for (const Step &step : steps) {
		CAPTURE(step.what);
		step.change();
		std::vector<int> keep_now;
		json expected = around;
		expected["services"] = Serializer::save(sup, keep_now);
		CHECK(json::parse(Serializer::save_text(sup, around, cache)) == expected);
	}
}

TEST_CASE("env_changes: what differs between two environments, by name")
{
	using K = EnvChange::Kind;
	using Env = std::map<std::string, std::string>;
	struct Case {
		Env before, after;
		std::vector<EnvChange> changes;
	};
	const Case cases[] = {
		{{}, {}, {}},
		{{{"A", "1"}}, {{"A", "1"}}, {}},
		{{}, {{"A", "1"}}, {{"A", K::Added}}},
		{{{"A", "1"}}, {}, {{"A", K::Removed}}},
		{{{"A", "1"}}, {{"A", "2"}}, {{"A", K::Changed}}},
		{{{"A", "1"}, {"B", "x"}, {"D", "d"}}, {{"B", "y"}, {"C", ""}, {"D", "d"}, {"E", "e"}},
		 {{"A", K::Removed}, {"B", K::Changed}, {"C", K::Added}, {"E", K::Added}}},
	};
	for (const Case &c : cases)
		CHECK(env_changes(c.before, c.after) == c.changes);
}
