// The one duration grammar (see duration.hpp).
#include "duration.hpp"

#include <array>
#include <cstdint>

namespace proto {

namespace {

struct Unit {
	std::string_view suffix;
	std::int64_t usec;
};

// Largest first, as format_duration prints them; parse_duration matches a whole unit, so "5ms"
// is not five minutes and an "s".
constexpr std::array kUnits{
	Unit{"d", 86'400'000'000},
	Unit{"h", 3'600'000'000},
	Unit{"m", 60'000'000},
	Unit{"s", 1'000'000},
	Unit{"ms", 1'000},
};

constexpr std::int64_t kMaxUsec = std::chrono::microseconds(kMaxDuration).count();

} // namespace

std::optional<std::chrono::milliseconds> parse_duration(std::string_view text)
{
	if (text.empty())
		return std::nullopt;
	std::int64_t total_usec = 0;
	std::size_t i = 0;
	while (i < text.size()) {
		std::int64_t n = 0;
		std::size_t digits = i;
		for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
			n = n * 10 + (text[i] - '0');
			if (n > kMaxUsec)
				return std::nullopt;
		}
		if (i == digits)
			return std::nullopt;
		std::size_t unit_start = i;
		while (i < text.size() && text[i] >= 'a' && text[i] <= 'z')
			++i;
		std::string_view suffix = text.substr(unit_start, i - unit_start);
		std::int64_t unit_usec = 0;
		for (const Unit &u : kUnits)
			if (suffix == u.suffix)
				unit_usec = u.usec;
		if (unit_usec == 0 || n > (kMaxUsec - total_usec) / unit_usec)
			return std::nullopt;
		total_usec += n * unit_usec;
	}
	return std::chrono::milliseconds(total_usec / 1000);
}

std::string format_duration(std::chrono::microseconds d)
{
	std::int64_t us = d.count();
	if (us < 1'000'000) {
		std::int64_t ms = us > 0 ? us / 1000 : 0;
		return ms == 0 ? "0s" : std::to_string(ms) + "ms";
	}
	std::string out;
	int shown = 0;
	for (const Unit &u : kUnits) {
		if (u.usec < 1'000'000)
			break; // milliseconds only under a second: "12s", not "12s345ms"
		std::int64_t n = us / u.usec;
		us %= u.usec;
		if (shown == 0 && n == 0)
			continue;
		// The second unit is printed only when non-zero ("1h", not "1h0m"), but it still counts:
		// "1h" for 1h0m59s, since seconds under hours are noise.
		if (n != 0)
			out += std::to_string(n) + std::string(u.suffix);
		if (++shown == 2)
			break;
	}
	return out;
}

} // namespace proto
