// Time as sd-event keeps it, like systemd's usec_t: microseconds, for clock readings and spans alike.
#pragma once

#include <chrono>
#include <cstdint>
#include <ctime>

namespace brokerd {

// A clock reading (each one says which clock) or a span. Spans come from std::chrono durations
// (the config's are milliseconds) through usec(), so no code converts units by hand.
using usec_t = std::uint64_t;

constexpr usec_t usec(std::chrono::microseconds d)
{
	return d.count() > 0 ? static_cast<usec_t>(d.count()) : 0;
}

// Whole milliseconds, for the wire and for messages, which speak in them.
constexpr std::uint64_t msec(usec_t t)
{
	return t / 1000;
}

inline usec_t now_usec(clockid_t clock)
{
	timespec ts{};
	clock_gettime(clock, &ts);
	return static_cast<usec_t>(ts.tv_sec) * 1000000u + static_cast<usec_t>(ts.tv_nsec) / 1000u;
}

} // namespace brokerd
