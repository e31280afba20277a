// The rule for a worker's status text, for the notify socket's STATUS= and the Worker interface alike.
#pragma once

#include <optional>
#include <string>

namespace proto {

// docs/protocol.md: one line of valid UTF-8 without control characters (C0, DEL, C1), of at most
// limits::kMaxStatusText bytes. Returns why `text` is refused, or nullopt when it is taken; a
// longer text is cut to the limit on a character boundary.
std::optional<std::string> check_status_text(std::string &text);

} // namespace proto
