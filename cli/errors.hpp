// brokerctl's exit codes and the one mapping from every failure to a message and a code.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <string_view>

namespace proto::varlink {
class Error;
}

namespace brokerctl {

// Documented in `brokerctl --help` and the man page; scripts depend on them, so never renumber.
enum ExitCode : int {
	kExitOk = 0,
	kExitFailure = 1,         // anything else; the message says what
	kExitUsage = 2,           // bad command line
	kExitNotRunning = 3,      // no broker listens on the control socket
	kExitNotActive = 3,       // is-active: a service is not active (systemctl's code)
	kExitPermissionDenied = 4,
	kExitNoSuchService = 5,
	kExitRolledBack = 6,      // the upgrade failed, and the previous generation serves again
	kExitNotStarted = 7,      // the broker refused to begin: the state or config does not allow it
};

// The --help footer that lists the codes above.
extern const char *const kExitCodesHelp;

// A failure already explained for the operator: main() prints "brokerctl: <what>" and exits. An
// empty message prints nothing: the remote brokerctl of -H said it already (remote.hpp).
class Failure : public std::runtime_error {
public:
	Failure(ExitCode code, const std::string &message) : std::runtime_error(message), code_(code) {}
	ExitCode code() const noexcept { return code_; }

private:
	ExitCode code_;
};

// connect() to the control socket failed.
Failure connect_failure(const proto::varlink::Error &e, const std::string &path);

// Sending the call or waiting for its reply failed (timeout, broker went away, bad framing).
Failure io_failure(const proto::varlink::Error &e, std::string_view method, std::chrono::milliseconds timeout);

// The broker answered with a Varlink error. `method` and `parameters` are those of the call, for
// errors whose own parameters leave out what the operator asked for.
Failure remote_failure(std::string_view error, const nlohmann::json &error_parameters, std::string_view method,
                       const nlohmann::json &call_parameters);

} // namespace brokerctl
