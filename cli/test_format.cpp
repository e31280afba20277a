// Unit tests of brokerctl's pure output helpers: durations, relative times, tables, status views.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "format.hpp"
#include "render.hpp"

#include <nlohmann/json.hpp>

using namespace brokerctl;
using namespace std::chrono_literals;
using json = nlohmann::json;

TEST_CASE("format_duration shows the two largest units")
{
	struct Case {
		std::chrono::microseconds in;
		const char *out;
	};
	const Case cases[] = {
		{0us, "0s"},
		{-5s, "0s"},
		{999us, "0s"},
		{250ms, "250ms"},
		{1s, "1s"},
		{1500ms, "1s"},
		{59s, "59s"},
		{60s, "1m"},
		{3min + 12s, "3m12s"},
		{1h, "1h"},
		{1h + 59s, "1h"},
		{2h + 5min + 3s, "2h5m"},
		{24h * 3 + 4h + 5min, "3d4h"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.in.count());
		CHECK(format_duration(c.in) == c.out);
	}
}

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

TEST_CASE("parse_duration reads the config's grammar")
{
	struct Case {
		const char *in;
		std::optional<std::chrono::milliseconds> out;
	};
	const Case cases[] = {
		{"250ms", 250ms},
		{"30s", 30s},
		{"5m", 5min},
		{"1h", 1h},
		{"2d", 48h},
		{"1m30s", 90s},
		{"5m12ms", 5min + 12ms},
		{"", std::nullopt},
		{"30", std::nullopt},
		{"s", std::nullopt},
		{"-1s", std::nullopt},
		{"1.5s", std::nullopt},
		{"10us", std::nullopt},
		{"1s ", std::nullopt},
		{"99999999999999999999s", std::nullopt},
		{"400d", std::nullopt},
	};
	for (const Case &c : cases) {
		CAPTURE(c.in);
		CHECK(parse_duration(c.in) == c.out);
	}
	// What format_duration prints, parse_duration reads back.
	CHECK(parse_duration(format_duration(3min + 12s)) == 3min + 12s);
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
		 {{{"name", "http"}, {"address", "tcp://0.0.0.0:8080"}, {"kind", "tcp"}, {"origin", "bound"}},
		  {{"name", "dns"}, {"address", "udp://[::]:5353"}, {"kind", "udp"}, {"origin", "systemd"}}}},
		{"services",
		 {{{"name", "web"},
		   {"sockets", {"http"}},
		   {"ready", "broker"},
		   {"generations",
		    {{{"number", 2},
		      {"version", "1.0"},
		      {"exec", {"/usr/bin/web"}},
		      {"instances",
		       {{{"id", "web/2/0"}, {"index", 0}, {"pid", 40}, {"state", "draining"},
		         {"since", now - 2'000'000}, {"status", nullptr}}}}},
		     {{"number", 3},
		      {"version", "1.1"},
		      {"exec", {"/usr/bin/web", "--mode", "fast lane"}},
		      {"instances",
		       {{{"id", "web/3/0"}, {"index", 0}, {"pid", 4242}, {"state", "ready"},
		         {"since", now - 12'000'000}, {"status", "serving 12 req/s"}}}}}}}},
		  {{"name", "idle"}, {"sockets", json::array()}, {"ready", "exec"}, {"generations", json::array()}}}},
	};

	SUBCASE("everything")
	{
		CHECK(render_status(status, now) ==
		      "brokerd 0.1.0, pid 1234, up 3m12s\n"
		      "\n"
		      "SOCKETS\n"
		      "NAME  ADDRESS             KIND  ORIGIN\n"
		      "http  tcp://0.0.0.0:8080  tcp   bound\n"
		      "dns   udp://[::]:5353     udp   systemd\n"
		      "\n"
		      "SERVICE web\n"
		      "  sockets:      http\n"
		      "  ready:        broker\n"
		      "  generations:  3 (version 1.1), 2 (version 1.0)\n"
		      "  exec:         /usr/bin/web --mode 'fast lane'\n"
		      "  INSTANCES\n"
		      "  ID       GEN  PID   STATE     SINCE    STATUS\n"
		      "  web/3/0  3    4242  ready     12s ago  serving 12 req/s\n"
		      "  web/2/0  2    40    draining  2s ago\n"
		      "\n"
		      "SERVICE idle\n"
		      "  sockets:      -\n"
		      "  ready:        exec\n"
		      "  generations:  none\n"
		      "  INSTANCES\n"
		      "  ID  GEN  PID  STATE  SINCE  STATUS\n");
	}

	SUBCASE("one service, with only its sockets")
	{
		std::string out = render_status(status, now, "web");
		CHECK(out.find("SERVICE web\n") != std::string::npos);
		CHECK(out.find("SERVICE idle") == std::string::npos);
		CHECK(out.find("http  tcp://") != std::string::npos);
		CHECK(out.find("dns") == std::string::npos);
	}

	SUBCASE("a reply with missing and mistyped members still renders")
	{
		json odd = {{"services", {{{"name", 7}, {"generations", {{{"number", 4}, {"instances", {json::object()}}}}}}}}};
		std::string out = render_status(odd, now);
		CHECK(out.starts_with("brokerd -, pid -\n"));
		CHECK(out.find("SERVICE -\n") != std::string::npos);
		CHECK(out.find("  generations:  4\n") != std::string::npos); // no version: no "(version )"
		CHECK(out.find(" \n") == std::string::npos); // no trailing blanks, even for empty cells
	}
}
