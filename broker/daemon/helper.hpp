// Starting the brokerd binary again as one of brokerd's helpers: the stop sentinel, the fd holder.
#pragma once

#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

namespace brokerd {

// `brokerd ARGS...` from /proc/self/exe: in a session of its own (a kill of brokerd's process
// group or session never reaches it), signals unblocked and at their defaults, stdin and stdout
// on /dev/null, stderr brokerd's, and only JOURNAL_STREAM in its environment. Each fds[i].first
// goes to fds[i].second in it, every other fd is closed (CLOEXEC). The pid, or -errno.
pid_t spawn_helper(const std::vector<std::string> &args, const std::vector<std::pair<int, int>> &fds);

} // namespace brokerd
