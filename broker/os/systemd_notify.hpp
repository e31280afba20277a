// SystemdNotifier: brokerd's own sd_notify messages to its service manager, never blocking.
#pragma once

#include "proto/unique_fd.hpp"

#include <sys/socket.h>
#include <sys/un.h>

#include <string_view>

namespace brokerd {

// sd_notify() blocks when the manager's queue is full, which would stop the event loop. This
// sends non-blocking on one socket kept for the daemon's life; a message the manager cannot take
// now is dropped with a warning (STATUS= is sent again with the next change anyway).
class SystemdNotifier {
public:
	// Reads NOTIFY_SOCKET; without it every send is a no-op.
	SystemdNotifier();

	bool enabled() const { return fd_.valid(); }
	void send(std::string_view message);
	// The same with an fd attached (FDSTORE=1); the caller keeps its own. False when it was not
	// delivered.
	bool send_with_fd(std::string_view message, int fd);

private:
	proto::UniqueFd fd_;
	sockaddr_un addr_{};
	socklen_t addr_len_ = 0;
	bool warned_ = false;
};

} // namespace brokerd
