// Upgrade tests' helpers: broker-loadgen in the background, brokerctl, streamed Varlink calls, Status checks.
#pragma once

#include "../integration/harness.hpp"

#include "proto/sync_client.hpp"

#include <condition_variable>
#include <csignal>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace utest {

using namespace itest;

// How long one rollout may take before a test gives up on it: generous, as every wait is for an
// event and ends as soon as it happens.
constexpr auto kRolloutDeadline = 60s;

// brokerd's NOTIFY_SOCKET, read for as long as brokerd runs. brokerd sends a STATUS= at every state
// change with a blocking sd_notify(), and an AF_UNIX datagram socket holds only
// net.unix.max_dgram_qlen (10 by default) unread messages: a notify socket that is read only until
// READY=1 (as the integration harness does) stops brokerd, event loop and all, a few upgrades in.
class NotifyDrain {
public:
	NotifyDrain();
	~NotifyDrain();
	NotifyDrain(const NotifyDrain &) = delete;
	NotifyDrain &operator=(const NotifyDrain &) = delete;

	std::string address() const { return "@" + name_; }
	// Whether READY=1 arrived within `timeout`.
	bool wait_ready(std::chrono::milliseconds timeout);

private:
	void run();

	std::string name_;
	UniqueFd fd_;
	UniqueFd stop_; // eventfd
	std::mutex mutex_;
	std::condition_variable cv_;
	bool ready_ = false;
	std::thread thread_;
};

// A brokerd under test whose notify socket is always read (see NotifyDrain).
struct TestBroker {
	NotifyDrain notify; // outlives brokerd, which the Broker's destructor stops if the test did not
	Broker b;

	// Broker::start, with brokerd's NOTIFY_SOCKET pointing at `notify` and `env` ("K=V") added
	// to its environment; waits for READY=1.
	void start(const json &config, const std::vector<std::string> &env = {});
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

// SIGKILL through a pidfd (the process is brokerd's child, not ours); false if it was gone.
bool kill9(pid_t pid);

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

} // namespace utest
