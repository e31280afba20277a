// Rollout: the upgrade state machine, free of processes and time so it can be tested as a table.
#pragma once

#include <string>

namespace brokerd {

enum class RolloutPhase {
	Rolling,     // starting new instances batch by batch, draining old ones behind them
	RollingBack, // a new instance failed: new ones stop, old capacity is restored
	Done,        // every new instance ready and every old one drained and exited
	RolledBack,  // the old generation serves at full capacity again
};

// What the supervisor must do after an event. Counts, not instances: the supervisor picks which.
struct RolloutStep {
	unsigned start_new = 0;   // spawn this many instances of the new generation
	unsigned drain_old = 0;   // drain this many serving instances of the old generation
	bool stop_new = false;    // drain every instance of the new generation
	unsigned restore_old = 0; // spawn this many old-generation instances to refill its capacity
	bool drain_replaced = false; // a restored old instance is ready: drain one serving new one
	bool finished = false;    // phase() is now Done or RolledBack

	bool operator==(const RolloutStep &) const = default;
};

// Default: start `batch` new instances, wait until all of them are ready, drain `batch` old ones
// and start the next batch, until every new instance is ready and every old one has exited.
// With all_at_once, every new instance is ready before any old one drains. Old instances are
// drained only behind ready new ones, so capacity never falls below the old total.
class Rollout {
public:
	Rollout(unsigned old_total, unsigned new_total, unsigned batch, bool all_at_once);

	RolloutStep begin();
	RolloutStep new_ready();
	// A new instance exited or missed its start timeout; also the operator's abort.
	RolloutStep fail(std::string reason);
	// An old instance this rollout drained has exited.
	RolloutStep old_exited();
	// An old instance it had not drained is gone for good (a registered worker that exited): one
	// fewer to drain and wait for.
	RolloutStep old_lost();
	// During a rollback, an old instance started to restore capacity is ready.
	RolloutStep restored_ready();

	RolloutPhase phase() const { return phase_; }
	bool active() const { return phase_ == RolloutPhase::Rolling || phase_ == RolloutPhase::RollingBack; }
	const std::string &reason() const { return reason_; }

	unsigned old_total() const { return old_total_; }
	unsigned new_total() const { return new_total_; }
	unsigned new_started() const { return new_started_; }
	unsigned new_ready_count() const { return new_ready_; }
	unsigned old_drained() const { return old_drained_; }
	unsigned old_exited_count() const { return old_exited_; }
	unsigned restore_pending() const { return restore_total_ - restored_ready_; }

private:
	RolloutStep advance();

	unsigned old_total_;
	unsigned new_total_;
	unsigned batch_;
	bool all_at_once_;
	RolloutPhase phase_ = RolloutPhase::Rolling;
	std::string reason_;
	unsigned new_started_ = 0;
	unsigned new_ready_ = 0;
	unsigned old_drained_ = 0;
	unsigned old_exited_ = 0;
	unsigned restore_total_ = 0;
	unsigned restored_ready_ = 0;
};

} // namespace brokerd
