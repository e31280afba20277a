// SyncClient: blocking Varlink calls under a deadline, for brokerctl, Hello and tests.
#pragma once
#include "proto/varlink.hpp"

#include <chrono>
#include <stdexcept>
#include <string>

namespace proto::varlink {

// Maps a Varlink error name to an errno: PermissionDenied to EACCES, MethodNotFound and
// InterfaceNotFound to EOPNOTSUPP, InvalidParameter to EINVAL, anything else to EREMOTEIO.
int errno_for_error(std::string_view error);

// What a SyncClient throws: an errno (positive) and, for an error reply, its Varlink error name.
// The protocol core's own type: libbroker-client turns it into the public broker::Error.
class Error : public std::runtime_error {
public:
	Error(int errnum, const std::string &what, std::string varlink_error = {})
		: std::runtime_error(what), errnum_(errnum), varlink_error_(std::move(varlink_error))
	{
	}
	int code() const noexcept { return errnum_; }
	const std::string &varlink_error() const noexcept { return varlink_error_; }

private:
	int errnum_;
	std::string varlink_error_;
};

class SyncClient {
public:
	// Connects to the AF_UNIX socket at `path` ("@name" for the abstract namespace).
	// Throws Error (ENOENT/ECONNREFUSED when no broker listens, EACCES, ...).
	explicit SyncClient(const std::string &path,
	                    std::chrono::milliseconds timeout = limits::kDefaultCallTimeout);
	explicit SyncClient(UniqueFd fd, std::chrono::milliseconds timeout = limits::kDefaultCallTimeout);

	// Sends one call and waits for its first reply. An error reply throws Error
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

} // namespace proto::varlink
