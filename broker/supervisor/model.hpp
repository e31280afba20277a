// The supervisor's model: services, their generations and instances, and an upgrade in progress.
#pragma once

#include "proto/unique_fd.hpp"
#include "config/config.hpp"
#include "config/diff.hpp"
#include "os/event.hpp"
#include "os/listener.hpp"
#include "handoff/router.hpp"
#include "supervisor/history.hpp"
#include "supervisor/restart.hpp"
#include "upgrade/rollout.hpp"

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd {

class Supervisor;
class Observer;
struct Service;
struct Generation;

// Connections handed off, for Status, Watch and upgrade progress. handed: sent by draining
// instances; received: taken by their successors; returned: back with their sender.
struct HandoffCounts {
	std::uint64_t handed = 0;
	std::uint64_t received = 0;
	std::uint64_t returned = 0;

	bool empty() const { return handed == 0 && received == 0 && returned == 0; }
};

// Restarting: no process, waiting for its restart backoff; the wire calls it "starting", as it
// counts as one that is on its way up.
enum class InstanceState { Starting, Restarting, Ready, Draining, Exited, Failed };

// Where an instance's process came from: how brokerd watches it, signals it, and what its exit means.
enum class InstanceOrigin {
	Spawned,    // brokerd's child, watched as a child: its pidfd lives in child_source
	Forked,     // spawned, but that first process exited and pid is the main pid it named (MAINPID=)
	Registered, // started elsewhere and said Hello: never restarted by brokerd
};

// What an instance is there for, beside its state: what its readiness and its exit mean.
enum class InstancePurpose {
	Serving,        // an ordinary instance: restarted under its policy
	Restored,       // started by a rollback to refill the old generation; its readiness feeds it
	Retired,        // drained on purpose: never restarted, pruned once exited
	RolloutDrained, // retired by an upgrade or takeover, which awaits its exit
};

// A worker's stdout or stderr pipe, copied line by line to brokerd's own with the instance's name.
// Its read end is also kept in the service manager's fd store as "pipe.<inode>" (stored): a worker
// never writes into a pipe nobody holds, even while brokerd is down.
struct OutputPipe {
	proto::UniqueFd fd;
	EventSource source;
	std::string partial;
	int target = 2;
	std::uint64_t inode = 0;
	bool stored = false;
};

// One instance slot of a generation: the process currently running in it, if any.
struct Instance {
	Supervisor *supervisor = nullptr;
	Service *service = nullptr;
	Generation *generation = nullptr;
	unsigned index = 0;
	std::string id; // "web/1/0"

	InstanceState state = InstanceState::Starting;
	usec_t since = 0; // CLOCK_REALTIME, of the last state change
	pid_t pid = 0;
	pid_t main_pid = 0;       // from MAINPID=, when not pid itself
	// When pid and main_pid started (/proc/PID/stat field 22), read when brokerd learnt each
	// while it surely named that process: with the pid, what the crash state names a process by.
	std::uint64_t pid_start = 0;
	std::uint64_t main_pid_start = 0;
	pid_t session = 0;        // of a spawned instance: the session (and group) its first process leads
	InstanceOrigin origin = InstanceOrigin::Spawned;
	EventSource child_source; // owns the pidfd; kept until the slot respawns
	proto::UniqueFd exec_status;     // read end: errno if exec failed, EOF when it succeeded
	EventSource exec_source;
	EventSource timer; // start timeout, drain deadline or restart backoff
	OutputPipe out, err;
	std::deque<std::string> last_lines;
	std::string status_text;
	std::string token;
	EventSink *events = nullptr;
	// The same connection for handoff counts: kept past the process's exit until the connection
	// closes, as an acknowledgement may still be read from it.
	EventSink *counted = nullptr;
	std::string exit_reason;
	// Restarts of this slot under its restart policy since its generation started (Status); not
	// the backoff's step, which a stable run resets.
	unsigned restarts = 0;

	bool accepts_handoff = false;       // said so in Hello
	bool peer_handoff = false;          // its Events stream speaks direct handoff channels
	// The receivers its process (peers_of) was introduced to (Peers), each once, with what it
	// said moved to each (Handed).
	struct PeerLink {
		std::string instance;
		pid_t pid = 0;
		std::uint64_t sent = 0, landed = 0, returned = 0;
	};
	std::vector<PeerLink> peers;
	pid_t peers_of = 0;
	// From a crash state: it had an Events stream, so it says Resume when it reconnects.
	bool linked = false;
	HandoffCounts handoff;              // as a sender (handed, returned) and a receiver (received)
	std::uint64_t handoff_remaining = 0; // what it said it is about to hand, for progress

	proto::UniqueFd pidfd; // registered, forked or MAINPID (a spawned one's pidfd lives in child_source)
	bool registered() const { return origin == InstanceOrigin::Registered; }
	// Watched through pidfd rather than as brokerd's child.
	bool watched_by_pidfd() const { return origin != InstanceOrigin::Spawned; }

	InstancePurpose purpose = InstancePurpose::Serving;
	// Drained on purpose: never restarted, pruned once exited.
	bool retired() const
	{
		return purpose == InstancePurpose::Retired || purpose == InstancePurpose::RolloutDrained;
	}
	// Retired from now on; one an upgrade drained stays so, as the upgrade awaits its exit.
	void retire()
	{
		if (!retired())
			purpose = InstancePurpose::Retired;
	}

	RestartBackoff backoff;
	// From a crash state: when the dead brokerd's timer for it was due (CLOCK_MONOTONIC), until
	// Supervisor::readopt() arms it again.
	usec_t restored_deadline = 0;
	// Drained in this turn of the loop, not told yet (Supervisor::hold()).
	bool drain_untold = false;
	// A registered worker found again after a crash of brokerd, until its process says Hello
	// again (register_external): that Hello is this registration's, not a new one.
	bool awaiting_hello = false;
};

// A generation's env against the one before it: config::EnvChange (config/diff.hpp).
using config::EnvChange;
using config::env_changes;

struct Generation {
	Service *service = nullptr;
	std::uint64_t number = 0;
	config::ServiceConfig cfg;
	std::vector<std::unique_ptr<Instance>> instances;
	unsigned next_index = 0;
	// For Status: when it was created (CLOCK_REALTIME), and its env against the generation it
	// followed (none for a service's first).
	usec_t started = 0;
	std::vector<EnvChange> env;
};

// An upgrade in progress: from the current generation to a new one.
struct Upgrade {
	explicit Upgrade(Rollout r) : rollout(std::move(r)) {}

	Rollout rollout;
	Generation *from = nullptr; // may be null for a service that had no generation running
	Generation *to = nullptr;
	std::string kind; // "upgrade", "rollback" or "restart"
	std::optional<config::Duration> drain_timeout; // the operator's, for the old instances too
	std::vector<Observer *> observers;
	usec_t started = 0; // CLOCK_MONOTONIC
	std::string failed_instance;
	std::vector<std::string> failed_output;
	HandoffCounts handoff;

	// A takeover's instances arrive by Hello, on their owner's schedule: it fails once it has
	// waited a start_timeout for a registration with nothing else moving. What it had seen at the
	// last check (instances registered, ready, old exited), and when that last changed.
	Service *service = nullptr;
	Supervisor *supervisor = nullptr;
	EventSource registration_timer;
	std::array<unsigned, 3> seen{};
	usec_t last_progress = 0; // CLOCK_MONOTONIC
};

// A Scale call that waits: for the instances it started to get ready (up), or for those it
// drained to exit.
struct ScaleWaiter {
	Observer *observer = nullptr;
	std::vector<std::string> instances; // their ids
	bool up = true;
};

struct Service {
	std::string name;
	config::ServiceConfig cfg; // as configured (the next upgrade starts from a re-read one)
	// The operator's instance count (Scale): every later upgrade, restart, rollback and start
	// runs this many, until a reload finds the config's "instances" changed.
	std::optional<unsigned> scaled;
	std::vector<const Listener *> sockets;
	std::vector<std::unique_ptr<Generation>> generations;
	Generation *current = nullptr;
	std::optional<config::ServiceConfig> previous; // what a rollback deploys
	std::uint64_t next_generation = 1;
	History history; // one record per generation: History, and what rollback --to deploys
	std::unique_ptr<Upgrade> upgrade;
	bool stopped = false;
	bool removing = false; // removed from the config: drained, then forgotten
	std::vector<Observer *> start_waiters;
	std::vector<Observer *> stop_waiters;
	std::vector<ScaleWaiter> scale_waiters;
	HandoffCounts handoff;                 // since the broker started
	std::uint64_t handoff_channels = 0;    // direct channels made (Peers), since then too
	usec_t handoff_reported = 0;           // CLOCK_MONOTONIC, of the last progress event
};

} // namespace brokerd
