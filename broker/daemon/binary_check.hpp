// brokerctl reexec: whether a binary can carry on from this brokerd (`binary --check-state`).
#pragma once

#include <cstdint>
#include <string>

namespace brokerd {

// Runs `binary --check-state` on the very state it would get (`state_fd`, read from its stdin),
// and checks that it reads it: a binary that is missing, does not run, reads another format or
// rejects the config is refused, with the reason in the std::runtime_error. It waits for the
// answer `bound_usec` at most, then kills the check.
void check_binary(const std::string &binary, int state_fd, std::uint64_t bound_usec);

} // namespace brokerd
