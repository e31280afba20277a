// Rollout: batch by batch, new instances first, old ones drained only behind ready replacements.
#include "upgrade/rollout.hpp"

#include <algorithm>

namespace brokerd {

Rollout::Rollout(unsigned old_total, unsigned new_total, unsigned batch, bool all_at_once)
	: old_total_(old_total), new_total_(std::max(new_total, 1u)), batch_(std::max(batch, 1u)),
	  all_at_once_(all_at_once)
{
}

RolloutStep Rollout::begin()
{
	RolloutStep step;
	step.start_new = all_at_once_ ? new_total_ : std::min(batch_, new_total_);
	new_started_ = step.start_new;
	return step;
}

RolloutStep Rollout::advance()
{
	RolloutStep step;
	if (phase_ != RolloutPhase::Rolling)
		return step;
	// The batch in flight must be ready before anything older goes.
	if (new_ready_ < new_started_)
		return step;
	if (new_started_ < new_total_) {
		// Drain as many old as new became ready in this batch, then start the next batch.
		unsigned target = std::min(old_total_, new_ready_);
		step.drain_old = target - std::min(target, old_drained_);
		step.start_new = std::min(batch_, new_total_ - new_started_);
		new_started_ += step.start_new;
	} else {
		// Every new instance is ready: whatever old remains goes now.
		step.drain_old = old_total_ - old_drained_;
	}
	old_drained_ += step.drain_old;
	if (new_ready_ == new_total_ && old_exited_ == old_total_) {
		phase_ = RolloutPhase::Done;
		step.finished = true;
	}
	return step;
}

RolloutStep Rollout::new_ready()
{
	if (phase_ != RolloutPhase::Rolling || new_ready_ >= new_started_)
		return {};
	new_ready_++;
	return advance();
}

RolloutStep Rollout::old_exited()
{
	if (old_exited_ >= old_drained_)
		return {};
	old_exited_++;
	if (phase_ == RolloutPhase::Rolling)
		return advance();
	return {};
}

RolloutStep Rollout::old_lost()
{
	if (old_total_ <= old_drained_)
		return {};
	old_total_--;
	if (phase_ == RolloutPhase::Rolling)
		return advance();
	return {};
}

RolloutStep Rollout::fail(std::string reason)
{
	if (phase_ != RolloutPhase::Rolling)
		return {};
	phase_ = RolloutPhase::RollingBack;
	reason_ = std::move(reason);
	RolloutStep step;
	step.stop_new = true;
	// Every old instance drained so far is gone or going; replace each one.
	step.restore_old = old_drained_;
	restore_total_ = old_drained_;
	if (restore_total_ == 0) {
		phase_ = RolloutPhase::RolledBack;
		step.finished = true;
	}
	return step;
}

RolloutStep Rollout::restored_ready()
{
	if (phase_ != RolloutPhase::RollingBack || restored_ready_ >= restore_total_)
		return {};
	restored_ready_++;
	RolloutStep step;
	step.drain_replaced = true;
	if (restored_ready_ == restore_total_) {
		phase_ = RolloutPhase::RolledBack;
		step.finished = true;
	}
	return step;
}

} // namespace brokerd
