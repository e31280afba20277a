// The stop sentinel (issue 12): a small process, `brokerd --sentinel`, that ends what a brokerd
// left behind when the service manager stops the unit while no brokerd can drain it (brokerd
// hung and killed at the stop timeout, or dead and waiting for its automatic restart).
//
// With KillMode=process the service manager signals brokerd alone, so workers outlive a crash
// and the next brokerd carries on with them. The sentinel holds the read end of a pipe whose
// write ends are brokerd's and the fd store's ("sentinel"); it runs in a session of its own and
// ignores the stop signals. EOF on the pipe means that no write end is left: brokerd is gone and
// the service manager released its store, which it does only when the unit really stopped.
// Then the sentinel reads the crash state, and unless it says brokerd stopped cleanly, kills
// every process the state names, each only after checking its identity; never the cgroup, which
// a newly started brokerd may already share. A byte on the pipe means brokerd stops cleanly:
// the sentinel exits at once.
#pragma once

#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>

namespace brokerd {

// Where brokerd puts the sentinel's fds: the pipe's read end, and the crash state (read only).
inline constexpr int kSentinelPipeFd = 3;
inline constexpr int kSentinelStateFd = 4;
// The name of the pipe's write end in the fd store.
inline constexpr const char *kSentinelStoreName = "sentinel";

// `brokerd --sentinel`: waits, then ends what the crash state names unless told not to. The
// exit status.
int run_sentinel();

// SIGKILL to what a crash state's payload names, each process only while it is still the one
// named (pid and start time): each instance's main process and first process, and for a spawned
// one what is left of its session. Returns how many of the named processes got it.
int end_processes(const std::string &payload);

// brokerd's side: starts the sentinel, keeps its pipe's write end (and the fd store's copy), and
// starts another when the one before died while brokerd runs.
class SentinelKeeper {
public:
	struct Hooks {
		// Puts the write end into the fd store; whether the service manager got it.
		std::function<bool(int fd)> store;
		// FDSTOREREMOVE of the store's write end.
		std::function<void()> release;
	};
	SentinelKeeper(sd_event *event, int state_fd, Hooks hooks)
		: event_(event), state_fd_(state_fd), hooks_(std::move(hooks))
	{
	}
	SentinelKeeper(const SentinelKeeper &) = delete;
	SentinelKeeper &operator=(const SentinelKeeper &) = delete;

	// A new sentinel, its write end into the store. Not started if the store does not take it.
	void start();
	// The write end of a sentinel that runs already: from the store after a crash (pid 0: not our
	// child), or carried over a re-exec (our child still).
	void carry_on(proto::UniqueFd write_end, pid_t pid);
	// A clean stop: tells the sentinel so, waits (bounded) until it closed its end, and releases
	// the store's copy.
	void stop();

	int fd() const { return write_.get(); }
	pid_t pid() const { return pid_; }

private:
	bool spawn();
	bool reap_when_done(pid_t pid);
	void watch();
	static int on_error(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int on_exit(sd_event_source *s, const siginfo_t *si, void *userdata);

	sd_event *event_;
	int state_fd_;
	Hooks hooks_;
	proto::UniqueFd write_;
	pid_t pid_ = 0;           // our child, until reaped; 0 otherwise
	usec_t started_ = 0;      // CLOCK_MONOTONIC
	EventSource hangup_, child_, again_;
};

// Tells a sentinel whose write end this brokerd will not keep that brokerd stops cleanly.
void dismiss_sentinel(int write_end);

} // namespace brokerd
