// Upgrade tests' helpers: broker-loadgen in the background, brokerctl, streamed Varlink calls, Status checks.
#pragma once

#include "../integration/harness.hpp"
#include "service_manager.hpp"

#include "proto/sync_client.hpp"

#include <csignal>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace utest {

using namespace itest;

// How long one rollout may take before a test gives up on it: generous, as every wait is for an
// event and ends as soon as it happens.
constexpr auto kRolloutDeadline = 60s;

// A brokerd under test with a service manager of its own (see ServiceManager): its notify socket
// is always read, and what it puts into its fd store is kept, so that the test can kill it and
// start it again as systemd would after a crash (Restart=on-failure).
struct TestBroker {
	ServiceManager notify; // outlives brokerd, which the Broker's destructor stops if the test did not
	Broker b;

	// Broker::start, with brokerd's NOTIFY_SOCKET pointing at `notify` and `env` ("K=V") added
	// to its environment; waits for READY=1.
	void start(const json &config, const std::vector<std::string> &env = {});
	// SIGKILL of brokerd alone, at any moment, and its reaping (Broker::kill9()): the processes
	// it started live on and are returned. The fd store is then complete: every message brokerd
	// sent before it died has been handled.
	std::vector<StrayProcess> kill9();
	// Starts brokerd again as systemd restarts a service: the same config file, dir, environment
	// and notify socket, and every stored fd in LISTEN_FDS (fd 3 on, in store order),
	// LISTEN_FDNAMES and LISTEN_PID. The store stays as it is (brokerd releases what it does not
	// want with FDSTOREREMOVE=1). Waits for the new brokerd's READY=1.
	void restart();

private:
	// Starts brokerd through `notify` (its main pid) and waits for one more READY=1.
	void launch(const std::function<void()> &spawn);

	std::vector<std::string> env_;
};

// One broker-loadgen process (the LOADGEN environment variable) against 127.0.0.1:port. It runs
// until finish(); begin_upgrade()/end_upgrade() mark the upgrade windows it reports apart, and
// return once broker-loadgen has taken the signal, so that every window is one it counted.
class Loadgen {
public:
	Loadgen(const Broker &b, std::uint16_t port, const std::string &mode, const std::string &expect,
	        int connections = 8, int rate = 0);
	Loadgen(Loadgen &&) = default;

	void begin_upgrade() { signal_taken(SIGUSR1); }
	void end_upgrade() { signal_taken(SIGUSR2); }
	// Stops the load (in-flight requests complete) and returns broker-loadgen's JSON report.
	json finish();
	const std::string &mode() const { return mode_; }

private:
	// Sends sig and waits until broker-loadgen has read it from its signalfd.
	void signal_taken(int sig);

	std::string mode_;
	std::string out_path_;
	Process proc_;
};

// Both load modes at once: a connection per request and keep-alive, as clients do.
class Load {
public:
	// `rate`: requests per second of each mode (0: as fast as they can).
	Load(const Broker &b, std::uint16_t port, const std::string &expect, int rate = 0);
	void begin_upgrade();
	void end_upgrade();
	// Stops both and CHECKs that every request they made succeeded, that no idle keep-alive
	// connection was reset, and, when an upgrade window was marked, that each counted every
	// window and had requests succeed in them; returns the generations that answered (the
	// "gen N" of the bodies).
	std::set<int> finish_and_check();

private:
	std::vector<Loadgen> gens_;
	int windows_ = 0; // begin_upgrade() calls
};

// brokerctl --socket <control> args..., to completion.
RunResult brokerctl(const Broker &b, const std::vector<std::string> &args, std::chrono::milliseconds timeout = 90s);
// brokerctl, REQUIREd to exit 0.
RunResult brokerctl_ok(const Broker &b, const std::vector<std::string> &args);
// Writes brokerd's config file (with the control socket brokerd was started with), for a reload
// or an upgrade to read.
void write_config(const Broker &b, json cfg);

// A streamed call (Upgrade with "more", Watch) on its own connection.
class StreamCall {
public:
	StreamCall(const std::string &control, const std::string &method, json params);

	struct Reply {
		json parameters;
		std::string error; // empty unless the call ended with an error
		bool continues = false;
	};
	// The next reply, or nullopt when none came within `timeout`.
	std::optional<Reply> next(std::chrono::milliseconds timeout);
	// Reads replies until `pred` accepts one (returned) or the call ends or the deadline passes
	// (nullopt). Every reply read is appended to seen().
	std::optional<Reply> until(const std::function<bool(const Reply &)> &pred, std::chrono::milliseconds timeout);
	const std::vector<Reply> &seen() const { return seen_; }
	std::string transcript() const;
	bool ended() const { return ended_; }

private:
	proto::varlink::SyncClient client_;
	std::vector<Reply> seen_;
	bool ended_ = false;
};

// Upgrade's final reply: "done" progress, or the error it ended with.
StreamCall::Reply final_reply(StreamCall &call, std::chrono::milliseconds timeout = kRolloutDeadline);

// The service's entry in Status, or null.
const json *service_of(const json &status, const std::string &service);
// The instances of one generation of a service.
std::vector<json> generation_instances(const json &status, const std::string &service, int generation);
// The highest generation number listed for the service.
int newest_generation(const json &status, const std::string &service);

// Whether `generation` serves alone at full capacity: no upgrade in progress, exactly `count`
// instances of it, each ready with a live pid, and no process left in any other generation.
// `why` says what is missing.
bool serves_alone(const json &status, const std::string &service, int generation, std::size_t count,
                  std::string &why);
// Waits (Status polls under a deadline) for serves_alone and CHECKs it.
void check_serves_alone(Broker &b, const std::string &service, int generation, std::size_t count,
                        std::chrono::milliseconds timeout = 30s);

// The pid of an instance by id in Status, or 0.
pid_t instance_pid(const json &status, const std::string &service, const std::string &id);
// The pids of every instance of the service in Status that has one, over all generations, sorted.
std::vector<pid_t> running_pids(const json &status, const std::string &service);

// brokerd's fds but for sd-event's timerfds: sd-event opens one for a clock when the first timer
// on it is added and keeps it, so a re-executed or restarted brokerd has none until it next arms a timer.
std::map<int, std::string> brokerd_fds(pid_t pid);
// brokerd_fds() at a moment brokerd sleeps in its event loop's epoll_wait and did not run while
// they were read: between two turns, so that no fd a handler holds for its turn's length (a
// notify sender's pidfd, say) counts. nullopt when no such moment came within `timeout`.
std::optional<std::map<int, std::string>> idle_fds(pid_t pid, std::chrono::milliseconds timeout = 10s);
// "  fd -> target" lines, for messages.
std::string listing(const std::map<int, std::string> &fds);
// VmRSS of a process, in kB.
std::size_t rss_kb(pid_t pid);
// How much a restarted brokerd's RSS may exceed the first one's: both are fresh processes that
// serve the same config, so this is the allocator's slack (larger under AddressSanitizer).
#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kRssMarginKb = 8 * 1024;
#else
constexpr std::size_t kRssMarginKb = 2 * 1024;
#endif
// The inodes of the TCP sockets listening on `port`, from /proc/net/tcp{,6}.
std::set<std::uint64_t> listening_on(std::uint16_t port);
// The inode of an open file (a socket's is the number in "socket:[N]"), or 0.
std::uint64_t inode_of(int fd);

// SIGKILL through a pidfd (the process is brokerd's child, not ours); false if it was gone.
bool kill9(pid_t pid);

// A mask of /proc/PID/status, in hex there: "SigBlk" (blocked), "ShdPnd" (sent to the process,
// not taken yet), "SigIgn", "CapEff"; 0 when absent.
std::uint64_t status_mask(pid_t pid, const std::string &field);
// Whether a process ignores `sig`, from /proc/PID/status.
bool ignores(pid_t pid, int sig);

// The "gen N" of a worker's answer on a new connection, or -1.
int generation_answering(std::uint16_t port);

// A config with one socket "http" and the given services.
json config_with(const json &services);

// The example workers as services on socket "http".
json http_service(int instances, const json &extra = json::object());   // EXAMPLE_HTTP, ready broker
json python_service(int instances, const json &extra = json::object()); // EXAMPLE_PYTHON, ready notify
// A worker that ignores SIGTERM, so it drains until its drain timeout kills it.
extern const std::vector<std::string> kIgnoresTerm;
// One instance of it on socket "http", ready at exec, with the given drain timeout.
json stubborn_service(const std::string &drain_timeout);

std::string shell_quote(const std::string &s);
// "a, b, c", for a CHECK whose values a failure prints.
std::string joined(const std::vector<std::string> &items);
// How many times `what` occurs in `text` (lines of a log, say).
std::size_t occurrences(const std::string &text, const std::string &what);

} // namespace utest
