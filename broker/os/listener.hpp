// Listener: a socket brokerd binds (or adopts from systemd) once and owns for its whole life.
#pragma once

#include "os/result.hpp"
#include "proto/unique_fd.hpp"
#include "config/config.hpp"

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace brokerd {

struct Listener {
	std::string name;
	proto::UniqueFd fd;
	std::string address;     // canonical, with the real port: "tcp://127.0.0.1:8080", "unix:/run/x.sock"
	std::string kind;        // "tcp", "udp" or "unix"
	std::string origin;      // "bound", "systemd" (a socket unit's) or "fdstore" (kept by the service manager)
	std::string unlink_path; // a socket file brokerd created, removed at shutdown
};

// The fds systemd passed (LISTEN_FDS/LISTEN_FDNAMES), by name, each CLOEXEC. Entries are taken
// out as they are adopted; whatever remains is unused.
struct InheritedFds {
	std::multimap<std::string, proto::UniqueFd> by_name;

	// Reads and unsets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.
	static InheritedFds from_environment();
};

// Binds the socket `cfg` describes, or adopts it from `inherited` for kind Systemd (checking
// that its type matches: the adopted socket must be a listening stream or a datagram socket).
// Throws std::runtime_error with a message naming the socket: `socket http: bind tcp://0.0.0.0:80:
// Address already in use`.
Listener open_listener(const config::SocketConfig &cfg, InheritedFds &inherited);

// A socket the service manager kept for us in its fd store (FDSTORE=1, FDNAME=cfg.name) and passed
// back in LISTEN_FDS: adopted, with its accept queue, when it is what cfg describes (same kind and
// address; backlog reapplied). Otherwise how it differs, and fd is closed.
Result<Listener> adopt_stored(const config::SocketConfig &cfg, proto::UniqueFd fd);

// Whether a unix socket's path still has a socket file (always true for "@name").
bool unix_file_present(const std::string &path);

// Whether something still listens on the unix socket file at `path`: another brokerd, another
// daemon, or workers of a brokerd that died. A file left by a process that is gone refuses the
// connection, and may be replaced.
bool unix_socket_in_use(const std::string &path);

// The canonical address of a socket ("unix:/run/brokerd/control.sock"), or empty.
std::string socket_address(int fd);

// Removes the socket file brokerd created for `l`, if any, and only if it still is a socket.
void remove_socket_file(const Listener &l);

} // namespace brokerd
