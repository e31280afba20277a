// Integration-test harness: real brokerd processes on real sockets, waited on by event and deadline.
#pragma once

#include "proto/unique_fd.hpp"

#include <nlohmann/json.hpp>

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace itest {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using proto::UniqueFd;

// A required environment variable (BROKERD, EXAMPLE_HTTP, ...); throws when it is unset.
std::string env(const char *name);

// A program the tests need that might not be installed, e.g. /lib/systemd/systemd-socket-proxyd.
bool executable(const std::string &path);

// The fd-probe helper built beside the test programs (see fd_probe.c).
std::string fd_probe();

// A mkdtemp directory, mode 0755 so that a client running as nobody reaches sockets inside it.
// Removed with everything in it on destruction.
class TempDir {
public:
	TempDir();
	~TempDir();
	TempDir(const TempDir &) = delete;
	TempDir &operator=(const TempDir &) = delete;

	const std::string &path() const { return path_; }
	std::string operator/(const std::string &name) const { return path_ + "/" + name; }

private:
	std::string path_;
};

std::string read_file(const std::string &path);
void write_file(const std::string &path, const std::string &text, mode_t mode = 0644);

// How to start a child process.
struct SpawnOptions {
	std::vector<std::string> env;        // "K=V" entries added to (or replacing) the test's own
	std::vector<std::string> unset_env;  // names removed from the inherited environment
	std::string stdout_path;             // empty: inherit
	std::string stderr_path;             // empty: inherit
	int stdout_fd = -1;                  // alternatively, a pipe end (borrowed)
	int stderr_fd = -1;
	bool as_nobody = false;              // setgroups/setgid/setuid 65534 before exec
	bool kill_with_parent = true;        // PR_SET_PDEATHSIG: never outlive a crashed test
	// Socket activation as systemd does it (sd_listen_fds(3)): these fds (borrowed) at 3, 4, ...
	// in the child, in this order, and LISTEN_FDS, LISTEN_FDNAMES (the names, colon-joined) and
	// LISTEN_PID (the child's own pid, written after fork) in its environment. Empty: none of it.
	std::vector<std::pair<std::string, int>> listen_fds;
};

// A child process held by a pidfd. The destructor kills and reaps it if it still runs.
class Process {
public:
	Process() = default;
	Process(Process &&o) noexcept;
	Process &operator=(Process &&o) noexcept;
	~Process();

	static Process spawn(const std::vector<std::string> &argv, const SpawnOptions &opts = {});
	// Forks a child that runs `fn` and _exits with its return value.
	static Process fork_run(const std::function<int()> &fn, const SpawnOptions &opts = {});

	pid_t pid() const { return pid_; }
	int pidfd() const { return pidfd_.get(); }
	bool running() const { return pid_ > 0 && !status_; }

	// Waits for the exit until `timeout` passes. Returns the wait status (as from waitpid),
	// or nullopt on timeout.
	std::optional<int> wait(std::chrono::milliseconds timeout);
	void signal(int sig);
	// SIGKILL and reap.
	void kill();
	std::optional<int> status() const { return status_; }

private:
	pid_t pid_ = -1;
	UniqueFd pidfd_;
	std::optional<int> status_;
};

// "exited with 0", "killed by SIGKILL", ... for messages.
std::string describe_status(int wstatus);

// Runs a program to completion, with its output captured.
struct RunResult {
	int exit_code = -1; // -1 when killed by a signal or timed out
	std::string out;
	std::string err;
	std::string describe() const;
};
RunResult run(const std::vector<std::string> &argv, const SpawnOptions &opts = {},
              std::chrono::milliseconds timeout = 20s);

// Waits for `pred` with a deadline, re-checking a state the harness cannot be woken by (e.g.
// /proc) every few milliseconds. Returns whether `pred` became true.
bool wait_until(const std::function<bool()> &pred, std::chrono::milliseconds timeout);

// Whether the running test case (its current subcase) has reported a failure: a failed assertion,
// FAIL or an exception. Clean-up that finds something wrong after that reports it as a MESSAGE, so
// that one failure is not buried under its consequences.
bool failure_reported();

// A pidfd on a process the test did not start (a worker), opened while it runs, so that its exit
// can be waited for later without mistaking a reused pid for it. Invalid when it is already gone.
UniqueFd pidfd_of(pid_t pid);
// Whether the process behind `pidfd` has died within `timeout`: an unreaped zombie counts, it died.
bool exits_within(int pidfd, std::chrono::milliseconds timeout);
// Whether the process behind `pidfd` is gone and reaped by its parent (no zombie left of it).
bool reaped(int pidfd);
// The live processes of session `sid` (its leader included while it runs).
std::vector<pid_t> session_members(pid_t sid);

// A process left behind: what a stray report says of it.
struct StrayProcess {
	pid_t pid = 0;
	pid_t parent = 0;
	pid_t session = 0;
	std::string cmdline;
};
std::string describe(const std::vector<StrayProcess> &strays);

// What brokerd gets started with.
struct BrokerOptions {
	std::vector<std::string> prefix;     // a launcher run in front, e.g. systemd-socket-activate
	std::vector<std::string> env;        // extra "K=V"
	bool wait_ready = true;
	std::chrono::milliseconds ready_timeout = 20s;
	std::string notify_socket;           // NOTIFY_SOCKET; empty: the Broker's own (see start())
	std::vector<std::pair<std::string, int>> listen_fds; // see SpawnOptions::listen_fds
};

// One brokerd under test, in its own temp dir with its config, control socket and stderr log.
//
// Strays: when brokerd is gone, nothing it started may be left. A process is this brokerd's when
// it descends from brokerd, or from an orphan reparented to the test process (a subreaper) that is
// not a Process the test holds, or belongs to the session of a worker it started. stop(),
// check_strays() and the destructor FAIL on each one still alive (pid, parent, session, command
// line) and then kill and reap it: a test passes only if it leaves nothing behind. A process
// already dying (SIGKILL pending, or exiting) is waited for, not reported.
class Broker {
public:
	Broker();
	~Broker();

	const TempDir &dir() const { return dir_; }
	std::string path(const std::string &name) const { return dir_ / name; }
	std::string control_path() const { return dir_ / "control.sock"; }
	std::string config_path() const { return dir_ / "brokerd.json"; }
	std::string log_path() const { return dir_ / "brokerd.log"; }
	pid_t pid() const { return proc_.pid(); }
	Process &process() { return proc_; }

	// Writes the config (adding control.path if absent) and starts brokerd with NOTIFY_SOCKET
	// set to a datagram socket this harness owns; waits for READY=1 unless told not to.
	void start(json config, const BrokerOptions &opts = {});
	// Waits for READY=1 on the notify socket; throws if brokerd exits first or the deadline passes.
	void wait_ready(std::chrono::milliseconds timeout);

	// A crash and a restart, as under systemd (tests/upgrade/service_manager.hpp keeps the fd store
	// they need). kill9() SIGKILLs brokerd alone and reaps it: whatever it started lives on, as
	// its workers are meant to, and is returned. These survivors stay this Broker's: a stray check
	// reports each one still alive once brokerd is gone, unless a restarted brokerd ends it.
	// start_again() starts brokerd again with the config file the last start() wrote (its log
	// goes on in the same file), after kill9() or an exit; it waits for READY=1 on the Broker's
	// own notify socket unless told not to. end_survivors() kills and reaps the survivors of
	// kill9() that still run (identified by pid and start time), and every process of their
	// sessions, and returns them; no failure: for a test whose restarted brokerd does not
	// re-adopt its predecessor's workers. Other processes are left to the stray checks.
	std::vector<StrayProcess> kill9();
	void start_again(const BrokerOptions &opts = {});
	std::vector<StrayProcess> end_survivors();

	// The next message brokerd sends its service manager after READY=1, or nullopt when none
	// comes within the timeout.
	std::optional<std::string> next_notify(std::chrono::milliseconds timeout);

	// io.brokerd.Control.Status, as the "parameters" of the reply.
	json status(const std::optional<std::string> &service = {});

	// SIGTERM, then waits for the exit and CHECKs it was exit status 0, that the control
	// socket file is gone and that no worker it reported survives it; then check_strays().
	void stop(std::chrono::milliseconds timeout = 20s);
	// stop() without check_strays(): for a test that looks at what brokerd left before the
	// harness cleans up. Returns whether brokerd exited within the timeout.
	bool shut_down(std::chrono::milliseconds timeout = 20s);
	// FAILs with a report of every process of this brokerd still alive (see Strays above), then
	// kills and reaps them. brokerd must have exited (stopped by the test, or by itself).
	void check_strays();
	// For a test that leaves processes behind on purpose (brokerd SIGKILLed): kills and reaps
	// what is left of this brokerd and returns it, for the test to assert on; no failure.
	std::vector<StrayProcess> reap_strays();

	// brokerd's stderr so far, for failure reports.
	std::string log() const;
	std::string report() const;

	// Kills brokerd, every descendant of it and any orphan that was reparented to the test. A
	// failure when it finds anything (brokerd still running, a stray), unless the test already
	// failed: then a MESSAGE. The destructor gives a brokerd still running a graceful stop first
	// (SIGTERM, 20 s), unless the test failed.
	void kill_all();

private:
	struct Scan;
	std::vector<StrayProcess> leftovers(const Scan &scan) const;
	bool owns_session(pid_t sid, const Scan &scan) const;
	void note_sessions(const std::vector<pid_t> &pids);
	void note_all_sessions(); // of every process below brokerd, before it stops
	void report_strays(const std::string &what, const std::vector<StrayProcess> &strays);
	void spawn(const BrokerOptions &opts);

	TempDir dir_;
	UniqueFd notify_;
	std::string notify_name_;
	Process proc_;
	std::vector<pid_t> last_worker_pids_;
	// Sessions of its workers seen so far: session id -> the start time of its leader when seen
	// (0: gone already), so that a reused pid is not taken for the leader.
	std::map<pid_t, unsigned long long> sessions_;
	// kill9()'s survivors: pid -> start time, and their sessions (same form as sessions_).
	std::map<pid_t, unsigned long long> survivors_;
	std::map<pid_t, unsigned long long> survivor_sessions_;
};

// Attaches brokerd's stderr to every failure report of the enclosing scope.
#define BROKER_CONTEXT(b) INFO((b).report())

// Status helpers.
std::vector<json> instances(const json &status, const std::string &service);
std::vector<pid_t> worker_pids(const json &status, const std::string &service);
std::uint16_t socket_port(const json &status, const std::string &socket);
const json *find_named(const json &array, const std::string &name);
const json &member(const json &obj, const char *key);

// /proc helpers.
std::map<int, std::string> proc_fds(pid_t pid);        // fd -> readlink target
std::vector<std::string> proc_cmdline(pid_t pid);
// Whether it runs: a zombie died and counts as gone. A check that a process went proves nothing
// once the harness has killed everything (stop(), kill_all()): take a pidfd_of() it while it runs
// and check exits_within() or reaped() before.
bool process_exists(pid_t pid);
std::optional<std::uint64_t> socket_inode(const std::string &link_target); // "socket:[N]"
std::set<std::uint64_t> socket_inodes(pid_t pid);      // of every socket the process holds
std::map<std::uint64_t, std::uint16_t> tcp_listeners(); // inode -> port, from /proc/net/tcp{,6}
std::size_t fd_count(pid_t pid);
std::string notify_address(pid_t pid);                  // its NOTIFY_SOCKET ("@name"), or empty

// One byte at a time between the test and a child it forked, through a pipe both hold.
class Beacon {
public:
	Beacon();
	void send(); // in either process
	// Waits for a byte until `timeout`; false on timeout or when no process can send any more.
	bool receive(std::chrono::milliseconds timeout);
	// In the parent, for a byte from its child: closes its own sending end first, so that a
	// child that exits without sending ends the wait at once.
	bool from_child(std::chrono::milliseconds timeout);

private:
	UniqueFd read_, write_;
};

// A free TCP port on 127.0.0.1: bound to port 0, read, closed.
std::uint16_t free_port();

// A blocking connection to a unix socket (brokerd's control socket); an invalid fd, with errno
// set, when it fails.
UniqueFd unix_connect(const std::string &path);

// A connected TCP socket to 127.0.0.1:port (blocking connect under a deadline).
UniqueFd tcp_connect(std::uint16_t port, std::chrono::milliseconds timeout = 5s);

struct HttpResponse {
	int status = 0;
	std::map<std::string, std::string> headers; // names lowercased
	std::string body;
};

// A tiny blocking HTTP/1.1 client with timeouts, keeping its connection alive between requests.
class HttpConnection {
public:
	explicit HttpConnection(std::uint16_t port, std::chrono::milliseconds timeout = 5s);
	explicit HttpConnection(UniqueFd connected, std::chrono::milliseconds timeout = 5s);
	HttpResponse get(const std::string &path, bool keep_alive = true);

private:
	void send_all(const std::string &data);
	bool fill(); // reads more into buf_; false at end of stream
	std::string read_line();

	UniqueFd fd_;
	std::chrono::milliseconds timeout_;
	std::string buf_;
};

// GET on a new connection.
HttpResponse http_get(std::uint16_t port, const std::string &path = "/");

// The config of one service: exec, sockets, instances, ready mode.
json service(std::vector<std::string> exec, std::vector<std::string> sockets, int instances,
             const std::string &ready);
json tcp_socket(); // {"listen": "tcp://127.0.0.1:0"}

// The fd-probe's record of what a worker held at exec: fd -> link target, and its LISTEN_* env.
struct ProbeRecord {
	pid_t pid = 0;
	std::map<int, std::string> fds;
	std::map<int, std::string> sockname; // fd -> "127.0.0.1:PORT" for sockets
	std::map<std::string, std::string> env;
};
// Reads every record written into `dir` by probes whose file names start with `prefix`.
std::vector<ProbeRecord> probe_records(const std::string &dir, const std::string &prefix);

} // namespace itest
