// Pure parsing of brokerctl's own argument values: --exec's argv, --env pairs, durations sent as *_ms.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace brokerctl {

// `--exec CMD` is one word, the program alone; `--exec -- CMD ARG...` takes the rest of the command
// line as the new argv, so a worker's own options need no quoting and are never read as
// brokerctl's: `brokerctl upgrade web --no-wait --exec -- /usr/bin/app --port 80`. Removes what it
// takes from `args` (args[0] is the program; what follows a one-word --exec stays, for brokerctl's
// own options) and returns that argv; "--exec=CMD" is one word too. A "--" before it ends the
// search, as it ends options. nullopt when there is no --exec; an empty argv when no command
// follows it (the caller's usage error). `one_word` says which form it was, for the hint to give
// when the words after a one-word --exec are not brokerctl's.
std::optional<std::vector<std::string>> take_exec(std::vector<std::string> &args, bool *one_word = nullptr);

// "NAME=VALUE" split at the first '=': the value may hold '=' and may be empty, the name may not,
// and neither may hold a NUL (the broker could not pass it through execve). nullopt otherwise.
std::optional<std::pair<std::string, std::string>> parse_env(std::string_view text);

// A positive duration option ("30s", "1m30s", "500ms") as the milliseconds the broker's *_ms
// parameters take. nullopt for anything parse_duration rejects and for zero.
std::optional<std::int64_t> duration_ms(std::string_view text);

} // namespace brokerctl
