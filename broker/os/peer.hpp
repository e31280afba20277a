// Peer: the process at the other end of a unix connection, held by a pidfd, and its ancestry.
#pragma once

#include "os/result.hpp"
#include "os/time.hpp"
#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace brokerd::peer {

// The process that connected `sock` (whose SO_PEERCRED pid is `pid`), held by a pidfd so that
// signals never reach another process that reuses its pid. From SO_PEERPIDFD where the kernel
// has it (6.5); otherwise pidfd_open(pid), trusted only if that process started no later than
// `connected_boottime` (CLOCK_BOOTTIME when brokerd accepted the connection). Returns the
// pidfd of a live process, or why there is none (it has exited, or its pid now names another
// process).
Result<proto::UniqueFd> process(int sock, pid_t pid, usec_t connected_boottime);
// The part for kernels without SO_PEERPIDFD: the pid, checked by its start time.
Result<proto::UniqueFd> process_by_pid(pid_t pid, usec_t connected_boottime);

// Whether the process behind `pidfd` still runs.
bool alive(int pidfd);
// Whether two pidfds name the same process. Since Linux 6.9 (pidfs) each process has its own
// inode; before, every pidfd shares one, and this is true: the callers' other checks (the pid)
// stand alone then.
bool same_process(int a, int b);

// A process as a saved state names it, so that a brokerd started after a crash finds it again:
// its pid, and when it started (/proc/PID/stat field 22, clock ticks since boot), which a process
// that got the pid since does not share.
struct ProcessIdentity {
	pid_t pid = 0;
	std::uint64_t start_ticks = 0;
	bool operator==(const ProcessIdentity &) const = default;
};
// The identity of a running process; nullopt once it is gone.
std::optional<ProcessIdentity> identity(pid_t pid);
// A pidfd for the process `id` names, if it still runs. The pidfd is opened first and the start
// time checked after, so a pid reused in between is never taken. Otherwise why not.
Result<proto::UniqueFd> reopen(const ProcessIdentity &id);

// Every process of the session `session` (whose id is its leader's pid). A session id stays
// taken while any process has it, so these are surely the leader's session even after the leader
// died; a process may of course leave it (setsid) or join it just after the scan.
std::vector<pid_t> session_members(pid_t session);

// Whether `pid` is one of `ancestors` or descends from one of them, following PPid in /proc at
// most proto::limits::kMaxAncestry steps (an orphan's parent is a subreaper or init: it is not found).
bool descends_from(pid_t pid, const std::vector<pid_t> &ancestors);

// The real uid of a running process, from /proc.
std::optional<uid_t> process_uid(pid_t pid);

} // namespace brokerd::peer
