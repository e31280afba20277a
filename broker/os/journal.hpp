// The journal's native protocol, written by brokerd itself on its own non-blocking datagram socket:
// what sd_journal_send() does, except that a full journal never blocks the event loop.
#pragma once

#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

namespace brokerd::journal {

inline constexpr const char *kSocketPath = "/run/systemd/journal/socket";
// Messages that wait for a full journal without a pipe to hold them back (brokerd's own events,
// the last lines of a pipe that ended): beyond this, the oldest is dropped and counted.
inline constexpr std::size_t kMaxQueuedMessages = 256;

struct Field {
	std::string_view name;
	std::string_view value;
};

// One native message: KEY=value lines, or KEY, a little-endian 64-bit length and the value when
// the value holds a newline.
std::string encode(std::span<const Field> fields);

// A line's "<N>" level prefix (N from 0 to 7), as journald reads it on a stream: the level and
// the rest of the line; nullopt when the line has none.
std::optional<std::pair<int, std::string_view>> priority_prefix(std::string_view line);

// A worker's output line as brokerd forwards it: the prefix becomes PRIORITY (else 6, systemd's
// default for both streams), the service is SYSLOG_IDENTIFIER, the instance the BROKER_* fields.
struct WorkerLine {
	std::string_view service;
	std::string_view instance; // "web/2/0"
	std::uint64_t generation = 0;
	pid_t pid = 0;
	int stream = 1; // 1 stdout, 2 stderr
	std::string_view line;
};
std::string worker_message(const WorkerLine &w);

enum class Sent { Ok, Again, Failed };

// A datagram socket connected to path, CLOEXEC and non-blocking; invalid, with errno, on failure.
proto::UniqueFd connect_socket(const std::string &path = kSocketPath);

// The connected socket on the event loop. send() takes a message now or says Again, and then
// `writable` runs once the journal has room; queue() keeps a message to send in order (bounded,
// the oldest dropped and counted). While anything is queued, send() says Again: the queue goes
// first, so that nothing overtakes it.
class Journal {
public:
	Journal(sd_event *event, proto::UniqueFd socket) : event_(event), fd_(std::move(socket)) {}

	Sent send(std::string_view message);
	void queue(std::string message);
	std::uint64_t dropped() const { return dropped_; }
	std::size_t queued() const { return queue_.size(); }
	int fd() const { return fd_.get(); }

	std::function<void()> writable;
	// A message the journal refused for good (not for lack of room), with errno: said once by
	// the daemon, which knows where else to write.
	std::function<void(int err)> failed;

private:
	Sent write(std::string_view message);
	void wait_writable();
	void flush();
	static int on_writable(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);

	sd_event *event_;
	proto::UniqueFd fd_;
	EventSource source_;
	std::deque<std::string> queue_;
	std::uint64_t dropped_ = 0;
};

} // namespace brokerd::journal
