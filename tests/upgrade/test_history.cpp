// A service's history: three generations asked for by two users, rollback --to the first one, the
// refusals of generations it cannot deploy, and the history carried over by brokerctl reexec and
// by a crash of brokerd.
#include "support.hpp"
#include "../skip.hpp"

#include <doctest/doctest.h>

#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

using namespace utest;

namespace {

// brokerctl where any user may run it (the build tree may be closed to nobody), run as nobody
// when the test runs as root, else as the test's own user.
RunResult brokerctl_as_other(const Broker &b, const std::vector<std::string> &args)
{
	std::string path = b.path("brokerctl");
	std::filesystem::copy_file(env("BROKERCTL"), path, std::filesystem::copy_options::overwrite_existing);
	::chmod(path.c_str(), 0755);
	std::vector<std::string> argv = {path, "--socket", b.control_path()};
	argv.insert(argv.end(), args.begin(), args.end());
	SpawnOptions so;
	so.as_nobody = ::geteuid() == 0;
	return run(argv, so);
}

json history(const Broker &b)
{
	RunResult r = brokerctl(b, {"--json", "history", "web"});
	INFO("brokerctl history: ", r.describe());
	REQUIRE(r.exit_code == 0);
	return json::parse(r.out).at("entries");
}

// What the worker of gen `generation` runs as: its BROKER_VERSION and its argv.
std::pair<std::string, std::vector<std::string>> worker_of(Broker &b, int generation)
{
	std::vector<json> insts = generation_instances(b.status("web"), "web", generation);
	REQUIRE(!insts.empty());
	pid_t pid = insts.front().at("pid").get<pid_t>();
	std::string environ = read_file("/proc/" + std::to_string(pid) + "/environ");
	std::string version;
	for (std::size_t at = 0; at < environ.size(); at = environ.find('\0', at) + 1) {
		std::string_view var(environ.c_str() + at);
		if (var.starts_with("BROKER_VERSION="))
			version = var.substr(15);
		if (environ.find('\0', at) == std::string::npos)
			break;
	}
	std::string cmdline = read_file("/proc/" + std::to_string(pid) + "/cmdline");
	std::vector<std::string> argv;
	for (std::size_t at = 0; at < cmdline.size(); at = cmdline.find('\0', at) + 1)
		argv.emplace_back(cmdline.c_str() + at);
	return {version, argv};
}

} // namespace

TEST_CASE("history: three generations by two users then rollback --to the first and reexec and a crash keep the history")
{
	const bool root = ::geteuid() == 0;
	const std::int64_t other_uid = root ? 65534 : ::geteuid(); // without root, one user does it all
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = http_service(1, {{"version", "1"}});
	json cfg = config_with({{"web", web}});
	cfg["control"] = {{"admin_users", {"nobody"}}};
	tb.start(cfg);
	std::uint16_t port = socket_port(b.status(), "http");

	// v2 by root, chosen with --exec; v3 by another admin, from the config file (only root chooses
	// the program of a service that runs as root).
	RunResult r = brokerctl(b, {"upgrade", "web", "--version", "2", "--exec", env("EXAMPLE_C")});
	INFO("upgrade to v2: ", r.describe());
	REQUIRE(r.exit_code == 0);
	web["exec"] = {env("EXAMPLE_C")};
	web["version"] = "3";
	cfg["services"]["web"] = web;
	write_file(b.config_path(), cfg.dump(2));
	r = brokerctl_as_other(b, {"upgrade", "web"});
	INFO("upgrade to v3: ", r.describe());
	REQUIRE(r.exit_code == 0);

	json entries = history(b);
	INFO("history: ", entries.dump());
	REQUIRE(entries.size() == 3);
	const std::string http = env("EXAMPLE_HTTP"), c = env("EXAMPLE_C");
	struct Expected {
		int generation;
		const char *version;
		std::string exec;
		const char *how, *result;
		std::optional<std::int64_t> uid;
	};
	const Expected expected[] = {
		{1, "1", http, "start", "replaced", std::nullopt},
		{2, "2", c, "upgrade", "replaced", 0},
		{3, "3", c, "upgrade", "serving", other_uid},
	};
	for (std::size_t i = 0; i < 3; i++) {
		const json &e = entries[i];
		const Expected &x = expected[i];
		CAPTURE(i);
		CHECK(e.at("generation") == x.generation);
		CHECK(e.at("version") == x.version);
		CHECK(e.at("exec") == json::array({x.exec}));
		CHECK(e.at("how") == x.how);
		CHECK(e.at("result") == x.result);
		CHECK(e.value("uid", json()) == (x.uid ? json(*x.uid) : json()));
		CHECK(e.at("started").get<std::int64_t>() > 0);
		CHECK(e.contains("ended") == (i < 2));
		CHECK_FALSE(e.contains("env"));
	}
	// The table names the users.
	r = brokerctl(b, {"history", "web"});
	INFO("brokerctl history: ", r.describe());
	REQUIRE(r.exit_code == 0);
	CHECK(r.out.starts_with("GEN  VERSION  STARTED"));
	CHECK(r.out.find(" root ") != std::string::npos);
	if (root)
		CHECK(r.out.find(" nobody ") != std::string::npos);

	// rollback --to 1 deploys gen 1's config as gen 4: v1's exec and version.
	r = brokerctl(b, {"rollback", "web", "--to", "1"});
	INFO("rollback --to 1: ", r.describe());
	REQUIRE(r.exit_code == 0);
	json st = b.status("web");
	CHECK(newest_generation(st, "web") == 4);
	check_serves_alone(b, "web", 4, 1);
	auto [version, argv] = worker_of(b, 4);
	CHECK(version == "1");
	CHECK(argv == std::vector<std::string>{http});
	HttpResponse resp = http_get(port);
	CHECK(resp.body.starts_with("hello from web gen 4 "));
	CHECK(resp.body.find("(C)") == std::string::npos); // the C worker of v2 and v3 says so
	entries = history(b);
	REQUIRE(entries.size() == 4);
	CHECK(entries[3].at("how") == "rollback");
	CHECK(entries[3].at("version") == "1");
	CHECK(entries[3].at("result") == "serving");
	CHECK(entries[3].value("uid", json()) == ::geteuid());
	CHECK(entries[2].at("result") == "replaced");

	// Generations it cannot deploy: unknown, and the one that serves.
	r = brokerctl(b, {"rollback", "web", "--to", "99"});
	INFO("rollback --to 99: ", r.describe());
	CHECK(r.exit_code == 2);
	CHECK(r.err.find("web has no generation 99 still known; known: 1, 2, 3, 4 (see `brokerctl history web`)") !=
	      std::string::npos);
	r = brokerctl(b, {"rollback", "web", "--to", "4"});
	INFO("rollback --to 4: ", r.describe());
	CHECK(r.exit_code == 2);
	CHECK(r.err.find("gen 4 is the one web runs now") != std::string::npos);
	CHECK(newest_generation(b.status("web"), "web") == 4);

	// brokerctl reexec carries the history over whole.
	r = brokerctl(b, {"reexec"});
	INFO("reexec: ", r.describe());
	REQUIRE(r.exit_code == 0);
	CHECK(history(b) == entries);
	// And what rollback --to deploys with it: gen 2's config as gen 5.
	r = brokerctl(b, {"rollback", "web", "--to", "2"});
	INFO("rollback --to 2 after reexec: ", r.describe());
	REQUIRE(r.exit_code == 0);
	CHECK(worker_of(b, 5).first == "2");

	// A crash of brokerd: the one started again reads the history from the crash state.
	entries = history(b);
	REQUIRE(entries.size() == 5);
	tb.kill9();
	tb.restart();
	CHECK(history(b) == entries);
	b.stop();
}

namespace {

// The real gid of gen `generation`'s first worker, from /proc.
gid_t gid_of(Broker &b, int generation)
{
	std::vector<json> insts = generation_instances(b.status("web"), "web", generation);
	REQUIRE(!insts.empty());
	std::string status = read_file("/proc/" + std::to_string(insts.front().at("pid").get<pid_t>()) + "/status");
	std::size_t at = status.find("\nGid:\t");
	REQUIRE(at != std::string::npos);
	return static_cast<gid_t>(std::stoul(status.substr(at + 6)));
}

} // namespace

// Names resolve at each load of the config: a generation that rollback --to deploys runs with the
// accounts the last reload resolved, as the running generations and a plain rollback do, never
// with those of its own day (a group's gid changed since, say).
TEST_CASE("history: rollback --to runs with the accounts of the config in force")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root, for groupadd and a worker of another user");
	const std::string group = "brokerd-utest-" + std::to_string(::getpid());
	RunResult r = run({"groupadd", group});
	REQUIRE_MESSAGE(r.exit_code == 0, "groupadd: ", r.describe());
	struct Removed {
		std::string name;
		~Removed() { run({"groupdel", name}); }
	} removed{group};
	gid_t next = 60000;
	while (::getgrgid(next) && next > 50000)
		--next;

	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = service({"sleep", "1000"}, {}, 1, "exec");
	web["user"] = "nobody";
	web["group"] = group;
	tb.start(config_with({{"web", web}}));
	brokerctl_ok(b, {"upgrade", "web"});
	const gid_t before = gid_of(b, 2);

	r = run({"groupmod", "-g", std::to_string(next), group});
	REQUIRE_MESSAGE(r.exit_code == 0, "groupmod: ", r.describe());
	brokerctl_ok(b, {"reload"});
	brokerctl_ok(b, {"rollback", "web", "--to", "1"});
	INFO("the group's gid went from ", before, " to ", next);
	CHECK(gid_of(b, 3) == next);
	b.stop();
}
