// NotifySocket: the sd_notify endpoint brokerd gives workers as NOTIFY_SOCKET.
#pragma once

#include "broker/internal/unique_fd.hpp"
#include "event.hpp"

#include <string>

namespace broker {

class Supervisor;

// A datagram socket in the abstract namespace (an autobound name, so two brokers never clash).
// Each message is attributed to its instance by the sender's SCM_CREDENTIALS pid, and its
// SCM_PIDFD must name that instance's own process; messages from unknown pids or other processes,
// or over the size limit, are dropped and logged (rate-limited). Fds are refused by the kernel
// (SO_PASSRIGHTS), or closed off the loop where it cannot.
class NotifySocket {
public:
	// Binds a new socket, or serves `kept` (a re-executed brokerd's).
	NotifySocket(sd_event *event, Supervisor &supervisor, UniqueFd kept = {});
	int fd() const { return fd_.get(); }

	// "@xxxxx", the value for NOTIFY_SOCKET.
	const std::string &address() const { return address_; }

	// Handles what is queued now (a bounded number of messages; the rest at the next wakeup).
	void receive();

private:
	static int handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);

	Supervisor &supervisor_;
	UniqueFd fd_;
	EventSource source_;
	std::string address_;
};

} // namespace broker
