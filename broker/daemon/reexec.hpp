// brokerctl reexec: which binary brokerd re-executes.
#pragma once

#include <string>

namespace brokerd {

// `requested`, or the binary brokerd runs from: at its path, even when a package upgrade
// replaced the file. Throws std::runtime_error.
std::string reexec_binary(const std::string &requested);

} // namespace brokerd
