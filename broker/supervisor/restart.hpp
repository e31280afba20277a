// Restart backoff and the crash-loop rule of one instance slot, free of processes and the clock
// so that it can be tested as a table. Times are CLOCK_MONOTONIC.
#pragma once

#include "os/time.hpp"

#include <cstddef>
#include <cstdint>
#include <deque>

namespace brokerd {

struct RestartBackoff {
	static constexpr usec_t kMinDelay = 100'000;     // the first restart's; doubled for each next one
	static constexpr usec_t kMaxDelay = 30'000'000;
	static constexpr usec_t kWindow = 60'000'000;    // of failures that need no start timeout
	static constexpr std::size_t kBurst = 5;         // failures within the window: one more is a loop
	static constexpr usec_t kStableRun = 10'000'000; // ready this long resets the backoff

	// The crash-loop window of a slot whose every attempt may take `start_timeout` (0: none) to
	// fail. A worker that never gets ready fails once per start timeout, so the window grows by
	// kBurst of them: it is stopped like one that crashes at once, whatever its start timeout.
	static usec_t window(usec_t start_timeout);

	struct Decision {
		bool crash_loop = false;  // stop restarting
		std::size_t failures = 0; // within the window, this one included
		usec_t window = 0;
		usec_t delay = 0;  // until the restart, unless crash_loop
	};

	void ready(usec_t now) { ready_since = now; }
	// A failure at `now` of an attempt that had `start_timeout` (0: none) to get ready.
	Decision failed(usec_t now, usec_t start_timeout);
	// Whether the slot failed since brokerd started (or took the slot over by re-exec).
	bool has_failed() const { return !crash_times.empty(); }

	// Carried across a re-exec (Supervisor::save_state).
	unsigned restarts = 0;                 // consecutive, for the backoff
	std::deque<usec_t> crash_times; // recent failures
	usec_t ready_since = 0;         // 0: not ready since the last failure
};

} // namespace brokerd
