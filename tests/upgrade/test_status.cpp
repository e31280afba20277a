// What status, is-active and sockets tell a client: each service in one word, why an instance
// failed (its restarts, exit reason and last output), what a generation changed in its env, and
// which services use a socket and how full its accept queue is; across a reexec and a crash.
#include "support.hpp"

#include <doctest/doctest.h>

using namespace utest;

namespace {

constexpr int kNoisy = 70;

// The services of the test, each in the state its name says once it settles.
json config()
{
	json c = config_with({});
	c["sockets"]["parked"] = tcp_socket();
	json crashy = service({"/bin/sh", "-c", "echo 'crashing on purpose' >&2; exit 1"}, {}, 1, "exec");
	crashy["restart"] = "on-failure";
	// Ten lines of 999 bytes each: Status keeps the newest 4 KiB of them, four lines, and 256 KiB
	// in all, which 70 of them pass.
	json noisy = service({"/bin/sh", "-c",
	                      "i=0; while [ $i -lt 10 ]; do i=$((i+1)); printf 'line %02d %0991d\\n' $i 0; done; exit 1"},
	                     {}, kNoisy, "exec");
	noisy["restart"] = "no";
	// Four lines of 999 control bytes each: within 4 KiB as written, six times that as JSON
	// writes them ("\u0001"), which is what the reply's 256 KiB counts.
	json binary = service({"/bin/sh", "-c",
	                       "i=0; while [ $i -lt 4 ]; do i=$((i+1)); head -c 999 /dev/zero | tr '\\0' '\\1'; echo; "
	                       "done; exit 1"},
	                      {}, 2, "exec");
	binary["restart"] = "no";
	c["services"] = {
		{"binary", binary},
		{"noisy", noisy},
		{"web", http_service(1, {{"env", {{"MODE", "plain"}, {"KEEP", "same"}}}})},
		{"crashy", crashy},
		{"halted", service({"sleep", "1000"}, {}, 1, "exec")},
		// Its workers never accept: connections wait in the accept queue.
		{"parked", service({"sleep", "1000"}, {"parked"}, 1, "exec")},
	};
	return c;
}

json status_json(const Broker &b)
{
	RunResult r = brokerctl(b, {"status", "--json"});
	INFO("brokerctl status --json: ", r.describe());
	REQUIRE(r.exit_code == 0);
	return json::parse(r.out);
}

const json *socket_of(const json &reply, const std::string &name)
{
	return find_named(member(reply, "sockets"), name);
}

// crashy's one instance, once its crash loop has stopped it.
json wait_crash_loop(Broker &b)
{
	json st, inst;
	bool failed = wait_until(
		[&] {
			st = b.status("crashy");
			auto insts = instances(st, "crashy");
			if (insts.size() != 1)
				return false;
			inst = insts[0];
			return inst.value("state", "") == "failed" && service_of(st, "crashy")->value("state", "") == "failed";
		},
		30s);
	INFO("Status: ", st.dump());
	REQUIRE(failed);
	return inst;
}

// What Status says of crashy's failed instance and of web's env change, as a client sees it;
// checked at the start, after a reexec and after a crash of brokerd.
void check_reasons(const Broker &b, const std::string &when)
{
	INFO(when);
	json st = status_json(b);
	json inst = instances(st, "crashy").at(0);
	INFO("crashy: ", inst.dump());
	CHECK(inst.value("state", "") == "failed");
	CHECK(inst.value("restarts", -1) == 5); // 1 start and 5 restarts; the 6th failure is the loop
	CHECK(inst.value("exit_reason", "") == "exited with status 1");
	// Its last lines, those of every attempt: one each.
	CHECK(member(inst, "output") == json(std::vector<std::string>(6, "crashing on purpose")));

	auto noisy = instances(st, "noisy");
	REQUIRE(noisy.size() == kNoisy);
	const json &lines = member(noisy.front(), "output");
	INFO("noisy: ", noisy.front().dump());
	CHECK(noisy.front().value("state", "") == "failed");
	CHECK(lines.size() == 4);
	CHECK(lines.front().get<std::string>().starts_with("line 07 "));
	CHECK(lines.back().get<std::string>().starts_with("line 10 "));
	CHECK(lines.back().get<std::string>().size() == 999);
	// The reply's whole budget, counted as the reply writes the lines: those past it come with no
	// lines, and control bytes, six times their size in JSON, cannot take a reply past its limit.
	auto binary = instances(st, "binary");
	REQUIRE(binary.size() == 2);
	CHECK(member(binary.front(), "output").size() == 4);
	std::size_t bytes = 0;
	for (const auto *list : {&binary, &noisy})
		for (const json &inst : *list)
			for (const json &line : member(inst, "output"))
				bytes += line.dump().size() - 2;
	CHECK(bytes > 250'000);
	CHECK(bytes <= 256 * 1024);
	CHECK(member(noisy.back(), "output") == json::array());

	const json *web = service_of(st, "web");
	REQUIRE(web);
	CHECK(web->value("instances", 0) == 1);
	const json &gens = member(*web, "generations");
	const json *newest = nullptr;
	for (const json &g : gens)
		if (!newest || g.value("number", 0) > newest->value("number", 0))
			newest = &g;
	REQUIRE(newest);
	INFO("web: ", web->dump());
	CHECK(newest->value("number", 0) == 2);
	CHECK(newest->value("started", std::int64_t{0}) > 0);
	// MODE changed value and TOKEN came: named, their values never shown.
	CHECK(member(*newest, "env") ==
	      json{{{"name", "MODE"}, {"change", "changed"}}, {{"name", "TOKEN"}, {"change", "added"}}});
	CHECK(st.dump().find("s3cret") == std::string::npos);

	RunResult text = brokerctl(b, {"status", "crashy"});
	INFO("brokerctl status crashy: ", text.describe());
	CHECK(text.out.find("RESTARTS") != std::string::npos);
	CHECK(text.out.find("  crashy/1/0 failed: exited with status 1\n    crashing on purpose\n") != std::string::npos);
	text = brokerctl(b, {"status", "web"});
	CHECK(text.out.find("MODE changed, TOKEN added") != std::string::npos);
}

} // namespace

TEST_CASE("status: is-active words and why instances failed and env changes and socket queues")
{
	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json cfg = config();
	tb.start(cfg);
	wait_crash_loop(b);

	RunResult r = brokerctl(b, {"stop", "halted"});
	REQUIRE(r.exit_code == 0);
	// Added by reload, it never gets ready: its one instance is starting for an hour.
	json slow = service({"sleep", "1000"}, {}, 1, "notify");
	slow["start_timeout"] = "1h";
	cfg["services"]["slow"] = slow;
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump());
	r = brokerctl(b, {"reload"});
	REQUIRE_MESSAGE(r.exit_code == 0, r.describe());
	bool slow_started = wait_until(
		[&] {
			auto insts = instances(b.status("slow"), "slow");
			return insts.size() == 1 && insts[0].value("pid", 0) > 0;
		},
		20s);
	REQUIRE(slow_started);
	check_serves_alone(b, "web", 1, 1);

	SUBCASE("is-active")
	{
		struct Case {
			std::vector<std::string> services;
			std::string out;
			int exit_code;
		};
		const Case cases[] = {
			{{"web"}, "active\n", 0},
			{{"web", "parked"}, "active\nactive\n", 0},
			{{"slow"}, "activating\n", 3},
			{{"crashy"}, "failed\n", 3},
			{{"halted"}, "inactive\n", 3},
			{{"nope"}, "unknown\n", 5},
			{{"web", "crashy", "halted", "slow"}, "active\nfailed\ninactive\nactivating\n", 3},
			{{"nope", "web", "halted"}, "unknown\nactive\ninactive\n", 5},
		};
		for (const Case &c : cases) {
			std::vector<std::string> args = {"is-active"};
			args.insert(args.end(), c.services.begin(), c.services.end());
			RunResult run = brokerctl(b, args);
			INFO("brokerctl is-active ", joined(c.services), ": ", run.describe());
			CHECK(run.out == c.out);
			CHECK(run.exit_code == c.exit_code);
			args.push_back("--quiet");
			RunResult quiet = brokerctl(b, args);
			CHECK(quiet.out.empty());
			CHECK(quiet.exit_code == c.exit_code);
		}
		RunResult js = brokerctl(b, {"is-active", "--json", "web", "nope"});
		INFO("brokerctl is-active --json: ", js.describe());
		CHECK(js.exit_code == 5);
		CHECK(json::parse(js.out) ==
		      json{{{"service", "web"}, {"state", "active"}}, {{"service", "nope"}, {"state", "unknown"}}});
		RunResult none = brokerctl(b, {"is-active"});
		CHECK(none.exit_code == 2);
	}

	SUBCASE("sockets: the services using each, and an accept queue that grows")
	{
		json st = b.status();
		std::uint16_t port = socket_port(st, "parked");
		auto queue = [&] {
			RunResult s = brokerctl(b, {"sockets", "--json"});
			REQUIRE(s.exit_code == 0);
			json reply = json::parse(s.out);
			const json *parked = socket_of(reply, "parked");
			REQUIRE(parked);
			return *parked;
		};
		json before = queue();
		INFO("parked: ", before.dump());
		CHECK(member(before, "services") == json{"parked"});
		CHECK(before.value("queue", -1) == 0);
		CHECK(before.value("queue_limit", 0) > 0);
		const json *http = socket_of(st, "http");
		REQUIRE(http);
		CHECK(member(*http, "services") == json{"web"});
		CHECK(http->contains("queue"));

		std::vector<UniqueFd> clients;
		for (int i = 0; i < 3; i++)
			clients.push_back(tcp_connect(port));
		json after;
		bool grew = wait_until(
			[&] {
				after = queue();
				return after.value("queue", -1) == 3;
			},
			10s);
		INFO("parked after 3 connections: ", after.dump());
		CHECK(grew);
		RunResult text = brokerctl(b, {"sockets"});
		INFO("brokerctl sockets: ", text.describe());
		CHECK(text.out.find("SERVICES") != std::string::npos);
		std::string limit = std::to_string(after.value("queue_limit", 0));
		CHECK(text.out.find(" 3/" + limit + "\n") != std::string::npos);
	}

	SUBCASE("why it failed and what changed survive a reexec and a crash of brokerd")
	{
		// An upgrade of web that changes MODE and adds TOKEN (its value a secret).
		r = brokerctl(b, {"upgrade", "web", "--env", "MODE=canary", "--env", "TOKEN=s3cret"});
		REQUIRE_MESSAGE(r.exit_code == 0, r.describe());
		check_serves_alone(b, "web", 2, 1);
		check_reasons(b, "before the reexec");

		// A reexec waits for nothing to be starting.
		REQUIRE(brokerctl(b, {"stop", "slow"}).exit_code == 0);
		r = brokerctl(b, {"reexec"});
		REQUIRE_MESSAGE(r.exit_code == 0, r.describe());
		check_reasons(b, "after the reexec");

		tb.kill9();
		tb.restart();
		check_reasons(b, "after a crash of brokerd");
	}
	b.stop();
}
