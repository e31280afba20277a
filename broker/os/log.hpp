// Logging for brokerd: one line per decision, to stderr, with syslog levels journald understands.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

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

// One of brokerd's own events (an upgrade's end, a reload, ...) with what lets a script find it in
// the journal: a MESSAGE_ID that never changes, and BROKER_* fields (daemon/journal_events.hpp).
struct EventRecord {
	std::string_view message_id;
	Level level = Level::Notice;
	std::string message;
	std::vector<std::pair<std::string_view, std::string>> fields;
};
// Logged once: to the event sink when one is set (the journal, as one native message), or else
// as write() writes any line.
void event(const EventRecord &record);
void set_event_sink(std::function<void(const EventRecord &)> sink);

// Writes a worker's output line to fd 1 or 2, prefixed with the instance's name.
void worker_line(int target_fd, std::string_view prefix, std::string_view line);

} // namespace brokerd::log
