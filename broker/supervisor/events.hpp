// What the supervisor, the upgrade and the handoff router report, as types: events for Watch and
// an upgrade's progress, refusals of operator requests, and what a worker's Events stream carries.
// The domain names no wire format: only the control part's encoder (control/encode.cpp) turns
// these into Varlink JSON.
#pragma once

#include "config/diff.hpp"
#include "supervisor/model.hpp"
#include "upgrade/rollout.hpp"

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace brokerd {

enum class EventKind {
	// An instance's: for Watch, and for an upgrade's progress when it is one of the upgrade's.
	Started,
	Ready,
	Draining,
	Exited,
	Failed,
	CrashLoop,
	// A service's.
	Upgrade,    // an upgrade, rollback, restart or takeover began (Watch)
	Accepted,   // the first progress event of an upgrade's caller
	Rollback,   // the upgrade failed: the rollout turns back
	Done,       // the upgrade finished
	RolledBack, // the rollback finished
	Start,
	Stop,
	Handoff, // connections moved between generations: the counts so far
	// brokerd's own, for Watch (no service): the daemon sends them, not the supervisor.
	Reload,   // the config file was applied again: what changed
	Reexec,   // a re-executed brokerd carries on: its version and pid
	Shutdown, // brokerd begins to stop on SIGTERM or SIGINT
};

// Connections handed off so far, and how many the senders said they are about to hand.
struct HandoffTotals {
	HandoffCounts counts;
	std::uint64_t expected = 0;
};

// An upgrade as Status and every progress event show it.
struct UpgradeSnapshot {
	std::uint64_t generation = 0; // the new one
	std::uint64_t from = 0;       // 0: the service had none running
	RolloutPhase phase = RolloutPhase::Rolling;
	unsigned started = 0;
	unsigned ready = 0;
	unsigned drained = 0;
	unsigned total_new = 0;
	unsigned total_old = 0;
	HandoffTotals handoff;
};

// One event. Watch streams get every event with its time and, for an instance's, its state; an
// upgrade's observers get those of the upgrade, with the upgrade's snapshot.
struct Event {
	EventKind kind = EventKind::Started;
	usec_t time = 0; // CLOCK_REALTIME
	std::string service; // empty for brokerd's own
	// The instance's generation for an instance's event; for a service's, the upgrade's new one
	// or else the current one; none when the service has none.
	std::optional<std::uint64_t> generation;
	std::string instance; // empty for a service's event
	pid_t pid = 0;
	InstanceState state = InstanceState::Starting; // an instance's event only
	std::string message;
	std::optional<UpgradeSnapshot> upgrade; // while an upgrade runs, and in its Done
	std::optional<HandoffTotals> handoff;   // a Handoff event's counts
	// A service's event during an upgrade, and its Done and RolledBack: "upgrade", "rollback",
	// "restart" or "takeover"; empty otherwise.
	std::string upgrade_kind;
	// Done and RolledBack: how long the upgrade took (none for one a crash interrupted).
	std::optional<usec_t> duration;
	std::string version;                 // Reexec: the brokerd that carries on
	std::vector<config::Change> changes; // Reload: the changed settings
};

// A service as Status shows it: stopped by the operator, failed (an instance of its current
// generation failed for good), or running.
enum class ServiceState { Running, Failed, Stopped };
ServiceState service_state(const Service &svc);

// An upgrade's counts, and a service's handoff counts with what its senders still expect to hand.
UpgradeSnapshot snapshot(const Upgrade &up);
HandoffTotals handoff_totals(const Service &svc, const HandoffCounts &counts);

// Why an operator's request (or a registration) is refused, or how an awaited one ended.
struct Refusal {
	enum class Kind {
		PermissionDenied,
		InvalidConfig,
		UpgradeInProgress,
		NoUpgradeInProgress,
		NoPreviousGeneration,
		ServiceStopped,
		RegisteredService,
		UpgradeFailed,
		StartFailed,
	};
	Kind kind = Kind::PermissionDenied;
	std::string service;
	std::optional<std::uint64_t> generation;
	std::string message; // InvalidConfig's and PermissionDenied's text, when it has one
	std::string reason;  // UpgradeFailed's and StartFailed's
	// UpgradeFailed: the instance that failed, when one did, and its last lines of output.
	std::string instance;
	std::vector<std::string> output;

	// A refusal about a service (and the generation of the upgrade in the way).
	static Refusal of(Kind kind, std::string service = {}, std::optional<std::uint64_t> generation = std::nullopt)
	{
		Refusal r;
		r.kind = kind;
		r.service = std::move(service);
		r.generation = generation;
		return r;
	}
	static Refusal invalid_config(std::string message)
	{
		Refusal r = of(Kind::InvalidConfig);
		r.message = std::move(message);
		return r;
	}
	// StartFailed or UpgradeFailed, and why.
	static Refusal failure(Kind kind, std::string service, std::string reason,
	                       std::optional<std::uint64_t> generation = std::nullopt)
	{
		Refusal r = of(kind, std::move(service), generation);
		r.reason = std::move(reason);
		return r;
	}
};

// Whoever waits for an upgrade, a start or a stop: a control connection. progress() gets every
// step of an upgrade; finished() gets its last one (Done), or nothing for a start or a stop;
// failed() gets why it did not end well.
class Observer {
public:
	virtual void progress(const Event &event) = 0;
	virtual void finished(const Event *last) = 0;
	virtual void failed(const Refusal &why) = 0;

protected:
	~Observer() = default;
};

} // namespace brokerd
