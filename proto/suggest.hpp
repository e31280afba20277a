// "Did you mean ...?": the known word closest to a mistyped one, for config keys and brokerctl's
// commands alike.
#pragma once

#include <optional>
#include <span>
#include <string_view>

namespace proto {

// The candidate within two edits (insert, delete, substitute one character) of word, the first
// of the closest; none when no candidate is that close, or when the edits would rewrite most of
// a short word ("ab" is two edits from anything of two letters).
std::optional<std::string_view> closest(std::string_view word, std::span<const std::string_view> candidates);

} // namespace proto
