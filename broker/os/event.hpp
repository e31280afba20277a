// RAII for sd-event objects, and guarded(): sd-event handlers must not throw.
#pragma once

#include "os/log.hpp"
#include "os/time.hpp"

#include <systemd/sd-event.h>

#include <cstdint>
#include <ctime>
#include <exception>
#include <memory>
#include <string>

namespace brokerd {

struct EventSourceUnref {
	void operator()(sd_event_source *s) const { sd_event_source_disable_unref(s); }
};
using EventSource = std::unique_ptr<sd_event_source, EventSourceUnref>;

// sd-event handlers must not throw: whatever escapes one is logged, and the loop goes on.
template <typename F>
int guarded(const char *where, F &&body) noexcept
{
	try {
		return body();
	} catch (const std::exception &e) {
		log::error(std::string(where) + ": " + e.what() + ", ignoring");
	} catch (...) {
		log::error(std::string(where) + ": unknown exception, ignoring");
	}
	return 0;
}

} // namespace brokerd
