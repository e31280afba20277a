// brokerctl -H: the control connection to another host's brokerd, through `ssh HOST brokerctl
// bridge`, and that bridge itself. The bridge copies bytes and never reads the messages: the
// Control interface passes no fds, so a bridge refuses any brokerd sends.
#pragma once

#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerctl {

// -H [USER@]HOST[:PORT], and the remote control socket when --socket was given.
struct RemoteTarget {
	std::string given;       // as typed, for messages
	std::string destination; // ssh's: "HOST" or "USER@HOST" (an IPv6 address without brackets)
	std::optional<std::string> port;
	std::optional<std::string> socket; // the remote brokerctl's --socket
};

// "web1", "root@web1:2222", "[2001:db8::1]:22", "admin@::1" (no port: an address with colons
// takes one only in brackets). nullopt for an empty or bad part, a port outside 1-65535, or a user
// or host that ssh would read as an option (a leading '-') or that holds more than a name's
// characters.
std::optional<RemoteTarget> parse_target(std::string_view text);

// The command that runs the bridge: $BROKERCTL_SSH (`ssh_command`, split at blanks; "ssh" when
// empty) -x -T [-p PORT] -- DESTINATION "brokerctl bridge [--socket PATH]", the last word quoted
// for the remote shell.
std::vector<std::string> bridge_command(const RemoteTarget &target, std::string_view ssh_command);

// The bridge's process: the socket brokerctl speaks Varlink on (its other end is ssh's stdin and
// stdout) and ssh's pid. Throws Failure when ssh cannot be started.
struct Bridge {
	proto::UniqueFd fd;
	pid_t ssh = -1;
};
Bridge spawn_bridge(const RemoteTarget &target);

// What ssh's exit says once the bridge closed before brokerd answered: ssh's own failure (255),
// the remote bridge's (its message is on stderr already: 3, 4 and 5 are passed through), no
// brokerctl there (127). Waits for ssh at most `wait`, then kills it. nullopt when ssh exited 0:
// the bridge carried brokerd's own close.
struct BridgeExit {
	int code;            // brokerctl's exit code
	std::string message; // empty when the remote side said it already
};
std::optional<BridgeExit> reap_bridge(pid_t ssh, const RemoteTarget &target, std::chrono::milliseconds wait);

// The same ssh status, as the pure mapping reap_bridge uses (`status` as waitpid gives it).
std::optional<BridgeExit> bridge_exit(int status, const RemoteTarget &target);

// `brokerctl bridge`: relays standard input to brokerd's control socket at `socket` and its
// replies to standard output, until brokerd closes it. Returns the exit code; throws Failure.
int run_bridge(const std::string &socket, std::chrono::milliseconds timeout);

} // namespace brokerctl
