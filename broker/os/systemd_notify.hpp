// SystemdNotifier: brokerd's own sd_notify messages to its service manager, never blocking.
#pragma once

#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <sys/socket.h>
#include <sys/un.h>

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>

namespace brokerd {

// sd_notify() blocks when the manager's queue is full, which would stop the event loop. This
// sends non-blocking on one socket kept for the daemon's life; a message the manager cannot take
// now is dropped with a warning (STATUS= is sent again with the next change anyway), except the
// fd store's (FDSTORE=1, FDSTOREREMOVE=1): those wait in order and are sent again from the loop,
// for up to kStoreRetryUsec (the manager's socket holds only net.unix.max_dgram_qlen datagrams,
// 10 by default, and brokerd stores a burst of them at a start).
class SystemdNotifier {
public:
	static constexpr std::uint64_t kStoreRetryUsec = 5'000'000;

	// Reads NOTIFY_SOCKET; without it every send is a no-op.
	SystemdNotifier();

	bool enabled() const { return fd_.valid(); }
	// The loop that sends again what had to wait; until then it waits.
	void attach(sd_event *event);
	void send(std::string_view message);
	// The same with an fd attached (FDSTORE=1); the caller keeps its own. False when it was not
	// delivered and will not be.
	bool send_with_fd(std::string_view message, int fd);

private:
	bool try_send(std::string_view message, int fd);
	void schedule();
	static int on_retry(sd_event_source *s, std::uint64_t usec, void *userdata);

	struct Waiting {
		std::string message;
		proto::UniqueFd fd;
	};
	proto::UniqueFd fd_;
	sockaddr_un addr_{};
	socklen_t addr_len_ = 0;
	bool warned_ = false;
	sd_event *event_ = nullptr;
	EventSource retry_;
	std::deque<Waiting> waiting_;
	std::uint64_t waiting_since_ = 0; // CLOCK_MONOTONIC, of the oldest still waiting
	std::uint64_t pause_ = 0;
};

} // namespace brokerd
