// Accounts: a config's user and group names resolved once per load, through a fake account
// database that counts what it is asked; then the register rule, the spawn plan and the
// program-choice rule read what the load resolved and ask nothing more.
#include "config/config.hpp"
#include "control/access.hpp"
#include "supervisor/spawner.hpp"

#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace config = brokerd::config;
using brokerd::access::program_choice;
using brokerd::access::Tier;

namespace {

// An account database whose names exist nowhere else (a lookup of them in the system's answers
// "no such user"), counting every question: "user NAME", "group NAME", "groups NAME".
struct FakeAccounts {
	std::map<std::string, int> asked;

	int total() const
	{
		int n = 0;
		for (const auto &[question, count] : asked)
			n += count;
		return n;
	}

	config::Resolver resolver()
	{
		config::Resolver r;
		r.user = [this](const std::string &name) -> std::optional<config::UserEntry> {
			asked["user " + name]++;
			if (name == "zz-alice")
				return config::UserEntry{4101, 4201, "/home/zz-alice"};
			if (name == "zz-bob")
				return config::UserEntry{4102, 4202, "/home/zz-bob"};
			if (name == "zz-toor") // another name for uid 0
				return config::UserEntry{0, 0, "/root"};
			return std::nullopt;
		};
		r.group = [this](const std::string &name) -> std::optional<gid_t> {
			asked["group " + name]++;
			if (name == "zz-staff")
				return 4301;
			return std::nullopt;
		};
		r.groups = [this](const std::string &name, gid_t gid) {
			asked["groups " + name]++;
			return std::vector<gid_t>{gid, 4302};
		};
		return r;
	}
};

// Services that name the same users and groups again and again, and register names no database
// has.
constexpr const char *kConfig = R"({
	"sockets": { "http": { "listen": "tcp://127.0.0.1:0" } },
	"services": {
		"web": { "exec": ["/bin/true"], "sockets": ["http"], "user": "zz-alice", "group": "zz-staff" },
		"api": { "exec": ["/bin/true"], "user": "zz-alice" },
		"ext": { "ready": "broker", "register": { "users": ["zz-alice", "zz-bob", "zz-ghost"],
		                                          "groups": ["zz-staff", "zz-nogroup"] } }
	}
})";

// config::load of `text`, from a file that closes with the test.
config::Config load_text(const std::string &text, const config::Resolver &resolver)
{
	int fd = ::memfd_create("brokerd.json", MFD_CLOEXEC);
	REQUIRE(fd >= 0);
	REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
	config::Config cfg = config::load("/proc/self/fd/" + std::to_string(fd), resolver);
	::close(fd);
	return cfg;
}

} // namespace

TEST_CASE("a config's load resolves each user and group name once, whoever names it")
{
	FakeAccounts db;
	config::Config cfg = load_text(kConfig, db.resolver());

	// zz-alice: a service user twice and a register user, asked once; its groups only because
	// a service runs as it.
	CHECK(db.asked == std::map<std::string, int>{{"user zz-alice", 1}, {"groups zz-alice", 1}, {"user zz-bob", 1},
	                                              {"user zz-ghost", 1}, {"group zz-staff", 1}, {"group zz-nogroup", 1}});

	const config::Accounts &web = cfg.find_service("web")->accounts;
	CHECK(web.resolved);
	CHECK(web.unknown == "");
	CHECK(web.creds.change);
	CHECK(web.creds.uid == 4101);
	CHECK(web.creds.gid == 4301);
	CHECK(web.creds.groups == std::vector<gid_t>{4201, 4302, 4301});
	CHECK(web.creds.home == "/home/zz-alice");

	const config::Accounts &api = cfg.find_service("api")->accounts;
	CHECK(api.creds.uid == 4101);
	CHECK(api.creds.gid == 4201);
	CHECK(api.creds.groups == std::vector<gid_t>{4201, 4302});

	// Register names that did not resolve are left out: they match nobody.
	const config::Accounts &ext = cfg.find_service("ext")->accounts;
	CHECK(ext.register_uids == std::vector<uid_t>{4101, 4102});
	CHECK(ext.register_gids == std::vector<gid_t>{4301});
	CHECK_FALSE(ext.creds.change);

	// A second load asks again: an account created since is seen at the next reload.
	load_text(kConfig, db.resolver());
	CHECK(db.asked.at("user zz-alice") == 2);
	CHECK(db.total() == 12);
}

TEST_CASE("a service's unknown user or group refuses the load; in a re-exec's restored config it fails the spawn")
{
	FakeAccounts db;
	CHECK_THROWS_WITH_AS(config::parse(R"({"services": {"lost": {"exec": ["/bin/true"], "user": "zz-ghost"}}})",
	                                   db.resolver()),
	                     "services.lost.user: no such user \"zz-ghost\"", config::ConfigError);
	CHECK_THROWS_WITH_AS(config::parse(R"({"services": {"lost": {"exec": ["/bin/true"], "user": "zz-alice",
	                                                     "group": "zz-nogroup"}}})", db.resolver()),
	                     "services.lost.group: no such group \"zz-nogroup\"", config::ConfigError);

	// A re-exec restores configs that were valid when loaded; a user gone since is kept as why.
	config::ServiceConfig lost;
	lost.name = "lost";
	lost.user = "zz-ghost";
	lost.group = "zz-staff";
	config::resolve_accounts(lost, db.resolver());
	CHECK(lost.accounts.resolved);
	CHECK(lost.accounts.unknown == "no such user \"zz-ghost\"");
	CHECK_FALSE(lost.accounts.creds.change);
	CHECK(program_choice(Tier::Admin, lost, 0, 0) ==
	      "services.lost: no such user \"zz-ghost\": only root may choose the program, arguments or environment it runs");
}

TEST_CASE("the register rule reads the ids the load resolved and asks nothing per Hello")
{
	FakeAccounts db;
	config::Config cfg = load_text(kConfig, db.resolver());
	const int asked = db.total();
	const config::Accounts &ext = cfg.find_service("ext")->accounts;

	struct Case {
		const char *who;
		uid_t uid;
		std::vector<gid_t> groups;
		bool allowed;
	};
	for (const Case &c : {
		     Case{"a listed user", 4101, {100}, true},
		     Case{"another listed user", 4102, {}, true},
		     Case{"in a listed group, not its primary", 5000, {5000, 4301}, true},
		     Case{"neither", 5000, {5000, 4302}, false},
		     Case{"root, not listed", 0, {0}, false},
		     Case{"the uid of a listed group's id", 4301, {5000}, false},
	     }) {
		CAPTURE(c.who);
		CHECK(ext.may_register(c.uid, c.groups) == c.allowed);
	}
	// A service whose names were never resolved lets nobody in.
	config::ServiceConfig unresolved;
	unresolved.register_users = {"root"};
	CHECK_FALSE(unresolved.accounts.may_register(0, {0}));
	CHECK(db.total() == asked);
}

TEST_CASE("the spawn plan and the program-choice rule read the credentials the load resolved")
{
	FakeAccounts db;
	config::Config cfg = load_text(kConfig, db.resolver());
	const int asked = db.total();

	const config::ServiceConfig &web = *cfg.find_service("web");
	brokerd::SpawnInputs in(web);
	in.program = "/bin/true";
	char *no_env[] = {nullptr};
	in.inherited = no_env;
	brokerd::SpawnPlan plan = plan_spawn(in);
	CHECK(plan.creds.change);
	CHECK(plan.creds.uid == 4101);
	CHECK(plan.creds.gid == 4301);
	CHECK(plan.creds.groups == std::vector<gid_t>{4201, 4302, 4301});
	CHECK(std::count(plan.env.begin(), plan.env.end(), "HOME=/home/zz-alice") == 1);
	CHECK(std::count(plan.env.begin(), plan.env.end(), "USER=zz-alice") == 1);

	// An admin may choose zz-alice's program; not one of a service that resolved to uid 0.
	CHECK(program_choice(Tier::Admin, web, 0, 0) == std::nullopt);
	config::Config root = load_text(R"({"services": {"r": {"exec": ["/bin/true"], "user": "zz-toor"}}})",
	                                db.resolver());
	const int asked_root = db.total();
	CHECK(program_choice(Tier::Admin, *root.find_service("r"), 0, 0) ==
	      "services.r runs as user \"zz-toor\", uid 0: only root may choose the program, arguments or environment "
	      "it runs");
	CHECK(db.total() == asked_root);
	CHECK(asked_root == asked + 2);
}

TEST_CASE("a reload hands the running generations' config the accounts it resolved, when the names match")
{
	FakeAccounts db;
	config::ServiceConfig running;
	running.user = "zz-alice";
	running.accounts.unknown = "no such user \"zz-alice\""; // not there at the last load
	config::ServiceConfig loaded = running;
	config::resolve_accounts(loaded, db.resolver());
	config::refresh_accounts(running, loaded);
	CHECK(running.accounts.unknown == "");
	CHECK(running.accounts.creds.uid == 4101);

	config::ServiceConfig other_user;
	other_user.user = "zz-bob";
	config::refresh_accounts(other_user, loaded);
	CHECK_FALSE(other_user.accounts.resolved);
	CHECK_FALSE(other_user.accounts.creds.change);
}
