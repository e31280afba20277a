// Process helpers the supervisor's parts share: pidfds, instance tokens, errno text.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace brokerd::process {

std::string errno_text(int e);
int pidfd_open(pid_t pid);
int pidfd_send_signal(int pidfd, int sig);
// A new instance's secret: limits::kTokenBytes random bytes, in hex.
std::string random_token();

} // namespace brokerd::process
