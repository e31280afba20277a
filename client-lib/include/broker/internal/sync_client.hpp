// SyncClient: blocking Varlink calls under a deadline, for brokerctl, Hello and tests.
#pragma once
#include "broker/internal/internal.hpp"
#include "broker/internal/varlink.hpp"

#include <chrono>
#include <string>

namespace broker::varlink {

// Maps a Varlink error name to an errno: PermissionDenied to EACCES, MethodNotFound and
// InterfaceNotFound to EOPNOTSUPP, InvalidParameter to EINVAL, anything else to EREMOTEIO.
int errno_for_error(std::string_view error);

class SyncClient {
public:
	// Connects to the AF_UNIX socket at `path` ("@name" for the abstract namespace).
	// Throws broker::Error (ENOENT/ECONNREFUSED when no broker listens, EACCES, ...).
	explicit SyncClient(const std::string &path,
	                    std::chrono::milliseconds timeout = limits::kDefaultCallTimeout);
	explicit SyncClient(UniqueFd fd, std::chrono::milliseconds timeout = limits::kDefaultCallTimeout);

	// Sends one call and waits for its first reply. An error reply throws broker::Error
	// carrying the Varlink error name and errno_for_error(name).
	Message call(std::string_view method, json parameters = json::object(), std::vector<UniqueFd> fds = {});

	// Lower level, for "more" and "oneway" calls: send a whole message, read the next one.
	// receive() does not interpret error replies; it throws only on I/O errors and timeouts.
	// When brokerd closed the connection after writing a message (the error a connection past
	// a limit gets), send() returns and receive() gives that message.
	void send(const json &body, std::vector<UniqueFd> fds = {});
	Message receive();

	Stream &stream() { return stream_; }
	void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

private:
	bool peer_left_message();

	Stream stream_;
	std::chrono::milliseconds timeout_;
};

} // namespace broker::varlink
