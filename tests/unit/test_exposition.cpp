// Unit tests of broker/metrics/exposition: the Prometheus text format, as tables.
#include "metrics/exposition.hpp"

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>
#include <vector>

using namespace brokerd::metrics;

TEST_CASE("render: HELP and TYPE, then the samples, labels escaped")
{
	std::vector<Family> families{
		{"brokerd_up", "Whether it is up.", Type::Gauge, {{"", {}, 1}}},
		{"brokerd_things_total",
		 "Things, with \\ and\na newline.",
		 Type::Counter,
		 {{"", {{"service", "web"}}, 3}, {"", {{"service", "a\"b\\c\nd"}, {"kind", "x"}}, 0.25}}},
		{"brokerd_empty", "No samples.", Type::Gauge, {}},
	};
	Rendered r = render(families);
	CHECK_FALSE(r.truncated);
	CHECK(r.text == "# HELP brokerd_up Whether it is up.\n"
	                "# TYPE brokerd_up gauge\n"
	                "brokerd_up 1\n"
	                "# HELP brokerd_things_total Things, with \\\\ and\\na newline.\n"
	                "# TYPE brokerd_things_total counter\n"
	                "brokerd_things_total{service=\"web\"} 3\n"
	                "brokerd_things_total{service=\"a\\\"b\\\\c\\nd\",kind=\"x\"} 0.25\n"
	                "# HELP brokerd_empty No samples.\n"
	                "# TYPE brokerd_empty gauge\n");
}

TEST_CASE("numbers: integers whole, fractions with every digit, infinities by name")
{
	struct Row {
		double value;
		const char *text;
	};
	const Row rows[] = {
		{0, "0"}, {42, "42"}, {1e12, "1000000000000"}, {0.5, "0.5"}, {1.0 / 3, "0.33333333333333331"},
		{-2, "-2"}, {1e300, "1.0000000000000001e+300"}, {1.0 / 0.0, "+Inf"}, {-1.0 / 0.0, "-Inf"},
	};
	for (const Row &row : rows) {
		INFO(row.text);
		Family f{"x", "h", Type::Gauge, {{"", {}, row.value}}};
		CHECK(render(std::vector{f}).text == std::string("# HELP x h\n# TYPE x gauge\nx ") + row.text + "\n");
	}
}

TEST_CASE("names: metric and label names are checked; a bad one is brokerd's bug and throws")
{
	struct Row {
		const char *name;
		bool metric, label;
	};
	const Row rows[] = {
		{"brokerd_up", true, true}, {"a:b", true, false}, {"_x9", true, true}, {"9x", false, false},
		{"", false, false},         {"a-b", false, false}, {"__reserved", true, false}, {"é", false, false},
	};
	for (const Row &row : rows) {
		INFO(row.name);
		CHECK(valid_name(row.name) == row.metric);
		CHECK(valid_name(row.name, true) == row.label);
	}
	CHECK_THROWS_AS(render(std::vector<Family>{{"bad-name", "h", Type::Gauge, {}}}), std::logic_error);
	CHECK_THROWS_AS(render(std::vector<Family>{{"ok", "h", Type::Gauge, {{"", {{"le-x", "1"}}, 1}}}}), std::logic_error);
}

TEST_CASE("histogram: cumulative buckets, +Inf equal to the count, the sum in seconds")
{
	Histogram h;
	h.observe(400'000);       // 0.4 s: le 0.5
	h.observe(1'000'000);     // 1 s exactly: le 1
	h.observe(7'000'000);     // le 10
	h.observe(3'600'000'000); // an hour: past the last bound
	Family f{"d_seconds", "h", Type::Histogram, {}};
	h.append_to(f, {{"service", "web"}});
	CHECK(render(std::vector{f}).text == "# HELP d_seconds h\n"
	                                     "# TYPE d_seconds histogram\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"0.5\"} 1\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"1\"} 2\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"2.5\"} 2\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"5\"} 2\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"10\"} 3\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"30\"} 3\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"60\"} 3\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"120\"} 3\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"300\"} 3\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"600\"} 3\n"
	                                     "d_seconds_bucket{service=\"web\",le=\"+Inf\"} 4\n"
	                                     "d_seconds_sum{service=\"web\"} 3608.4000000000001\n"
	                                     "d_seconds_count{service=\"web\"} 4\n");
}

TEST_CASE("a budget cuts at a family boundary, counting what JSON escapes twice")
{
	Family a{"a", "h", Type::Gauge, {{"", {{"l", "\"\"\"\""}}, 1}}}; // 4 quotes, escaped in the label and again in JSON
	Family b{"b", "h", Type::Gauge, {{"", {}, 2}}};
	std::string a_text = render(std::vector{a}).text;
	std::string b_text = render(std::vector{b}).text;
	// a's JSON size: its bytes, plus one per quote, backslash and newline in them.
	std::size_t a_json = a_text.size();
	for (char c : a_text)
		a_json += c == '"' || c == '\\' || c == '\n';
	std::vector families{a, b};
	Rendered whole = render(families, a_json + b_text.size() + 3);
	CHECK_FALSE(whole.truncated);
	CHECK(whole.text == a_text + b_text);
	Rendered cut = render(families, a_json);
	CHECK(cut.truncated);
	CHECK(cut.text == a_text);
	Rendered one_short = render(families, a_json - 1);
	CHECK(one_short.truncated);
	CHECK(one_short.text.empty());
}
