// The one duration grammar, read by brokerd's config and by brokerctl's options, and printed by brokerctl.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace proto {

// The longest duration parse_duration accepts: 366 days. No timeout a person means is longer
// (the tests' "forever" is 8760h), and a bound this small lets every caller convert to
// microseconds and add it to a clock reading without overflow.
inline constexpr std::chrono::milliseconds kMaxDuration = std::chrono::hours(366 * 24);

// One or more "number unit" pairs, no spaces: "250ms", "30s", "5m", "1h", "2d", "1m30s". The
// units are ms, s, m (minutes), h and d. nullopt for anything else (bare numbers, fractions,
// signs, other units) and for a total over kMaxDuration.
std::optional<std::chrono::milliseconds> parse_duration(std::string_view text);

// The two largest non-zero units, so it reads at a glance: "250ms", "12s", "3m12s", "2h5m",
// "3d4h". Negative durations print as "0s". parse_duration reads it back, to no more than d.
std::string format_duration(std::chrono::microseconds d);

} // namespace proto
