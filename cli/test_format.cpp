// Unit tests of brokerctl's pure helpers: elapsed and relative times, tables, status views, argument
// values, the progress and watch displays, and the suggestion for a mistyped word.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "arguments.hpp"
#include "errors.hpp"
#include "format.hpp"
#include "progress.hpp"
#include "remote.hpp"
#include "render.hpp"
#include "proto/suggest.hpp"

#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <cstdlib>
#include <ctime>
#include <sstream>

using namespace brokerctl;
using namespace std::chrono_literals;
using json = nlohmann::json;

TEST_CASE("format_ago is relative to now, to the second")
{
	const std::int64_t now = 1'700'000'000'000'000;
	struct Case {
		std::int64_t since;
		const char *out;
	};
	const Case cases[] = {
		{now - 12'000'000, "12s ago"},
		{now - 12'900'000, "12s ago"},
		{now - 192'000'000, "3m12s ago"},
		{now - 500'000, "just now"},
		{now + 5'000'000, "just now"}, // clocks disagree
		{0, "-"},                      // unknown
	};
	for (const Case &c : cases) {
		CAPTURE(c.since);
		CHECK(format_ago(c.since, now) == c.out);
	}
}

TEST_CASE("printable defuses terminal control characters")
{
	CHECK(printable("ok") == "ok");
	CHECK(printable("a\tb") == "a b");
	CHECK(printable("\x1b]0;pwned\x07") == "?]0;pwned?");
	CHECK(printable("x\xc2\x9by") == "x?y"); // C1 CSI
	CHECK(printable("caf\xc3\xa9") == "caf\xc3\xa9");
}

TEST_CASE("shell_join quotes only what needs it")
{
	CHECK(shell_join({"/usr/bin/app", "--port=80"}) == "/usr/bin/app --port=80");
	CHECK(shell_join({"sh", "-c", "echo it's"}) == "sh -c 'echo it'\\''s'");
	CHECK(shell_join({"a", ""}) == "a ''");
}

TEST_CASE("Table aligns columns without trailing blanks")
{
	Table t({"NAME", "ADDRESS", "KIND"});
	t.add({"http", "tcp://0.0.0.0:8080", "tcp"});
	t.add({"api", "unix:/run/app/api.sock", "unix"});
	t.add({"caf\xc3\xa9", "x"}); // short row, and a two-byte character that takes one column
	CHECK(t.rows() == 3);
	CHECK(t.render("  ") ==
	      "  NAME  ADDRESS                 KIND\n"
	      "  http  tcp://0.0.0.0:8080      tcp\n"
	      "  api   unix:/run/app/api.sock  unix\n"
	      "  caf\xc3\xa9  x\n");
}

TEST_CASE("render_status")
{
	const std::int64_t now = 1'700'000'000'000'000;
	json status = {
		{"version", "0.1.0"},
		{"pid", 1234},
		{"uptime_usec", 192'000'000},
		{"sockets",
		 {{{"name", "http"}, {"address", "tcp://0.0.0.0:8080"}, {"kind", "tcp"}, {"origin", "bound"},
		   {"services", {"web"}}, {"queue", 3}, {"queue_limit", 4096}},
		  {{"name", "dns"}, {"address", "udp://[::]:5353"}, {"kind", "udp"}, {"origin", "systemd"},
		   {"services", json::array()}}}},
		{"services",
		 {{{"name", "web"},
		   {"sockets", {"http"}},
		   {"ready", "broker"},
		   {"state", "running"},
		   {"instances", 2},
		   {"generations",
		    {{{"number", 2},
		      {"version", "1.0"},
		      {"exec", {"/usr/bin/web"}},
		      {"started", now - 600'000'000},
		      {"env", json::array()},
		      {"instances",
		       {{{"id", "web/2/0"}, {"index", 0}, {"pid", 40}, {"state", "draining"},
		         {"since", now - 2'000'000}, {"status", nullptr}, {"restarts", 0}}}}},
		     {{"number", 3},
		      {"version", "1.1"},
		      {"exec", {"/usr/bin/web", "--mode", "fast lane"}},
		      {"started", now - 12'000'000},
		      {"env", {{{"name", "MODE"}, {"change", "changed"}}, {{"name", "TOKEN"}, {"change", "added"}}}},
		      {"instances",
		       {{{"id", "web/3/0"}, {"index", 0}, {"pid", 4242}, {"state", "ready"},
		         {"since", now - 12'000'000}, {"status", "serving 12 req/s"}, {"restarts", 0}},
		        {{"id", "web/3/1"}, {"index", 1}, {"pid", 0}, {"state", "failed"},
		         {"since", now - 3'000'000}, {"restarts", 5}, {"exit_reason", "exited with status 1"},
		         {"output", {"listen: bad port", "giving up\x1b[2J"}}},
		        {{"id", "web/3/2"}, {"index", 2}, {"pid", 0}, {"state", "starting"},
		         {"since", now - 1'000'000}, {"restarts", 1}, {"exit_reason", "killed by signal 9"},
		         {"output", json::array()}}}}}}}},
		  {{"name", "idle"}, {"sockets", json::array()}, {"ready", "exec"}, {"generations", json::array()}}}},
	};

	SUBCASE("everything")
	{
		CHECK(render_status(status, now) ==
		      "brokerd 0.1.0, pid 1234, up 3m12s\n"
		      "\n"
		      "SOCKETS\n"
		      "NAME  ADDRESS             KIND  ORIGIN   SERVICES  QUEUE\n"
		      "http  tcp://0.0.0.0:8080  tcp   bound    web       3/4096\n"
		      "dns   udp://[::]:5353     udp   systemd  -         -\n"
		      "\n"
		      "SERVICE web\n"
		      "  sockets:      http\n"
		      "  ready:        broker\n"
		      "  state:        running\n"
		      "  instances:    2\n"
		      "  GENERATIONS\n"
		      "  GEN  VERSION  STARTED  EXEC                             ENV\n"
		      "  3    1.1      12s ago  /usr/bin/web --mode 'fast lane'  MODE changed, TOKEN added\n"
		      "  2    1.0      10m ago  /usr/bin/web                     -\n"
		      "  INSTANCES\n"
		      "  ID       GEN  PID   STATE     SINCE    RESTARTS  STATUS\n"
		      "  web/3/0  3    4242  ready     12s ago  0         serving 12 req/s\n"
		      "  web/3/1  3    -     failed    3s ago   5\n"
		      "  web/3/2  3    -     starting  1s ago   1\n"
		      "  web/2/0  2    40    draining  2s ago   0\n"
		      "  web/3/1 failed: exited with status 1\n"
		      "    listen: bad port\n"
		      "    giving up?[2J\n"
		      "  web/3/2 starting: killed by signal 9\n"
		      "\n"
		      "SERVICE idle\n"
		      "  sockets:      -\n"
		      "  ready:        exec\n"
		      "  state:        -\n"
		      "  instances:    -\n"
		      "  GENERATIONS\n"
		      "  GEN  VERSION  STARTED  EXEC  ENV\n"
		      "  INSTANCES\n"
		      "  ID  GEN  PID  STATE  SINCE  RESTARTS  STATUS\n");
	}

	SUBCASE("one service, with only its sockets")
	{
		std::string out = render_status(status, now, "web");
		CHECK(out.find("SERVICE web\n") != std::string::npos);
		CHECK(out.find("SERVICE idle") == std::string::npos);
		CHECK(out.find("http  tcp://") != std::string::npos);
		CHECK(out.find("dns") == std::string::npos);
	}

	SUBCASE("an upgrade under way")
	{
		status["services"][0]["upgrade"] = {{"generation", 4}, {"from", 3}, {"phase", "draining"}, {"started", 3},
		                                    {"ready", 2}, {"drained", 1}, {"total_new", 4}, {"total_old", 4}};
		std::string out = render_status(status, now, "web");
		CHECK(out.find("  instances:    2\n"
		               "  upgrade:      gen 3 -> 4, 2/4 ready, 1/4 drained (draining)\n") != std::string::npos);
	}

	SUBCASE("a count set by brokerctl scale says so")
	{
		status["services"][0]["scaled"] = true;
		std::string out = render_status(status, now, "web");
		CHECK(out.find("  instances:    2 (scaled: later upgrades keep it)\n") != std::string::npos);
	}

	SUBCASE("a reply with missing and mistyped members still renders")
	{
		json odd = {{"services", {{{"name", 7}, {"generations", {{{"number", 4}, {"instances", {json::object()}}}}}}}}};
		std::string out = render_status(odd, now);
		CHECK(out.starts_with("brokerd -, pid -\n"));
		CHECK(out.find("SERVICE -\n") != std::string::npos);
		CHECK(out.find("  4    -        -        -     -\n") != std::string::npos); // a generation of dashes
		CHECK(out.find(" \n") == std::string::npos); // no trailing blanks, even for empty cells
	}
}

TEST_CASE("active_state: one word per service, as systemctl is-active")
{
	auto inst = [](const char *state) { return json{{"state", state}}; };
	auto svc = [](const char *state, json instances, json upgrade = nullptr, int count = 2) {
		json s = {{"name", "web"}, {"state", state}, {"instances", count},
		          {"generations", {{{"number", 3}, {"instances", std::move(instances)}},
		                           {{"number", 2}, {"instances", {{{"state", "exited"}}}}}}}};
		if (!upgrade.is_null())
			s["upgrade"] = std::move(upgrade);
		return s;
	};
	struct Case {
		const char *name;
		json service; // null: no such service
		const char *word;
	};
	const Case cases[] = {
		{"every instance ready", svc("running", {inst("ready"), inst("ready")}), "active"},
		{"one still starting", svc("running", {inst("ready"), inst("starting")}), "activating"},
		{"fewer than configured", svc("running", {inst("ready")}), "activating"},
		{"an upgrade rolling", svc("running", {inst("ready"), inst("ready")}, {{"generation", 3}}), "activating"},
		{"a crash loop", svc("failed", {inst("failed"), inst("ready")}), "failed"},
		{"a failed instance", svc("running", {inst("ready"), inst("failed")}), "failed"},
		{"stopping", svc("stopped", {inst("draining"), inst("exited")}), "deactivating"},
		{"stopped", svc("stopped", {inst("exited"), inst("exited")}), "inactive"},
		{"all exited cleanly", svc("running", {inst("exited"), inst("exited")}), "inactive"},
		{"no generation (registered)", json{{"name", "edge"}, {"state", "running"}, {"generations", json::array()}},
		 "inactive"},
		{"no such service", nullptr, "unknown"},
	};
	for (const Case &c : cases) {
		INFO(std::string(c.name));
		CHECK(active_state(c.service.is_null() ? nullptr : &c.service) == c.word);
	}
}

TEST_CASE("render_upgrade_info tolerates a partial UpgradeInfo")
{
	CHECK(render_upgrade_info({{"generation", 4}, {"from", 3}, {"ready", 0}, {"total_new", 2}}) ==
	      "gen 3 -> 4, 0/2 ready, -/- drained");
}

TEST_CASE("render_reload lists only what changed")
{
	json reload = {{"added_sockets", {"api", "dns"}},
	               {"removed_sockets", json::array()},
	               {"added_services", {"api"}},
	               {"removed_services", {"old\x1b"}}};
	CHECK(render_reload(reload) == "added sockets:     api, dns\n"
	                               "added services:    api\n"
	                               "removed services:  old?\n");
	CHECK(render_reload({{"added_sockets", json::array()}, {"changed", json::array()}}) ==
	      "config reloaded: nothing changed\n");
}

TEST_CASE("render_reload prints one line per changed setting, with when it takes effect")
{
	json reload = {{"added_services", {"web2"}},
	               {"changed",
	                {{{"service", ""}, {"key", "shutdown.timeout"}, {"from", "1m30s"}, {"to", "30s"}, {"when", "now"}},
	                 {{"service", "web"}, {"key", "instances"}, {"from", "2"}, {"to", "3"}, {"when", "next-upgrade"}},
	                 {{"service", "web"}, {"key", "version"}, {"from", ""}, {"to", "2"}, {"when", "next-upgrade"}},
	                 {{"service", "web"},
	                  {"key", "env"},
	                  {"from", ""},
	                  {"to", "FOO added, BAR changed"},
	                  {"when", "next-upgrade"}},
	                 {{"service", "edge\x1b"},
	                  {"key", "register.users"},
	                  {"from", "[]"},
	                  {"to", "[\"root\"]"},
	                  {"when", "now"}},
	                 {{"service", ""}, {"key", "control.mode"}, {"from", "0666"}, {"to", "0660"}, {"when", "next-start"}},
	                 {{"service", ""},
	                  {"key", "metrics.listen"},
	                  {"from", ""},
	                  {"to", "tcp://127.0.0.1:9469"},
	                  {"when", "next-reexec"}}}}};
	CHECK(render_reload(reload) == "added services:    web2\n"
	                               "brokerd: shutdown.timeout 1m30s\u219230s, now\n"
	                               "web: instances 2\u21923, at the next upgrade\n"
	                               "web: version \"\"\u21922, at the next upgrade\n"
	                               "web: env: FOO added, BAR changed, at the next upgrade\n"
	                               "edge?: register.users []\u2192[\"root\"], now\n"
	                               "brokerd: control.mode 0666\u21920660, at brokerd's next start\n"
	                               "brokerd: metrics.listen \"\"\u2192tcp://127.0.0.1:9469, at brokerd's next reexec or start\n");
}

TEST_CASE("format_elapsed shows tenths under a minute")
{
	struct Case {
		std::chrono::microseconds in;
		const char *out;
	};
	const Case cases[] = {
		{0us, "0.0s"},
		{-1s, "0.0s"},
		{40ms, "0.0s"},
		{50ms, "0.1s"},
		{3200ms, "3.2s"},
		{3249ms, "3.2s"},
		{59940ms, "59.9s"},
		{59960ms, "1m"}, // rounds to a minute: whole seconds from here on
		{3min + 12s + 600ms, "3m13s"},
		{60s, "1m"},
		{3min + 12s + 400ms, "3m12s"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.in.count());
		CHECK(format_elapsed(c.in) == c.out);
	}
}

namespace {

// TZ for one test case, put back after it, so the times compared do not depend on the machine.
class TimeZone {
public:
	explicit TimeZone(const char *tz)
	{
		const char *old = std::getenv("TZ");
		if (old)
			saved_ = old;
		set(tz);
	}
	~TimeZone()
	{
		if (saved_)
			::setenv("TZ", saved_->c_str(), 1);
		else
			::unsetenv("TZ");
		::tzset();
	}
	TimeZone(const TimeZone &) = delete;
	TimeZone &operator=(const TimeZone &) = delete;

	void set(const char *tz)
	{
		::setenv("TZ", tz, 1);
		::tzset();
	}

private:
	std::optional<std::string> saved_;
};

} // namespace

TEST_CASE("format_local_time is local, to the millisecond")
{
	TimeZone zone("UTC0");
	CHECK(format_local_time(1'700'000'000'123'456) == "2023-11-14 22:13:20.123");
	CHECK(format_local_time(0) == "1970-01-01 00:00:00.000");
	CHECK(format_local_time(-1'000) == "1969-12-31 23:59:59.999");
	zone.set("XYZ-1"); // POSIX form, one hour east of UTC: needs no tzdata
	CHECK(format_local_time(1'700'000'000'123'456) == "2023-11-14 23:13:20.123");
}

TEST_CASE("take_exec: one word, or the rest of the command line after --")
{
	using Args = std::vector<std::string>;
	struct Case {
		Args in;
		Args left;
		std::optional<Args> exec;
		bool one_word = false;
	};
	const Case cases[] = {
		{{"brokerctl", "upgrade", "web"}, {"brokerctl", "upgrade", "web"}, std::nullopt},
		{{"brokerctl", "upgrade", "web", "--version", "2", "--exec", "--", "/usr/bin/app", "--port", "80", "--exec"},
		 {"brokerctl", "upgrade", "web", "--version", "2"},
		 Args{"/usr/bin/app", "--port", "80", "--exec"}},
		// One word: what follows is brokerctl's again.
		{{"brokerctl", "upgrade", "web", "--exec", "srv", "--no-wait"},
		 {"brokerctl", "upgrade", "web", "--no-wait"},
		 Args{"srv"},
		 true},
		{{"brokerctl", "upgrade", "web", "--exec=/usr/bin/app", "-v"}, {"brokerctl", "upgrade", "web", "-v"}, Args{"/usr/bin/app"}, true},
		{{"brokerctl", "upgrade", "web", "--exec"}, {"brokerctl", "upgrade", "web"}, Args{}, true},
		{{"brokerctl", "upgrade", "web", "--exec", "--"}, {"brokerctl", "upgrade", "web"}, Args{}},
		{{"brokerctl", "upgrade", "web", "--exec="}, {"brokerctl", "upgrade", "web"}, Args{""}, true},
		// Not the flag: after "--", a longer option, a value that merely contains it.
		{{"brokerctl", "upgrade", "--", "--exec", "x"}, {"brokerctl", "upgrade", "--", "--exec", "x"}, std::nullopt},
		{{"brokerctl", "upgrade", "--executable", "x"}, {"brokerctl", "upgrade", "--executable", "x"}, std::nullopt},
		{{"--exec"}, {"--exec"}, std::nullopt}, // argv[0] is the program, never an option
	};
	for (const Case &c : cases) {
		Args args = c.in;
		CAPTURE(args.size());
		bool one_word = false;
		auto exec = take_exec(args, &one_word);
		CHECK(exec == c.exec);
		CHECK(args == c.left);
		if (exec)
			CHECK(one_word == c.one_word);
	}
}

TEST_CASE("parse_env splits NAME=VALUE at the first '='")
{
	using Pair = std::pair<std::string, std::string>;
	struct Case {
		std::string_view in;
		std::optional<Pair> out;
	};
	const Case cases[] = {
		{"MODE=prod", Pair{"MODE", "prod"}},
		{"OPTS=a=b,c=d", Pair{"OPTS", "a=b,c=d"}},
		{"EMPTY=", Pair{"EMPTY", ""}},
		{"SPACED=a b", Pair{"SPACED", "a b"}},
		{"=x", std::nullopt},
		{"NOEQUALS", std::nullopt},
		{"", std::nullopt},
		{std::string_view("A=b\0c", 5), std::nullopt},
	};
	for (const Case &c : cases) {
		CAPTURE(c.in);
		CHECK(parse_env(c.in) == c.out);
	}
}

TEST_CASE("duration_ms converts duration options for the *_ms parameters")
{
	struct Case {
		const char *in;
		std::optional<std::int64_t> out;
	};
	const Case cases[] = {
		{"30s", 30'000},
		{"1m30s", 90'000},
		{"500ms", 500},
		{"2h", 7'200'000},
		{"0s", std::nullopt},
		{"0ms", std::nullopt},
		{"30", std::nullopt},
		{"-5s", std::nullopt},
		{"", std::nullopt},
	};
	for (const Case &c : cases) {
		CAPTURE(c.in);
		CHECK(duration_ms(c.in) == c.out);
	}
}

TEST_CASE("progress_bar is full only when all is done")
{
	struct Case {
		std::int64_t done, total;
		std::size_t width;
		const char *out;
	};
	const Case cases[] = {
		{0, 8, 10, "[..........]"},
		{3, 8, 10, "[###.......]"},
		{4, 8, 10, "[#####.....]"},
		{7, 8, 10, "[########..]"},
		{8, 8, 10, "[##########]"},
		{9, 8, 10, "[##########]"}, // a broker that over-counts does not overflow the bar
		{1, 0, 10, "[..........]"}, // nothing to do: no division by zero
		{-1, 4, 10, "[..........]"},
		{1, 2, 4, "[##..]"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.done);
		CAPTURE(c.total);
		CHECK(progress_bar(c.done, c.total, c.width) == c.out);
	}
}

namespace {

json progress(const char *event, json upgrade, json extra = json::object())
{
	json p = {{"event", event}, {"service", "web"}, {"generation", 4}, {"upgrade", std::move(upgrade)}};
	p.update(extra);
	return {{"progress", p}};
}

json counts(int ready, int drained)
{
	return {{"generation", 4}, {"from", 3},          {"phase", "rolling"}, {"started", ready},
	        {"ready", ready},  {"drained", drained}, {"total_new", 4},     {"total_old", 4}};
}

} // namespace

TEST_CASE("progress lines")
{
	const json ready = progress("ready", counts(2, 1), {{"instance", "web/4/1"}, {"pid", 4242}});
	const json &p = progress_of(ready);

	CHECK(progress_line(Rollout::Upgrade, p, false) ==
	      "upgrading web to gen 4: 2/4 new ready, 1/4 old drained [###.......]");
	CHECK(progress_line(Rollout::Restart, p, false) ==
	      "restarting web as gen 4: 2/4 new ready, 1/4 old drained [###.......]");
	CHECK(progress_line(Rollout::Upgrade, p, true) == "rolling back web to gen 3 (gen 4 failed)");

	CHECK(event_line(p) == "web/4/1 ready (pid 4242)");
	json failed = progress("failed", counts(0, 0), {{"instance", "web/4/0"}, {"message", "exit 1\x1b[2J"}});
	CHECK(event_line(progress_of(failed)) == "web/4/0 failed: exit 1?[2J");
	CHECK(event_line(progress_of(progress("rollback", counts(0, 0), {{"message", "web/4/0 failed"}}))) ==
	      "rolling back web to gen 3: web/4/0 failed");
	CHECK(event_line(progress_of(progress("draining", counts(0, 0)))) == "web draining"); // no instance

	CHECK(is_notable("started"));
	CHECK(is_notable("rollback"));
	CHECK(is_notable("something-newer"));
	CHECK_FALSE(is_notable("accepted"));
	CHECK_FALSE(is_notable("done"));

	CHECK(accepted_line(Rollout::Upgrade, p) == "upgrading web to gen 4 (from gen 3)");
	CHECK(submitted_line(Rollout::Upgrade, p) == "web: upgrade to gen 4 accepted");
	CHECK(submitted_line(Rollout::Rollback, p) == "web: rollback as gen 4 accepted");
	CHECK(done_line(Rollout::Upgrade, p, 3200ms) == "web: upgraded to gen 4 in 3.2s");
	CHECK(done_line(Rollout::Restart, p, 1s) == "web: restarted as gen 4 in 1.0s");
	// brokerd's own measure, when it sends one, over the time the caller waited.
	json timed = p;
	timed["duration_usec"] = 2'450'000;
	CHECK(done_line(Rollout::Upgrade, timed, 3200ms) == "web: upgraded to gen 4 in 2.5s");

	// Connection handoff joins the counts once anything is expected to move.
	json moving = counts(2, 1);
	moving["handoff"] = {{"handed", 8000}, {"received", 6120}, {"returned", 0}, {"expected", 8000}};
	const json handoff = progress("handoff", moving);
	const json &m = progress_of(handoff);
	CHECK(progress_line(Rollout::Upgrade, m, false) ==
	      "upgrading web to gen 4: 2/4 new ready, 1/4 old drained, migrating connections 6120/8000 [###.......]");
	CHECK_FALSE(is_notable("handoff"));
	moving["handoff"]["returned"] = 12;
	moving["handoff"]["received"] = 7988;
	const json done = progress("done", moving);
	CHECK(done_line(Rollout::Upgrade, progress_of(done), 3200ms) ==
	      "web: upgraded to gen 4 in 3.2s, 7988/8000 connections migrated (12 returned to their sender)");
	json idle = counts(2, 1);
	idle["handoff"] = {{"handed", 0}, {"received", 0}, {"returned", 0}, {"expected", 0}};
	const json quiet = progress("ready", idle);
	CHECK(progress_line(Rollout::Upgrade, progress_of(quiet), false) ==
	      "upgrading web to gen 4: 2/4 new ready, 1/4 old drained [###.......]");

	// A reply without the wrapper, or with members missing, still reads.
	CHECK(progress_line(Rollout::Upgrade, json::object(), false) ==
	      "upgrading - to gen -: -/- new ready, -/- old drained [..........]");
}

TEST_CASE("ProgressDisplay")
{
	const json replies[] = {
		progress("accepted", counts(0, 0)),
		progress("started", counts(0, 0), {{"instance", "web/4/0"}, {"pid", 40}}),
		progress("ready", counts(1, 0), {{"instance", "web/4/0"}, {"pid", 40}}),
		progress("done", counts(4, 4)),
	};
	std::ostringstream out;

	SUBCASE("live: notable events stay, the progress line is redrawn")
	{
		ProgressDisplay d(out, ProgressDisplay::Mode::Live, Rollout::Upgrade, 80);
		CHECK_FALSE(d.update(replies[0], 0s));
		CHECK_FALSE(d.update(replies[1], 0s));
		CHECK_FALSE(d.update(replies[2], 0s));
		CHECK(d.update(replies[3], 3200ms));
		CHECK(out.str() == "\rupgrading web to gen 4: 0/4 new ready, 0/4 old drained [..........]\x1b[K"
		                   "\r\x1b[Kweb/4/0 started (pid 40)\n"
		                   "\rupgrading web to gen 4: 0/4 new ready, 0/4 old drained [..........]\x1b[K"
		                   "\r\x1b[Kweb/4/0 ready (pid 40)\n"
		                   "\rupgrading web to gen 4: 1/4 new ready, 0/4 old drained [#.........]\x1b[K"
		                   "\r\x1b[Kweb: upgraded to gen 4 in 3.2s\n");
	}

	SUBCASE("live: the line fits the terminal, and clear() leaves a clean line for an error")
	{
		ProgressDisplay d(out, ProgressDisplay::Mode::Live, Rollout::Upgrade, 21);
		d.update(replies[0], 0s);
		d.clear();
		d.clear(); // nothing left to erase
		CHECK(out.str() == "\rupgrading web to gen\x1b[K\r\x1b[K"); // 20 columns: one short of the width
	}

	SUBCASE("live: after a rollback the line tells so")
	{
		ProgressDisplay d(out, ProgressDisplay::Mode::Live, Rollout::Upgrade, 80);
		d.update(progress("rollback", counts(0, 0), {{"message", "web/4/0 failed"}}), 0s);
		CHECK(out.str() == "\r\x1b[Krolling back web to gen 3: web/4/0 failed\n"
		                   "\rrolling back web to gen 3 (gen 4 failed)\x1b[K");
	}

	SUBCASE("lines: one plain line per event, no control sequences")
	{
		ProgressDisplay d(out, ProgressDisplay::Mode::Lines, Rollout::Upgrade, 80);
		for (const json &r : replies)
			d.update(r, 3200ms);
		d.clear(); // no live line: nothing to erase
		CHECK(out.str() == "upgrading web to gen 4 (from gen 3)\n"
		                   "web/4/0 started (pid 40); 0/4 new ready, 0/4 old drained\n"
		                   "web/4/0 ready (pid 40); 1/4 new ready, 0/4 old drained\n"
		                   "web: upgraded to gen 4 in 3.2s\n");
	}

	SUBCASE("lines: migration progress as its own line")
	{
		ProgressDisplay d(out, ProgressDisplay::Mode::Lines, Rollout::Upgrade, 80);
		json up = counts(1, 0);
		up["handoff"] = {{"handed", 253}, {"received", 253}, {"returned", 0}, {"expected", 8000}};
		d.update(progress("handoff", up), 0s);
		CHECK(out.str() == "web: migrating connections 253/8000\n");
	}

	SUBCASE("json: each reply's parameters as one line")
	{
		ProgressDisplay d(out, ProgressDisplay::Mode::Json, Rollout::Upgrade, 80);
		for (const json &r : replies)
			d.update(r, 0s);
		std::istringstream in(out.str());
		std::string line;
		int n = 0;
		while (std::getline(in, line)) {
			CAPTURE(line);
			CHECK(json::parse(line) == replies[n++]);
		}
		CHECK(n == 4);
	}
}

TEST_CASE("watch_line")
{
	TimeZone zone("UTC0");
	const std::int64_t t = 1'700'000'000'123'456;
	struct Case {
		json event;
		const char *out;
	};
	const Case cases[] = {
		{{{"event", "instance"}, {"time", t}, {"service", "web"}, {"generation", 4}, {"instance", "web/4/0"},
		  {"pid", 1234}, {"state", "ready"}},
		 "2023-11-14 22:13:20.123 [instance] web gen 4 web/4/0 (pid 1234) ready"},
		{{{"event", "upgrade"}, {"time", t}, {"service", "web"}, {"generation", 4}, {"message", "done"}},
		 "2023-11-14 22:13:20.123 [upgrade] web gen 4: done"},
		{{{"event", "reload"}, {"time", t}, {"message", "added service api"}},
		 "2023-11-14 22:13:20.123 [reload] added service api"},
		{{{"event", "reload"},
		  {"time", t},
		  {"message", "1 setting(s) changed"},
		  {"changed", {{{"service", "web"}, {"key", "instances"}, {"from", "2"}, {"to", "3"}, {"when", "next-upgrade"}}}}},
		 "2023-11-14 22:13:20.123 [reload] 1 setting(s) changed\n  web: instances 2\u21923, at the next upgrade"},
		// No time: the caller's clock. Mistyped members are left out, text is defused.
		{{{"event", "odd\x1b"}, {"pid", "x"}, {"service", 7}}, "1970-01-01 00:00:01.000 [odd?]"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.event.dump());
		CHECK(watch_line(c.event, 1'000'000) == c.out);
	}
}

TEST_CASE("reconnected_event: what a watch says when brokerd answers again")
{
	TimeZone zone("UTC0");
	const std::int64_t t = 1'700'000'000'123'456;
	json afresh = reconnected_event(json{{"pid", 200}}, t);
	CHECK(afresh == json{{"event", "reconnected"},
	                     {"time", t},
	                     {"pid", 200},
	                     {"message", "brokerd started afresh: what ran before it is not its"}});

	json recovered = {{"crashed_pid", 100},
	                  {"at", t},
	                  {"kept", 3},
	                  {"lost", {"web/1/1"}},
	                  {"interrupted", {"web: an upgrade the crash interrupted: rolled back to gen 1"}}};
	json after = reconnected_event(json{{"pid", 200}, {"recovered", recovered}}, t);
	CHECK(after["recovered"] == recovered);
	CHECK(watch_line(after, 0) ==
	      "2023-11-14 22:13:20.123 [reconnected] (pid 200): brokerd carries on after a crash of pid 100: 3 process(es) "
	      "found again; gone meanwhile, restarted under their policy: web/1/1; web: an upgrade the crash "
	      "interrupted: rolled back to gen 1");
}

TEST_CASE("closest: the known word within two edits, the first of the closest, none for a short or far word")
{
	const std::string_view commands[] = {"status", "sockets", "upgrade", "rollback", "restart", "start", "stop"};
	CHECK(proto::closest("upgrdae", commands) == "upgrade");
	CHECK(proto::closest("stauts", commands) == "status");
	CHECK(proto::closest("stat", commands) == "start"); // one edit from start, two from status and stop
	CHECK(proto::closest("sotp", commands) == "stop");
	CHECK(proto::closest("frobnicate", commands) == std::nullopt);
	CHECK(proto::closest("xy", commands) == std::nullopt); // two edits rewrite a two-letter word
	CHECK(proto::closest("", commands) == std::nullopt);
}

TEST_CASE("remote_failure: a refused parameter is a usage error naming the option that sent it")
{
	using brokerctl::kExitFailure;
	using brokerctl::kExitUsage;
	const std::string invalid = "org.varlink.service.InvalidParameter";
	const json call = {{"service", "web"}};
	struct Row {
		const char *method;
		json error;
		brokerctl::ExitCode code;
		const char *message;
	};
	const Row rows[] = {
		{"io.brokerd.Control.Upgrade",
		 {{"parameter", "batch"}, {"message", "expected a number of instances from 1 to 1024"}}, kExitUsage,
		 "brokerd refused --batch of upgrade: expected a number of instances from 1 to 1024"},
		{"io.brokerd.Control.Upgrade", {{"parameter", "drain_timeout_ms"}, {"message", "at most 24d"}}, kExitUsage,
		 "brokerd refused --drain-timeout of upgrade: at most 24d"},
		{"io.brokerd.Control.Upgrade", {{"parameter", "env"}, {"message", "BROKER_X: set by brokerd"}}, kExitUsage,
		 "brokerd refused --env of upgrade: BROKER_X: set by brokerd"},
		// A parameter the method's own row names differently.
		{"io.brokerd.Control.Rollback", {{"parameter", "generation"}}, kExitUsage,
		 "brokerd refused --to of rollback: this brokerd does not take it (is it older than brokerctl?)"},
		{"io.brokerd.Control.Signal", {{"parameter", "signal"}, {"message", "expected HUP, INT or a number"}}, kExitUsage,
		 "brokerd refused SIG of signal: expected HUP, INT or a number"},
		// Rollback's own row is Rollback's alone.
		{"io.brokerd.Control.Signal", {{"parameter", "generation"}}, kExitFailure,
		 "brokerd rejected parameter \"generation\" of io.brokerd.Control.Signal"},
		{"io.brokerd.Control.Scale", {{"parameter", "instances"}, {"message", "from 1 to 1024"}}, kExitUsage,
		 "brokerd refused N of scale: from 1 to 1024"},
		// No option sends it: brokerctl and brokerd disagree, which the operator cannot fix.
		{"io.brokerd.Control.Upgrade", {{"parameter", "fd"}}, kExitFailure,
		 "brokerd rejected parameter \"fd\" of io.brokerd.Control.Upgrade"},
		{"io.brokerd.Control.Status", json::object(), kExitFailure,
		 "brokerd rejected parameter \"\" of io.brokerd.Control.Status"},
	};
	for (const Row &row : rows) {
		CAPTURE(row.method);
		CAPTURE(row.error.dump());
		brokerctl::Failure f = brokerctl::remote_failure(invalid, row.error, row.method, call);
		CHECK(f.code() == row.code);
		CHECK(std::string(f.what()) == row.message);
		CHECK(std::string(f.what()).find("brokerctl status") == std::string::npos);
	}
}

TEST_CASE("parse_target: [USER@]HOST[:PORT], an IPv6 address with a port in brackets, nothing ssh reads as an option")
{
	struct Row {
		const char *text;
		const char *destination; // nullptr: refused
		const char *port;        // nullptr: none
	};
	const Row rows[] = {
		{"web1", "web1", nullptr},
		{"root@web1", "root@web1", nullptr},
		{"web1:2222", "web1", "2222"},
		{"deploy@web1.example.com:22", "deploy@web1.example.com", "22"},
		{"[2001:db8::1]:2222", "2001:db8::1", "2222"},
		{"admin@[::1]", "admin@::1", nullptr},
		{"::1", "::1", nullptr}, // colons without brackets: an address, no port
		{"web1:65535", "web1", "65535"},
		{"", nullptr, nullptr},
		{"web1:", nullptr, nullptr},
		{"web1:0", nullptr, nullptr},
		{"web1:65536", nullptr, nullptr},
		{"web1:22x", nullptr, nullptr},
		{"@web1", nullptr, nullptr},
		{"root@", nullptr, nullptr},
		{"-oProxyCommand=x", nullptr, nullptr},
		{"-lroot@web1", nullptr, nullptr},
		{"root@-web1", nullptr, nullptr},
		{"web 1", nullptr, nullptr},
		{"web1;reboot", nullptr, nullptr}, // a ProxyCommand's %h would give it to a shell
		{"$(reboot)", nullptr, nullptr},
		{"fe80::1%eth0", "fe80::1%eth0", nullptr},
		{"ops_1@web-1.example", "ops_1@web-1.example", nullptr},
		{"[::1", nullptr, nullptr},
		{"[::1]x", nullptr, nullptr},
		{"a@b@c", nullptr, nullptr},
	};
	for (const Row &row : rows) {
		CAPTURE(row.text);
		auto t = brokerctl::parse_target(row.text);
		REQUIRE(t.has_value() == (row.destination != nullptr));
		if (!t)
			continue;
		CHECK(t->given == row.text);
		CHECK(t->destination == row.destination);
		CHECK(t->port == (row.port ? std::optional<std::string>(row.port) : std::nullopt));
	}
}

TEST_CASE("bridge_command: BROKERCTL_SSH's words, no forwarding, the port, then -- and the remote command quoted")
{
	using V = std::vector<std::string>;
	auto t = *brokerctl::parse_target("root@web1:2222");
	CHECK(brokerctl::bridge_command(t, "") == V{"ssh", "-x", "-T", "-p", "2222", "--", "root@web1", "brokerctl bridge"});
	t.socket = "/run/my brokerd/control.sock";
	CHECK(brokerctl::bridge_command(t, "  ssh -F /etc/fleet/ssh_config\t-o BatchMode=yes ") ==
	      V{"ssh", "-F", "/etc/fleet/ssh_config", "-o", "BatchMode=yes", "-x", "-T", "-p", "2222", "--", "root@web1",
	        "brokerctl bridge --socket '/run/my brokerd/control.sock'"});
	auto plain = *brokerctl::parse_target("web1");
	CHECK(brokerctl::bridge_command(plain, "/usr/local/bin/fleet-ssh") ==
	      V{"/usr/local/bin/fleet-ssh", "-x", "-T", "--", "web1", "brokerctl bridge"});
}

TEST_CASE("bridge_exit: what ssh's exit status says after the bridge closed early")
{
	auto t = *brokerctl::parse_target("root@web1");
	auto exited = [](int code) { return code << 8; }; // as waitpid reports an exit
	CHECK(!brokerctl::bridge_exit(exited(0), t)); // brokerd's own close, passed on
	for (int code : {3, 4, 5}) {
		auto e = brokerctl::bridge_exit(exited(code), t);
		REQUIRE(e);
		CHECK(e->code == code);
		CHECK(e->message.empty()); // the remote brokerctl said it, on stderr
	}
	auto ssh = brokerctl::bridge_exit(exited(255), t);
	REQUIRE(ssh);
	CHECK(ssh->code == 1);
	CHECK(ssh->message == "ssh to root@web1 failed (exit status 255)");
	auto missing = brokerctl::bridge_exit(exited(127), t);
	REQUIRE(missing);
	CHECK(missing->message == "brokerctl was not found on root@web1 (exit status 127)");
	auto other = brokerctl::bridge_exit(exited(1), t);
	REQUIRE(other);
	CHECK((other->code == 1 && other->message == "brokerctl bridge on root@web1 ended with exit status 1"));
	auto killed = brokerctl::bridge_exit(SIGKILL, t); // as waitpid reports a death by signal
	REQUIRE(killed);
	CHECK((killed->code == 1 && killed->message == "ssh to root@web1 was killed by signal 9"));
	CHECK(WIFSIGNALED(SIGKILL));
}

TEST_CASE("render_history: one row per generation, oldest first, durations until the end or now")
{
	TimeZone zone("UTC0");
	const std::int64_t t0 = 1'700'000'000'000'000;
	const json entries = {
		{{"generation", 1}, {"version", "1.0"}, {"exec", {"/usr/bin/app"}}, {"started", t0},
		 {"ended", t0 + 90'000'000}, {"how", "start"}, {"result", "replaced"}},
		{{"generation", 2}, {"version", "1.1"}, {"exec", {"/usr/bin/app", "--fast mode"}}, {"started", t0 + 60'000'000},
		 {"ended", t0 + 62'000'000}, {"how", "upgrade"}, {"result", "rolled-back"}, {"uid", 1000}},
		{{"generation", 3}, {"version", ""}, {"exec", {"/usr/bin/app"}}, {"started", 0}, {"how", "rollback"},
		 {"result", "serving"}, {"uid", 0}},
	};
	auto name = [](std::int64_t uid) { return uid == 0 ? std::string("root") : std::to_string(uid); };
	CHECK(render_history(entries, t0 + 120'000'000, name) ==
	      "GEN  VERSION  STARTED                  DURATION  HOW       RESULT       BY    EXEC\n"
	      "1    1.0      2023-11-14 22:13:20.000  1m30s     start     replaced     -     /usr/bin/app\n"
	      "2    1.1      2023-11-14 22:14:20.000  2s        upgrade   rolled-back  1000  /usr/bin/app '--fast mode'\n"
	      "3             -                        -         rollback  serving      root  /usr/bin/app\n");
	CHECK(render_history(json::object(), 0, name) == "GEN  VERSION  STARTED  DURATION  HOW  RESULT  BY  EXEC\n");
}

TEST_CASE("remote_failure: NoSuchGeneration is a usage error listing the generations still known")
{
	brokerctl::Failure f = brokerctl::remote_failure(
		"io.brokerd.Control.NoSuchGeneration", {{"service", "web"}, {"generation", 7}, {"known", {3, 4, 5}}},
		"io.brokerd.Control.Rollback", {{"service", "web"}, {"generation", 7}});
	CHECK(f.code() == brokerctl::kExitUsage);
	CHECK(std::string(f.what()) == "web has no generation 7 still known; known: 3, 4, 5 (see `brokerctl history web`)");
	f = brokerctl::remote_failure("io.brokerd.Control.NoSuchGeneration", {{"generation", 1}, {"known", json::array()}},
	                              "io.brokerd.Control.Rollback", {{"service", "web"}});
	CHECK(std::string(f.what()) == "web has no generation 1 still known; known: none (see `brokerctl history web`)");
}
