// brokerd's own process figures, as Prometheus' process_* metrics define them.
#pragma once

#include <cstdint>
#include <optional>

namespace brokerd {

struct ProcessStats {
	double cpu_seconds = 0;         // user and system time
	std::uint64_t resident_bytes = 0;
	std::uint64_t virtual_bytes = 0;
	double start_time_seconds = 0;  // since the epoch
	std::uint64_t open_fds = 0;
	std::uint64_t max_fds = 0;      // the soft RLIMIT_NOFILE
};

// This process's, from /proc/self/stat, /proc/stat's btime, /proc/self/fd and getrlimit(), or
// nullopt when /proc cannot be read. Reads a few small files and lists the fd directory.
std::optional<ProcessStats> process_stats();

} // namespace brokerd
