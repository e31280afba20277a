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
#include <utility>
#include <vector>

namespace brokerd {

// One message with at most one fd (SCM_RIGHTS; none when fd < 0), to `addr` or, with addr_len 0,
// on a connected socket; never blocking, never SIGPIPE. False and errno when it did not go.
bool send_message_with_fd(int sock, const sockaddr_un *addr, socklen_t addr_len, std::string_view message, int fd);

// sd_notify() blocks when the manager's queue is full, which would stop the event loop. This
// sends non-blocking on one socket kept for the daemon's life; a message the manager cannot take
// now is dropped with a warning (STATUS= is sent again with the next change anyway), except the
// fd store's (FDSTORE=1, FDSTOREREMOVE=1): those wait in order and are sent again from the loop,
// for up to kStoreRetryUsec (the manager's socket holds only net.unix.max_dgram_qlen datagrams,
// 10 by default, and brokerd stores a burst of them at a start).
class SystemdNotifier {
public:
	static constexpr std::uint64_t kStoreRetryUsec = 5'000'000;

	// Reads NOTIFY_SOCKET; without it every send is a no-op until use().
	SystemdNotifier();

	bool enabled() const { return fd_.valid(); }
	// From now on to a connected socket: the fd holder's (daemon/fd_holder.hpp), which reads the
	// same messages. What waited for the one before is dropped; what is kept (below) is not.
	void use(proto::UniqueFd connected);
	int fd() const { return fd_.get(); }
	// "the service manager", or "the fd holder", for messages.
	const char *target() const { return target_; }
	// With a holder, which may die while brokerd runs, the notifier remembers what the store
	// should hold (each FDSTORE=1 until an FDSTOREREMOVE=1 of its name), by fd number and inode:
	// resend_kept() sends each to a new holder whose fd is still the same file in brokerd.
	// remember() adds one without sending it (an fd the holder passed, or a re-exec carried).
	void remember(std::string message, int fd);
	void resend_kept();
	std::vector<std::pair<std::string, int>> kept() const;
	// The loop that sends again what had to wait; until then it waits.
	void attach(sd_event *event);
	void send(std::string_view message);
	// FDSTORE=1 of `name`; `poll`: whether the store may watch the fd for a hangup (which drops
	// it), as it cannot a memfd.
	static std::string store_message(const std::string &name, bool poll);
	// The same with an fd attached (FDSTORE=1); the caller keeps its own. False when it was not
	// delivered and will not be.
	bool send_with_fd(std::string_view message, int fd);

private:
	bool deliver(std::string_view message, int fd);
	void note(std::string_view message, int fd);
	bool try_send(std::string_view message, int fd);
	void schedule();
	static int on_retry(sd_event_source *s, std::uint64_t usec, void *userdata);

	struct Waiting {
		std::string message;
		proto::UniqueFd fd;
	};
	struct Kept {
		std::string message;
		std::string name;
		int fd;
		dev_t dev;
		ino_t ino;
	};
	proto::UniqueFd fd_;
	const char *target_ = "the service manager";
	bool keeping_ = false; // a holder: kept_ is kept
	std::vector<Kept> kept_;
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
