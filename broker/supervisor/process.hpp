// Process helpers the supervisor's parts share: pidfds, instance tokens, errno text.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace brokerd::process {

std::string errno_text(int e);
int pidfd_open(pid_t pid);
int pidfd_send_signal(int pidfd, int sig);
// When `pid` started (peer::ProcessIdentity's start_ticks), or 0 once it is gone.
std::uint64_t start_time(pid_t pid);
// SIGKILL to every process still in the session `session`, after its leader died (see
// peer::session_members); each through a pidfd, checked to be in the session still.
void kill_session(pid_t session);
// A new instance's secret: limits::kTokenBytes random bytes, in hex.
std::string random_token();

} // namespace brokerd::process
