// The spawner's plan as a table: what a worker is started with, computed before fork, with every
// buffer the child uses allocated in the plan.
#include "supervisor/spawner.hpp"

#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <map>
#include <string>
#include <vector>

using brokerd::SpawnInputs;
using brokerd::SpawnPlan;
using brokerd::plan_spawn;

namespace {

struct Case {
	const char *name;
	std::vector<std::string> inherited;      // brokerd's own
	std::vector<std::string> sockets;        // names; their fds are 10, 11, ...
	std::map<std::string, std::string> env;  // the service's
	std::string user;                        // with credentials changed when set
	std::vector<std::string> expected;       // the worker's environment, in order; no LISTEN_PID
	bool listen_pid;
};

// What brokerd always tells a worker, after what it inherits.
std::vector<std::string> told(std::vector<std::string> before, std::vector<std::string> after = {})
{
	for (const char *e : {"NOTIFY_SOCKET=@notify", "BROKER_SOCKET=/run/brokerd.sock", "BROKER_TOKEN=t0k3n",
	                      "BROKER_SERVICE=web", "BROKER_INSTANCE=web/3/1", "BROKER_GENERATION=3"})
		before.push_back(e);
	before.insert(before.end(), after.begin(), after.end());
	return before;
}

const Case kCases[] = {
	{"brokerd's own LISTEN_*, NOTIFY_SOCKET, WATCHDOG_*, JOURNAL_STREAM and BROKER_* are not inherited",
	 {"PATH=/bin", "LISTEN_FDS=9", "LISTEN_PID=1", "LISTEN_FDNAMES=x", "NOTIFY_SOCKET=/x", "WATCHDOG_USEC=1",
	  "WATCHDOG_PID=1", "JOURNAL_STREAM=1:2", "BROKER_TOKEN=old", "LANG=C"},
	 {}, {}, "", told({"PATH=/bin", "LANG=C"}), false},
	{"sockets: LISTEN_FDS and LISTEN_FDNAMES in fd order, and room for LISTEN_PID",
	 {"PATH=/bin"}, {"http", "admin"}, {}, "",
	 told({"PATH=/bin", "LISTEN_FDS=2", "LISTEN_FDNAMES=http:admin"}), true},
	{"the service's env overrides what is inherited and what brokerd says, and comes last",
	 {"PATH=/bin", "LANG=C"}, {}, {{"LANG", "de_DE"}, {"BROKER_SERVICE", "mine"}}, "",
	 {"PATH=/bin", "NOTIFY_SOCKET=@notify", "BROKER_SOCKET=/run/brokerd.sock", "BROKER_TOKEN=t0k3n",
	  "BROKER_INSTANCE=web/3/1", "BROKER_GENERATION=3", "BROKER_SERVICE=mine", "LANG=de_DE"},
	 false},
	{"a worker run as another user gets its HOME, USER and LOGNAME",
	 {"HOME=/root", "USER=root", "LOGNAME=root", "PATH=/bin"}, {}, {}, "www",
	 told({"PATH=/bin"}, {"HOME=/home/www", "USER=www", "LOGNAME=www"}), false},
};

SpawnPlan plan_for(const Case &c, const brokerd::config::ServiceConfig &cfg, std::vector<char *> &inherited)
{
	SpawnInputs in(cfg);
	in.program = "/usr/bin/worker";
	in.inherited = inherited.data();
	in.socket_names = c.sockets;
	for (std::size_t i = 0; i < c.sockets.size(); i++)
		in.socket_fds.push_back(10 + static_cast<int>(i));
	in.notify_address = "@notify";
	in.control_path = "/run/brokerd.sock";
	in.token = "t0k3n";
	in.service = "web";
	in.instance = "web/3/1";
	in.generation = 3;
	in.nofile = {1024, 4096};
	return plan_spawn(in);
}

} // namespace

TEST_CASE("the spawn plan: the worker's environment, argv, cwd and fds")
{
	for (const Case &c : kCases) {
		CAPTURE(c.name);
		brokerd::config::ServiceConfig cfg;
		cfg.exec = {"worker", "--port", "8080"};
		cfg.env = c.env;
		cfg.user = c.user;
		if (!c.user.empty()) // as the config's load resolved it
			cfg.accounts.creds = {true, 33, 33, {33, 4}, "/home/www"};
		std::vector<std::string> env_storage = c.inherited;
		std::vector<char *> inherited;
		for (auto &e : env_storage)
			inherited.push_back(e.data());
		inherited.push_back(nullptr);

		SpawnPlan plan = plan_for(c, cfg, inherited);

		CHECK(plan.program == "/usr/bin/worker");
		CHECK(plan.args == cfg.exec);
		CHECK(plan.cwd == "/");
		CHECK(plan.nofile.rlim_cur == 1024);
		CHECK(plan.creds.change == !c.user.empty());
		std::vector<std::string> env = plan.env;
		if (c.listen_pid) {
			REQUIRE(plan.listen_pid == static_cast<int>(plan.env.size()) - 1);
			CHECK(env.back().starts_with("LISTEN_PID="));
			env.pop_back();
		} else {
			CHECK(plan.listen_pid == -1);
		}
		for (auto &e : env)
			e = e.c_str(); // the LISTEN_PID slot aside, no entry has room to spare
		CHECK(env == c.expected);

		// 0, 1, 2 and the status pipe are the spawner's to fill in; the sockets sit at 3..
		std::vector<int> fds = {-1, -1, -1};
		for (std::size_t i = 0; i < c.sockets.size(); i++)
			fds.push_back(10 + static_cast<int>(i));
		fds.push_back(-1);
		CHECK(plan.fds == fds);
		CHECK(plan.lifted.size() == plan.fds.size());
	}
}

TEST_CASE("the spawn plan holds every buffer the child uses, and a move keeps them valid")
{
	brokerd::config::ServiceConfig cfg;
	cfg.exec = {"worker", "a-long-argument-beyond-the-small-string-buffer", "x"};
	cfg.cwd = "/srv/www";
	std::vector<char *> inherited = {nullptr};
	const Case &c = kCases[1]; // with sockets: a LISTEN_PID slot
	SpawnPlan moved = plan_for(c, cfg, inherited);
	SpawnPlan plan = std::move(moved);

	CHECK(plan.cwd == "/srv/www");
	REQUIRE(plan.argv.size() == plan.args.size() + 1);
	for (std::size_t i = 0; i < plan.args.size(); i++)
		CHECK(plan.argv[i] == plan.args[i].data());
	CHECK(plan.argv.back() == nullptr);
	REQUIRE(plan.envp.size() == plan.env.size() + 1);
	for (std::size_t i = 0; i < plan.env.size(); i++)
		CHECK(plan.envp[i] == plan.env[i].data());
	CHECK(plan.envp.back() == nullptr);

	// The child writes its pid after "LISTEN_PID=" without allocating: the slot has room for
	// the largest pid (2^22, 7 digits) and its terminating NUL.
	REQUIRE(plan.listen_pid >= 0);
	const std::string &slot = plan.env[static_cast<std::size_t>(plan.listen_pid)];
	CHECK(slot.size() >= std::string("LISTEN_PID=").size() + 8);
	CHECK(std::string(slot.c_str()) == "LISTEN_PID=");
}

namespace {

// Runs `sh -c script` through fork_and_exec with a go pipe, which `let_go` says whether to write
// before closing. Returns the child's exit status and what its status pipe reported (bytes).
struct GoRun {
	int status = -1;
	std::size_t reported = 0;
};

GoRun run_with_go(const std::string &script, bool let_go)
{
	brokerd::config::ServiceConfig cfg;
	cfg.exec = {"sh", "-c", script};
	SpawnInputs in(cfg);
	in.program = "/bin/sh";
	std::vector<char *> inherited = {nullptr};
	in.inherited = inherited.data();
	SpawnPlan plan = plan_spawn(in);
	brokerd::ChildPipes pipes;
	REQUIRE_FALSE(brokerd::open_child_pipes(pipes));
	plan.fds[0] = pipes.devnull.get();
	plan.fds[1] = pipes.devnull.get();
	plan.fds[2] = pipes.devnull.get();
	plan.fds.back() = pipes.status_w.get();
	plan.go_read = pipes.go_r.get();
	plan.go_write = pipes.go_w.get();
	pid_t pid = brokerd::fork_and_exec(plan);
	REQUIRE(pid > 0);
	pipes.status_w.reset();
	pipes.go_r.reset();
	if (let_go)
		REQUIRE(::write(pipes.go_w.get(), "g", 1) == 1);
	pipes.go_w.reset(); // as when brokerd dies
	GoRun run;
	char buf[64];
	ssize_t n;
	while ((n = ::read(pipes.status_r.get(), buf, sizeof buf)) > 0)
		run.reported += static_cast<std::size_t>(n);
	int st = 0;
	REQUIRE(::waitpid(pid, &st, 0) == pid);
	run.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	return run;
}

} // namespace

TEST_CASE("the go pipe: a child runs only once brokerd lets it go, and ends if brokerd dies first")
{
	char dir[] = "/tmp/brokerd-go-XXXXXX";
	REQUIRE(::mkdtemp(dir));
	std::string ran = std::string(dir) + "/ran";
	std::string script = "echo ran > " + ran;

	GoRun never = run_with_go(script, false);
	CHECK(never.status == 127);
	CHECK(never.reported > 0); // why, on the status pipe: cancelled before setup
	CHECK(::access(ran.c_str(), F_OK) != 0);

	GoRun go = run_with_go(script, true);
	CHECK(go.status == 0);
	CHECK(go.reported == 0); // the status pipe closed at exec, with nothing on it
	CHECK(::access(ran.c_str(), F_OK) == 0);

	::unlink(ran.c_str());
	::rmdir(dir);
}
