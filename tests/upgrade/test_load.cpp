// Upgrades under load: consecutive upgrades of each kind of worker, and not one failed request.
#include "support.hpp"

#include <doctest/doctest.h>

using namespace utest;

namespace {

struct Kind {
	const char *name;
	json service;   // the service "web"
	int upgrades;
	bool rewrite;   // also change the config file between upgrades (an env value)
	int rate;       // requests per second of each load mode
};

// Runs `kind.upgrades` upgrades of "web" with brokerctl while both load modes run, and checks
// after each that the new generation, and only it, serves at full capacity.
void upgrades_under_load(const Kind &kind)
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	INFO("worker: ", std::string(kind.name));
	json cfg = config_with({{"web", kind.service}});
	tb.start(cfg);
	const std::size_t count = kind.service["instances"].get<std::size_t>();
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	check_serves_alone(b, "web", 1, count);

	Load load(b, port, "hello from web gen ", kind.rate);
	for (int i = 1; i <= kind.upgrades; ++i) {
		int to = i + 1;
		CAPTURE(to);
		if (kind.rewrite) {
			// Upgrade re-reads the config: each generation gets this file's env.
			cfg["services"]["web"]["env"] = {{"RELEASE", "r" + std::to_string(to)}};
			cfg["control"] = {{"path", b.control_path()}};
			write_file(b.config_path(), cfg.dump(2));
		}
		load.begin_upgrade();
		RunResult r = brokerctl(b, {"upgrade", "web"});
		load.end_upgrade();
		INFO("brokerctl upgrade: ", r.describe());
		REQUIRE(r.exit_code == 0);
		CHECK(r.out.find("gen " + std::to_string(to)) != std::string::npos);

		// The call returns once the old generation has drained: no waiting needed here.
		st = b.status("web");
		std::string why;
		INFO("Status: ", st.dump());
		CHECK_MESSAGE(serves_alone(st, "web", to, count, why), why);
		CHECK(generation_answering(port) == to);
		if (kind.rewrite) {
			for (const auto &inst : generation_instances(st, "web", to)) {
				std::string environ = read_file("/proc/" + std::to_string(inst.value("pid", 0)) + "/environ");
				CHECK(environ.find(std::string("RELEASE=r") + std::to_string(to) + '\0') != std::string::npos);
			}
		}
	}
	std::set<int> seen = load.finish_and_check();
	std::string seen_text;
	for (int g : seen)
		seen_text += std::to_string(g) + " ";
	INFO("generations that answered the load: ", seen_text);
	// Every generation served the load while it was the current one.
	for (int g = 1; g <= kind.upgrades + 1; ++g)
		CHECK(seen.count(g) == 1);
	CHECK(*seen.rbegin() == kind.upgrades + 1);
	b.stop();
}

} // namespace

TEST_CASE("load: 10 upgrades of a client-lib worker")
{
	upgrades_under_load({"broker-example-http", http_service(2, {{"drain", {{"timeout", "20s"}}}}), 10, true, 0});
}

TEST_CASE("load: 6 upgrades of a LISTEN_FDS and sd_notify worker")
{
	upgrades_under_load({"broker-example-python", python_service(2, {{"drain", {{"timeout", "20s"}}}}), 6, true, 1000});
}

TEST_CASE("load: all-at-once upgrades with batch 2")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	tb.start(config_with({{"web", http_service(3)}}));
	std::uint16_t port = socket_port(b.status(), "http");
	Load load(b, port, "hello from web gen ");
	for (int to = 2; to <= 4; ++to) {
		CAPTURE(to);
		load.begin_upgrade();
		std::vector<std::string> args = {"upgrade", "web", "--all-at-once"};
		if (to % 2)
			args = {"upgrade", "web", "--batch", "2"};
		RunResult r = brokerctl(b, args);
		load.end_upgrade();
		INFO("brokerctl upgrade: ", r.describe());
		REQUIRE(r.exit_code == 0);
		check_serves_alone(b, "web", to, 3);
	}
	load.finish_and_check();
	b.stop();
}
