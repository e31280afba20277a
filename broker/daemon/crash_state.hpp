// The crash state kept up to date: what a brokerd started after a SIGKILL of this one will read
// (daemon/persist.*). Marked changed on every change of the supervisor, the config or the
// listeners, and written once per turn of the loop in which something changed: never while
// brokerd is idle, never twice the same.
#pragma once

#include "daemon/persist.hpp"
#include "os/event.hpp"

#include <cstdint>
#include <functional>
#include <string>

namespace brokerd {

class CrashState {
public:
	// What to write: the state as it is now, as text.
	using Snapshot = std::function<std::string()>;

	CrashState(sd_event *event, persist::StateFile file, Snapshot snapshot);
	CrashState(const CrashState &) = delete;
	CrashState &operator=(const CrashState &) = delete;

	// Something changed: the state is written at the end of this turn of the loop.
	void changed();
	// Something changed that may wait a little (a worker's last lines of output, which come in
	// bursts): written within kSoonUsec, once for all that came meanwhile.
	void changed_soon();
	static constexpr std::uint64_t kSoonUsec = 100'000;
	// Writes now, if anything changed since the last write.
	void write();
	// The last write, at a clean stop: `text` in place of the snapshot, and no more after it.
	void write_last(const std::string &text);

	int fd() const { return file_.fd(); }
	// How many times it was written (the newest slot's seq).
	std::uint64_t writes() const { return file_.seq(); }

private:
	static int on_turn(sd_event_source *s, void *userdata);
	static int on_soon(sd_event_source *s, std::uint64_t usec, void *userdata);

	sd_event *event_;
	persist::StateFile file_;
	Snapshot snapshot_;
	EventSource turn_;
	EventSource soon_; // armed while a changed_soon() waits
	std::string last_;
	bool failing_ = false; // a write failed: said once, and again once one succeeds
};

} // namespace brokerd
