// Pure parsing of brokerctl's own argument values: --exec's argv, --env pairs, durations sent as *_ms.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace brokerctl {

// `--exec` takes the rest of the command line as the new argv, so a worker's own options need no
// quoting: `brokerctl upgrade web --version 2 --exec /usr/bin/app --port 80`. Removes "--exec" and
// everything after it from `args` (args[0] is the program) and returns that argv; "--exec=CMD ARG.."
// starts it with CMD. A "--" before it ends the search, as it ends options. nullopt when there is
// no --exec; an empty argv when nothing follows it (the caller's usage error).
std::optional<std::vector<std::string>> take_exec(std::vector<std::string> &args);

// "NAME=VALUE" split at the first '=': the value may hold '=' and may be empty, the name may not,
// and neither may hold a NUL (the broker could not pass it through execve). nullopt otherwise.
std::optional<std::pair<std::string, std::string>> parse_env(std::string_view text);

// A positive duration option ("30s", "1m30s", "500ms") as the milliseconds the broker's *_ms
// parameters take. nullopt for anything parse_duration rejects and for zero.
std::optional<std::int64_t> duration_ms(std::string_view text);

} // namespace brokerctl
