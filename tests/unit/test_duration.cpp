// Unit tests of the one duration grammar (proto/duration.hpp), which brokerd's config and brokerctl's
// options both read: every unit, the cap, and what format_duration prints.
#include "proto/duration.hpp"

#include <doctest/doctest.h>

#include <optional>
#include <string>

using namespace proto;
using namespace std::chrono_literals;

TEST_CASE("parse_duration: ms, s, m, h and d pairs, up to 366 days")
{
	const struct {
		std::string text;
		std::optional<std::chrono::milliseconds> value;
	} cases[] = {
		{"250ms", 250ms},
		{"30s", 30s},
		{"5m", 5min},
		{"1h", 1h},
		{"1d", 24h},
		{"2d", 48h},
		{"1m30s", 90s},
		{"5m12ms", 5min + 12ms},
		{"1d2h3m4s5ms", 26h + 3min + 4s + 5ms},
		{"30s1m", 90s},
		{"0s", 0s},
		{"0ms", 0ms},
		{"007s", 7s},
		{"1000ms", 1s},
		// The cap: 366 days, however it is spelled, and not a millisecond more.
		{"8760h", 8760h},
		{"366d", 366 * 24h},
		{"8784h", 366 * 24h},
		{"31622400000ms", 366 * 24h},
		{"365d23h59m59s1000ms", 366 * 24h},
		{"367d", std::nullopt},
		{"366d1ms", std::nullopt},
		{"31622400001ms", std::nullopt},
		{"400d", std::nullopt},
		{"9223372036854775ms", std::nullopt},
		{"2562047788h", std::nullopt},
		{"99999999999999999999s", std::nullopt},
		{"200d200d", std::nullopt},
		{"", std::nullopt},
		{"30", std::nullopt},
		{"1m30", std::nullopt},
		{"-1s", std::nullopt},
		{"+1s", std::nullopt},
		{"1.5s", std::nullopt},
		{"1us", std::nullopt},
		{"10us", std::nullopt},
		{"1w", std::nullopt},
		{"1sm", std::nullopt},
		{"1S", std::nullopt},
		{"1 s", std::nullopt},
		{" 1s", std::nullopt},
		{"1s ", std::nullopt},
		{"s", std::nullopt},
		{"ms", std::nullopt},
		{"soon", std::nullopt},
	};
	for (const auto &c : cases) {
		CAPTURE(c.text);
		CHECK(parse_duration(c.text) == c.value);
	}
}

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
	// What format_duration prints, parse_duration reads back.
	CHECK(parse_duration(format_duration(3min + 12s)) == 3min + 12s);
	CHECK(parse_duration(format_duration(366 * 24h)) == 366 * 24h);
}
