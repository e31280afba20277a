// RAII for sd-event objects; sd-event handlers must not throw, so they wrap their bodies in guard().
#pragma once

#include <systemd/sd-event.h>

#include <cstdint>
#include <ctime>
#include <exception>
#include <memory>

namespace broker {

struct EventSourceUnref {
	void operator()(sd_event_source *s) const { sd_event_source_disable_unref(s); }
};
using EventSource = std::unique_ptr<sd_event_source, EventSourceUnref>;

inline std::uint64_t now_usec(clockid_t clock)
{
	timespec ts{};
	clock_gettime(clock, &ts);
	return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u + static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

} // namespace broker
