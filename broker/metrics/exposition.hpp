// The Prometheus text exposition format (0.0.4): metric families as values, and their text.
#pragma once

#include "os/time.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace brokerd::metrics {

using Labels = std::vector<std::pair<std::string, std::string>>;

// One line of a family: the family's name plus `suffix` ("_bucket", "_sum", "_count" or none).
struct Sample {
	std::string suffix;
	Labels labels;
	double value = 0;
};

enum class Type { Counter, Gauge, Histogram };

struct Family {
	std::string name; // a counter's ends in "_total"
	std::string help;
	Type type = Type::Gauge;
	std::vector<Sample> samples;
};

// An upgrade's duration, in the buckets every brokerd_upgrade_duration_seconds series has.
struct Histogram {
	static constexpr std::array<double, 10> kBounds{0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}; // seconds
	std::array<std::uint64_t, kBounds.size()> counts{}; // per bucket, not cumulative; above the last: count only
	usec_t sum = 0;
	std::uint64_t count = 0;

	void observe(usec_t duration);
	// Its samples with `labels` (plus "le" on the buckets: cumulative, then "+Inf"), "_sum" in
	// seconds and "_count", appended to `family`.
	void append_to(Family &family, const Labels &labels) const;
};

// Whether `name` is a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*), or, with `label`, a valid
// label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with "__").
bool valid_name(std::string_view name, bool label = false);

struct Rendered {
	std::string text;
	bool truncated = false; // whole families were left out to stay within the budget
};

// The text of `families`, in order: "# HELP" and "# TYPE" lines, then the samples, label values
// and help text escaped. Whole families only, as many as fit when the text is written as a JSON
// string (what a Varlink reply carries: quotes, backslashes and newlines count twice) within
// `json_budget` bytes. Throws std::logic_error on a metric or label name that is not valid: the
// names are brokerd's own.
Rendered render(std::span<const Family> families,
                std::size_t json_budget = std::numeric_limits<std::size_t>::max());

} // namespace brokerd::metrics
