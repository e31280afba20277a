// Text building blocks for brokerctl's human output (see format.hpp).
#include "format.hpp"

#include <algorithm>
#include <cstdio>
#include <ctime>

namespace brokerctl {

namespace {

bool is_shell_safe(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       std::string_view("_@%+=:,./-").find(c) != std::string_view::npos;
}

} // namespace

std::string format_elapsed(std::chrono::microseconds d)
{
	std::int64_t us = d.count() > 0 ? d.count() : 0;
	// Rounded to the tenth, and 59.96s already reads as a minute rather than "60.0s".
	std::int64_t tenths = (us + 50'000) / 100'000;
	if (tenths >= 600)
		return format_duration(std::chrono::seconds((us + 500'000) / 1'000'000));
	return std::to_string(tenths / 10) + "." + std::to_string(tenths % 10) + "s";
}

std::string format_local_time(std::int64_t usec)
{
	// Floor division, so an instant before 1970 still gets milliseconds in 0..999.
	std::int64_t secs = usec / 1'000'000;
	std::int64_t rest = usec % 1'000'000;
	if (rest < 0) {
		--secs;
		rest += 1'000'000;
	}
	std::time_t t = static_cast<std::time_t>(secs);
	std::tm tm{};
	if (!::localtime_r(&t, &tm))
		return "-";
	char buf[64];
	std::size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
	if (n == 0)
		return "-";
	std::snprintf(buf + n, sizeof buf - n, ".%03d", static_cast<int>(rest / 1000));
	return buf;
}

std::string format_ago(std::int64_t since_usec, std::int64_t now_usec)
{
	if (since_usec <= 0)
		return "-";
	if (now_usec - since_usec < 1'000'000)
		return "just now";
	// Whole seconds, so "59s ago" does not jump to "1m0s" early and sub-second noise is hidden.
	std::int64_t secs = (now_usec - since_usec) / 1'000'000;
	return format_duration(std::chrono::seconds(secs)) + " ago";
}

std::string printable(std::string_view text)
{
	std::string out;
	out.reserve(text.size());
	for (std::size_t i = 0; i < text.size(); ++i) {
		auto c = static_cast<unsigned char>(text[i]);
		if (c == '\t') {
			out += ' ';
		} else if (c < 0x20 || c == 0x7f) {
			out += '?';
		} else if (c == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) >= 0x80 &&
		           static_cast<unsigned char>(text[i + 1]) <= 0x9f) {
			// U+0080..U+009F: C1 controls, which some terminals obey like ESC sequences.
			out += '?';
			++i;
		} else {
			out += static_cast<char>(c);
		}
	}
	return out;
}

std::size_t display_width(std::string_view text)
{
	return static_cast<std::size_t>(std::count_if(text.begin(), text.end(), [](char c) {
		return (static_cast<unsigned char>(c) & 0xc0) != 0x80;
	}));
}

std::string shell_join(const std::vector<std::string> &argv)
{
	std::string out;
	for (const std::string &arg : argv) {
		if (!out.empty())
			out += ' ';
		if (!arg.empty() && std::all_of(arg.begin(), arg.end(), is_shell_safe)) {
			out += arg;
			continue;
		}
		out += '\'';
		for (char c : arg) {
			if (c == '\'')
				out += "'\\''";
			else
				out += c;
		}
		out += '\'';
	}
	return out;
}

Table::Table(std::vector<std::string> headers)
{
	rows_.push_back(std::move(headers));
}

void Table::add(std::vector<std::string> row)
{
	row.resize(rows_.front().size());
	for (std::string &cell : row)
		cell = printable(cell);
	rows_.push_back(std::move(row));
}

std::string Table::render(std::string_view indent) const
{
	std::vector<std::size_t> widths(rows_.front().size(), 0);
	for (const auto &row : rows_)
		for (std::size_t c = 0; c < row.size(); ++c)
			widths[c] = std::max(widths[c], display_width(row[c]));

	std::string out;
	for (const auto &row : rows_) {
		std::string line(indent);
		for (std::size_t c = 0; c < row.size(); ++c) {
			line += row[c];
			if (c + 1 < row.size())
				line.append(widths[c] - display_width(row[c]) + 2, ' ');
		}
		// An empty last cell would leave the padding of the one before it.
		line.erase(line.find_last_not_of(' ') + 1);
		out += line;
		out += '\n';
	}
	return out;
}

} // namespace brokerctl
