// brokerctl reexec: which binary brokerd re-executes, and whether it can carry on from this one.
#pragma once

#include <cstdint>
#include <string>

namespace brokerd {

// `requested`, or the binary brokerd runs from: at its path, even when a package upgrade
// replaced the file. Throws std::runtime_error.
std::string reexec_binary(const std::string &requested);

// Runs `binary --check-state` on the very state it would get (`state_fd`, read from its stdin),
// and checks that it reads it: a binary that is missing, does not run, reads another format or
// rejects the config is refused, with the reason in the std::runtime_error. It waits for the
// answer `bound_usec` at most, then kills the check.
void check_binary(const std::string &binary, int state_fd, std::uint64_t bound_usec);

} // namespace brokerd
