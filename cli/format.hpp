// Text building blocks for brokerctl's human output: durations, relative times, aligned tables.
#pragma once

#include "proto/duration.hpp"

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerctl {

// The duration grammar, both ways, is the protocol's: "250ms", "30s", "1m30s", "2d".
using proto::format_duration;
using proto::parse_duration;

// Time an operation took, as the final line of an upgrade shows it: tenths of a second under a
// minute ("0.4s", "3.2s", "59.9s"), format_duration above ("3m12s").
std::string format_elapsed(std::chrono::microseconds d);

// A CLOCK_REALTIME instant (microseconds) in the local time zone, to the millisecond:
// "2024-11-25 16:40:01.123". Sortable, and unambiguous in logs that span days.
std::string format_local_time(std::int64_t usec);

// A CLOCK_REALTIME instant (microseconds) relative to now, to the second: "12s ago", "3m12s ago".
// Under a second, or in the future because clocks disagree, it is "just now"; 0 means unknown: "-".
std::string format_ago(std::int64_t since_usec, std::int64_t now_usec);

// Text from the broker (names, worker status lines) may hold anything a worker sent. Control
// characters become '?', so printing it cannot move the cursor or retitle the terminal.
std::string printable(std::string_view text);

// Columns a UTF-8 string takes: one per code point (good enough for names, paths and statuses).
std::size_t display_width(std::string_view text);

// An argv as a shell would need it typed: words with special characters in single quotes.
std::string shell_join(const std::vector<std::string> &argv);

// Columns aligned like `docker ps`: a header row, cells separated by two spaces, no trailing
// blanks. Cells go through printable().
class Table {
public:
	explicit Table(std::vector<std::string> headers);

	// A row shorter than the header is padded with empty cells; extra cells are dropped.
	void add(std::vector<std::string> row);
	std::size_t rows() const { return rows_.size() - 1; }

	// Every line starts with `indent` and ends with '\n'.
	std::string render(std::string_view indent = {}) const;

private:
	std::vector<std::vector<std::string>> rows_; // rows_[0] is the header
};

} // namespace brokerctl
