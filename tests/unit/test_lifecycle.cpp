// The supervisor's lifecycle in-process: start, ready, crash and restart, crash loop, start and
// drain timeouts, stop, and an upgrade, with a fake launcher in place of fork and exec. Each
// "worker" is a child of this test that runs a few lines of the test's own code; everything else
// is brokerd's: the pidfd watch, the signals, the timers, the restart policy.
#include "control/encode.hpp"
#include "supervisor/supervisor.hpp"

#include <doctest/doctest.h>

#include <signal.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <list>
#include <string>
#include <vector>

using namespace brokerd;
using namespace std::chrono_literals;

namespace {

// What one start of a fake worker does.
enum class Act {
	Crash,       // exits with status 3 at once
	Serve,       // says "up" on stdout, then waits for a signal (SIGTERM ends it)
	IgnoreDrain, // the same, but ignores SIGTERM: only SIGKILL ends it
};

// The launcher: forks a child that leads its own session (as exec_child's do), closes the
// exec-status pipe as a successful exec would, and runs the act the script gives that start (the
// last one repeats).
struct FakeWorkers {
	std::vector<Act> script;
	std::vector<pid_t> pids;

	pid_t launch(SpawnPlan &plan)
	{
		Act act = script.at(std::min(pids.size(), script.size() - 1));
		pid_t pid = ::fork();
		if (pid != 0) {
			if (pid > 0)
				pids.push_back(pid);
			return pid;
		}
		// As exec would leave it: no signal blocked, none handled (doctest's handlers are not
		// the worker's).
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, nullptr);
		for (int sig = 1; sig < NSIG; sig++)
			::signal(sig, SIG_DFL);
		::setsid();
		::close(plan.fds.back());
		if (act == Act::Crash)
			::_exit(3);
		if (act == Act::IgnoreDrain)
			::signal(SIGTERM, SIG_IGN);
		// Only now may the test send its drain signal: it waits for this line.
		(void)!::write(plan.fds[1], "up\n", 3);
		for (;;)
			::pause();
	}
};

class Recorder : public Observer {
public:
	void progress(const Event &e) override { seen.push_back(e.kind); }
	void finished(const Event *last) override
	{
		done = true;
		last_kind = last ? std::optional(last->kind) : std::nullopt;
	}
	void failed(const Refusal &why) override { failure = why.reason; }

	std::vector<EventKind> seen;
	bool done = false;
	std::optional<EventKind> last_kind;
	std::optional<std::string> failure;
};

struct Fixture {
	Fixture()
	{
		sigset_t mask;
		sigemptyset(&mask);
		sigaddset(&mask, SIGCHLD);
		sigprocmask(SIG_BLOCK, &mask, nullptr);
		REQUIRE(sd_event_new(&event) >= 0);
		sup = std::make_unique<Supervisor>(event, listeners, "/nonexistent/control");
		sup->set_launcher([this](SpawnPlan &plan) { return workers.launch(plan); });
		sup->on_event = [this](const Event &e) { events.push_back(e); };
	}

	~Fixture()
	{
		// No child outlives a case: brokerd's shutdown, then its kill step, and every child is
		// reaped by the supervisor.
		sup->shutdown(0ms);
		sup->kill_all();
		CHECK(run_for([&] { return sup->stopped(); }));
		sup.reset();
		sd_event_unref(event);
	}

	static config::ServiceConfig service(const std::string &version)
	{
		config::ServiceConfig cfg;
		cfg.name = "web";
		cfg.exec = {"true"}; // resolved in PATH, never run: the launcher runs the act
		cfg.version = version;
		cfg.instances = 1;
		cfg.ready = config::ReadyMode::Notify;
		cfg.restart = config::RestartPolicy::OnFailure;
		return cfg;
	}

	// Runs the loop until `done` holds, for at most 15 s (the longest wait, a crash loop's
	// backoff, takes about 3 s). Whether it came.
	bool run_for(const std::function<bool()> &done)
	{
		auto deadline = std::chrono::steady_clock::now() + 15s;
		while (!done()) {
			if (std::chrono::steady_clock::now() > deadline || sd_event_run(event, 100'000) < 0)
				return false;
		}
		return true;
	}
	void run_until(const std::function<bool()> &done, const char *what)
	{
		if (!run_for(done))
			FAIL("timed out waiting for: " << std::string(what));
	}

	std::size_t count(EventKind kind) const
	{
		return static_cast<std::size_t>(std::count_if(events.begin(), events.end(),
		                                              [&](const Event &e) { return e.kind == kind; }));
	}

	Instance &instance(std::size_t gen = 0)
	{
		Service *svc = sup->find_service("web");
		REQUIRE(svc);
		REQUIRE(svc->generations.size() > gen);
		REQUIRE(!svc->generations[gen]->instances.empty());
		return *svc->generations[gen]->instances.back();
	}

	// The fake worker said "up": it is past its signal setup.
	void wait_up(Instance &inst)
	{
		run_until([&] { return std::find(inst.last_lines.begin(), inst.last_lines.end(), "up") != inst.last_lines.end(); },
		          "the worker's \"up\" line");
	}

	// The service's first instance, ready.
	Instance &serving(const std::string &version)
	{
		sup->add_service(service(version));
		Instance &inst = instance(0);
		wait_up(inst);
		sup->instance_ready(inst, "test");
		return inst;
	}

	std::variant<Event, Refusal> upgrade_to(const std::string &version)
	{
		UpgradeRequest req;
		req.cfg = service(version);
		return sup->begin_upgrade(*sup->find_service("web"), std::move(req), &up);
	}

	sd_event *event = nullptr;
	std::list<Listener> listeners;
	FakeWorkers workers;
	std::vector<Event> events;
	// Observers of a stop and an upgrade: they outlive the supervisor, which may still hold
	// them when a case fails.
	Recorder stop, up;
	std::unique_ptr<Supervisor> sup;
};

} // namespace

TEST_CASE_FIXTURE(Fixture, "lifecycle: a crashed instance waits for its backoff as restarting, with no process, then starts again")
{
	workers.script = {Act::Crash, Act::Serve};
	sup->add_service(service("1"));
	Instance &inst = instance();
	CHECK(workers.pids.size() == 1);

	run_until([&] { return count(EventKind::Failed) == 1; }, "the first start's failure");
	CHECK(inst.state == InstanceState::Restarting);
	CHECK(encode::instance_state(inst.state) == "starting"); // on the wire
	CHECK(inst.pid == 0);
	CHECK(inst.exit_reason == "exited with status 3");
	CHECK(inst.timer);
	CHECK(sup->summary().find("restarting") != std::string::npos);

	run_until([&] { return workers.pids.size() == 2; }, "the restart");
	CHECK(inst.state == InstanceState::Starting);
	CHECK(inst.pid == workers.pids[1]);
	wait_up(inst);
	sup->instance_ready(inst, "test");
	CHECK(inst.state == InstanceState::Ready);
	CHECK(count(EventKind::Started) == 2);
	CHECK(count(EventKind::Ready) == 1);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: a slot that keeps crashing is stopped at the crash loop, and not started again")
{
	workers.script = {Act::Crash};
	sup->add_service(service("1"));
	Instance &inst = instance();

	run_until([&] { return count(EventKind::CrashLoop) == 1; }, "the crash loop");
	// kBurst failures restart; the one after them is the loop.
	CHECK(workers.pids.size() == RestartBackoff::kBurst + 1);
	CHECK(count(EventKind::Failed) == RestartBackoff::kBurst + 1);
	CHECK(inst.state == InstanceState::Failed);
	CHECK(inst.pid == 0);
	CHECK_FALSE(inst.timer); // no restart is pending
	CHECK(sup->summary().find("failed") != std::string::npos);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: a worker not ready within its start timeout is killed, failed, and restarted")
{
	workers.script = {Act::IgnoreDrain, Act::Serve};
	auto cfg = service("1");
	cfg.start_timeout = 200ms;
	sup->add_service(cfg);
	Instance &inst = instance();
	pid_t first = workers.pids.at(0);

	run_until([&] { return count(EventKind::Failed) == 1; }, "the start timeout");
	CHECK(inst.exit_reason == "was not ready within the start timeout (200ms)");
	// SIGKILL, as SIGTERM is ignored: the process is gone, reaped by the supervisor.
	CHECK(::kill(first, 0) == -1);
	CHECK(errno == ESRCH);
	run_until([&] { return workers.pids.size() == 2; }, "the restart");
	CHECK(inst.pid == workers.pids[1]);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: stop drains with the drain signal, and an instance that exits then is not restarted")
{
	workers.script = {Act::Serve};
	auto cfg = service("1");
	cfg.restart = config::RestartPolicy::Always;
	sup->add_service(cfg);
	Instance &inst = instance();
	wait_up(inst);
	sup->instance_ready(inst, "test");

	Service &svc = *sup->find_service("web");
	REQUIRE_FALSE(sup->stop_service(svc, &stop));
	CHECK(inst.state == InstanceState::Draining);
	run_until([&] { return stop.done; }, "the stop");
	CHECK(inst.state == InstanceState::Exited);
	CHECK(inst.exit_reason == "killed by SIGTERM");
	CHECK(count(EventKind::Exited) == 1);
	CHECK(count(EventKind::Failed) == 0);
	CHECK(workers.pids.size() == 1);
	CHECK_FALSE(inst.timer);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: a worker that ignores its drain signal is killed at the drain timeout")
{
	workers.script = {Act::IgnoreDrain};
	auto cfg = service("1");
	cfg.drain_timeout = 200ms;
	sup->add_service(cfg);
	Instance &inst = instance();
	wait_up(inst);
	sup->instance_ready(inst, "test");

	REQUIRE_FALSE(sup->stop_service(*sup->find_service("web"), &stop));
	run_until([&] { return stop.done; }, "the stop");
	CHECK(inst.exit_reason == "killed at the drain timeout");
	CHECK(inst.state == InstanceState::Exited);
	CHECK(workers.pids.size() == 1);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: an upgrade starts the new generation, drains the old one once the new is ready, and is done")
{
	workers.script = {Act::Serve};
	Instance &old_inst = serving("1");
	Service &svc = *sup->find_service("web");
	auto begun = upgrade_to("2");
	REQUIRE(std::holds_alternative<Event>(begun));
	CHECK(std::get<Event>(begun).kind == EventKind::Accepted);
	Instance &new_inst = instance(1);
	CHECK(workers.pids.size() == 2);
	CHECK(new_inst.pid == workers.pids[1]);
	// The old one serves on until the new one is ready.
	CHECK(old_inst.state == InstanceState::Ready);

	wait_up(new_inst);
	sup->instance_ready(new_inst, "test");
	CHECK(old_inst.state == InstanceState::Draining);
	run_until([&] { return up.done; }, "the upgrade's end");
	CHECK(up.last_kind == EventKind::Done);
	CHECK_FALSE(up.failure);
	CHECK(svc.current == svc.generations[1].get());
	CHECK(old_inst.state == InstanceState::Exited);
	CHECK(new_inst.state == InstanceState::Ready);
	CHECK(std::find(up.seen.begin(), up.seen.end(), EventKind::Draining) != up.seen.end());
	CHECK(count(EventKind::Failed) == 0);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: a new instance that crashes during an upgrade rolls it back, and the old one serves on")
{
	workers.script = {Act::Serve, Act::Crash};
	Instance &old_inst = serving("1");
	Service &svc = *sup->find_service("web");
	REQUIRE(std::holds_alternative<Event>(upgrade_to("2")));
	run_until([&] { return up.failure.has_value(); }, "the upgrade's failure");
	CHECK(up.failure->find("exited with status 3") != std::string::npos);
	CHECK(std::find(up.seen.begin(), up.seen.end(), EventKind::Rollback) != up.seen.end());
	CHECK(svc.current == svc.generations[0].get());
	CHECK(old_inst.state == InstanceState::Ready);
	CHECK(old_inst.pid == workers.pids[0]);
	CHECK(workers.pids.size() == 2); // a failed new instance is not restarted
}
