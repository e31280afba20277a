// Restart backoff and the crash-loop rule: when a failed instance slot restarts, and when it stops.
#include "supervisor/restart.hpp"

#include <algorithm>

namespace brokerd {

usec_t RestartBackoff::window(usec_t start_timeout)
{
	return kWindow + kBurst * start_timeout;
}

RestartBackoff::Decision RestartBackoff::failed(usec_t now, usec_t start_timeout)
{
	Decision d;
	d.window = window(start_timeout);
	if (ready_since && now - ready_since >= kStableRun)
		restarts = 0;
	ready_since = 0;
	crash_times.push_back(now);
	while (!crash_times.empty() && now - crash_times.front() > d.window)
		crash_times.pop_front();
	d.failures = crash_times.size();
	if (d.failures > kBurst) {
		d.crash_loop = true;
		return d;
	}
	d.delay = std::min(kMinDelay << std::min(restarts, 16u), kMaxDelay);
	restarts++;
	return d;
}

} // namespace brokerd
