// Logging for brokerd: one line per decision, to stderr, with syslog levels journald understands.
#pragma once

#include <string_view>

namespace brokerd::log {

enum class Level { Error = 3, Warning = 4, Notice = 5, Info = 6, Debug = 7 };

void write(Level level, std::string_view message);

// Whether stderr is the journal stream the service manager connected brokerd to: JOURNAL_STREAM
// names its device and inode.
bool stderr_is_journal();

inline void error(std::string_view m) { write(Level::Error, m); }
inline void warning(std::string_view m) { write(Level::Warning, m); }
inline void notice(std::string_view m) { write(Level::Notice, m); }
inline void info(std::string_view m) { write(Level::Info, m); }

// A line any local client can cause at will (a denied call, a refused connection): at most
// kClientLinesPerSecond a second, so that nobody can flood the journal and get brokerd's own
// lines dropped by its rate limit. The rest are counted, and the count is logged with the
// first line of a later second.
inline constexpr int kClientLinesPerSecond = 10;
void client(Level level, std::string_view message);

// Writes a worker's output line to fd 1 or 2, prefixed with the instance's name.
void worker_line(int target_fd, std::string_view prefix, std::string_view line);

} // namespace brokerd::log
