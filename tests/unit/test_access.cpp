// The access table and the program-choice rule, as tables of callers, methods and services.
#include "control/access.hpp"

#include <doctest/doctest.h>

#include <string>

using brokerd::access::Tier;
namespace access = brokerd::access;

TEST_CASE("each Control method names the tier it needs")
{
	struct Case {
		const char *method;
		std::optional<Tier> tier;
	};
	for (const Case &c : {
		     Case{"Status", Tier::Reader},  Case{"Sockets", Tier::Reader}, Case{"Watch", Tier::Reader},
		     Case{"Upgrade", Tier::Admin},  Case{"Rollback", Tier::Admin}, Case{"Restart", Tier::Admin},
		     Case{"Abort", Tier::Admin},    Case{"Start", Tier::Admin},    Case{"Stop", Tier::Admin},
		     Case{"Reload", Tier::Admin},   Case{"Reexec", Tier::Admin},   Case{"Hello", std::nullopt},
		     Case{"status", std::nullopt},  Case{"", std::nullopt},
	     }) {
		INFO(c.method);
		CHECK(access::required(c.method) == c.tier);
	}
	CHECK(Tier::Root > Tier::Admin);
	CHECK(Tier::Admin > Tier::Reader);
	CHECK(Tier::Reader > Tier::Worker);
}

TEST_CASE("only root chooses the program, arguments or environment of a service that runs as root")
{
	constexpr uid_t kRootBroker = 0;
	constexpr uid_t kNobody = 65534;
	struct Case {
		const char *user;
		const char *group;
		Tier caller;
		uid_t broker_uid;
		bool allowed;
	};
	for (const Case &c : {
		     Case{"", "", Tier::Root, kRootBroker, true},
		     Case{"", "", Tier::Admin, kRootBroker, false},         // brokerd's own user: root
		     Case{"", "nogroup", Tier::Admin, kRootBroker, false},  // still brokerd's uid
		     Case{"root", "", Tier::Admin, kRootBroker, false},
		     Case{"nobody", "", Tier::Admin, kRootBroker, true},
		     Case{"nobody", "", Tier::Reader, kRootBroker, true},   // (readers cannot call Upgrade at all)
		     Case{"nobody", "root", Tier::Admin, kRootBroker, false}, // root's group
		     Case{"nobody", "", Tier::Admin, kNobody, false},       // brokerd's own user
		     Case{"no-such-user-brokerd-test", "", Tier::Admin, kRootBroker, false},
		     Case{"root", "root", Tier::Root, kRootBroker, true},
	     }) {
		brokerd::config::ServiceConfig cfg;
		cfg.name = "web";
		cfg.user = c.user;
		cfg.group = c.group;
		brokerd::config::resolve_accounts(cfg); // as a load does
		auto why = access::program_choice(c.caller, cfg, c.broker_uid, c.broker_uid == 0 ? 0 : 65534);
		INFO("user \"", c.user, "\" group \"", c.group, "\" caller ", access::tier_name(c.caller), ": ",
		     why.value_or("allowed"));
		CHECK(!why.has_value() == c.allowed);
		if (why)
			CHECK(why->find("services.web") == 0);
	}
}
