// NotifySocket: the sd_notify endpoint brokerd gives workers as NOTIFY_SOCKET.
#pragma once

#include "proto/unique_fd.hpp"
#include "os/event.hpp"

#include <sys/socket.h>
#include <sys/types.h>

#include <functional>
#include <string>
#include <string_view>

namespace brokerd {

class Supervisor;
struct Instance;

// What one line of a notify datagram asks of brokerd (sd_notify(3): "KEY=value" lines).
struct NotifyLine {
	enum class Kind { Ready, Status, Stopping, MainPid, Other };
	Kind kind = Kind::Other;
	std::string_view value; // what follows "STATUS=" or "MAINPID="
};

// Takes the first line off `text` (up to a '\n', which is dropped) and reads it. Pure, so the
// datagram's grammar is tested and fuzzed without a socket or a supervisor.
NotifyLine take_notify_line(std::string_view &text);

// A datagram socket in the abstract namespace (an autobound name, so two brokers never clash).
// Each message is attributed to its instance by the sender's SCM_CREDENTIALS pid, and its
// SCM_PIDFD must name that instance's own process; messages from unknown pids or other processes,
// or over the size limit, are dropped and logged (rate-limited). Fds are refused by the kernel
// (SO_PASSRIGHTS), or closed off the loop where it cannot.
class NotifySocket {
public:
	// Binds a new socket, or serves `kept` (a re-executed brokerd's).
	NotifySocket(sd_event *event, Supervisor &supervisor, proto::UniqueFd kept = {});
	int fd() const { return fd_.get(); }

	// "@xxxxx", the value for NOTIFY_SOCKET.
	const std::string &address() const { return address_; }

	// Handles what is queued now (a bounded number of messages; the rest at the next wakeup).
	void receive();

	// Called after a message that changed what the crash state holds (READY=1, STOPPING=1,
	// MAINPID=), before it leaves the queue: it must be written by then.
	std::function<void()> persist;

private:
	static int handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	void handle(msghdr &msg, const char *buf, ssize_t n);
	// The lines of one message from `pid`, one of inst's processes, in order. Returns whether one
	// changed what the crash state holds.
	bool apply(Instance &inst, pid_t pid, std::string_view text);

	Supervisor &supervisor_;
	proto::UniqueFd fd_;
	EventSource source_;
	std::string address_;
};

} // namespace brokerd
