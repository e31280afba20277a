// Spawner: what a worker's process starts with, computed in full before fork, so that the child
// only moves fds into place, switches credentials and execs.
#pragma once

#include "proto/unique_fd.hpp"
#include "config/config.hpp"

#include <sys/resource.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace brokerd {

// What plan_spawn() needs, gathered by the caller (resolving the program touches the system;
// planning does not). The credentials are cfg.accounts', resolved when the config was loaded.
struct SpawnInputs {
	explicit SpawnInputs(const config::ServiceConfig &c) : cfg(c) {}

	const config::ServiceConfig &cfg;
	std::string program;             // cfg.exec[0], resolved
	char **inherited = nullptr;      // brokerd's own: what a worker inherits of it
	std::vector<std::string> socket_names;
	std::vector<int> socket_fds;     // the listeners' fds, for the worker's 3..
	std::string notify_address;
	std::string control_path;
	std::string token;
	std::string service;
	std::string instance;
	std::uint64_t generation = 0;
	rlimit nofile{};                 // rlim_cur 0: left as it is
};

// Everything the child uses, every buffer allocated: the child allocates nothing.
struct SpawnPlan {
	std::string program;
	std::vector<std::string> args; // what argv points into
	std::vector<std::string> env;  // what envp points into
	std::vector<char *> argv;      // null-terminated
	std::vector<char *> envp;      // null-terminated
	// The index in env of "LISTEN_PID=" with room for the digits the child writes, or -1.
	int listen_pid = -1;
	std::string cwd;
	config::Credentials creds;
	rlimit nofile{};
	// The child's fds in order: 0, 1, 2, the sockets at 3.., and last the status pipe's write
	// end (the spawner fills in stdio and the status pipe). lifted: room for their copies.
	std::vector<int> fds;
	std::vector<int> lifted;
	// The go pipe, a socket pair (the spawner fills it in; -1: none). The child closes its copy
	// of the write end and waits for one byte on the read end before anything else: the parent writes it once
	// the crash state names the child. EOF instead (brokerd died before) ends the child with
	// status 127, so no worker ever runs that no state names.
	int go_read = -1;
	int go_write = -1;
};

// The worker's argv, environment (inherited, LISTEN_*, NOTIFY_SOCKET, BROKER_*, the user's HOME,
// USER and LOGNAME, then cfg.env), cwd, credentials and fds. Pure: no system call.
SpawnPlan plan_spawn(const SpawnInputs &in);

// Starts the process a plan describes and returns its pid, or -1 with errno. brokerd's is
// fork_and_exec(); a unit test of the lifecycle puts its own in (Supervisor::set_launcher), which
// forks a child that runs the test's code in place of the worker.
using Launcher = std::function<pid_t(SpawnPlan &plan)>;
// Forks; the child moves the plan's fds into place, switches credentials and execs, never returning.
pid_t fork_and_exec(SpawnPlan &plan);

// The pipes of a child being spawned: its stdout, stderr, exec status and go pipe (SpawnPlan),
// and /dev/null for its stdin. All close-on-exec.
struct ChildPipes {
	proto::UniqueFd out_r, out_w, err_r, err_w, status_r, status_w, go_r, go_w, devnull;
};
// Returns why they could not all be opened.
std::optional<std::string> open_child_pipes(ChildPipes &p);

// The name of a worker's output pipe (its read end) in the service manager's fd store: by the
// pipe's inode, as slot ids repeat across respawns and FDSTOREREMOVE drops every fd of a name.
inline constexpr std::string_view kPipeStorePrefix = "pipe.";
std::string pipe_store_name(std::uint64_t inode);

} // namespace brokerd
