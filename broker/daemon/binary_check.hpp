// brokerctl reexec: whether a binary can carry on from this brokerd (`binary --check-state`),
// asked off the event loop.
#pragma once

#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>

namespace brokerd {

// Runs `binary --check-state` on the very state it would get (`state_fd`, read from its stdin),
// and checks that it reads it: a binary that does not run, reads another format or rejects the
// config is refused. The loop goes on meanwhile: the check's output and exit are watched from
// it, and at `bound` the check is killed.
class BinaryCheck {
public:
	// The verdict: empty when the binary reads this brokerd's state, else why not. Called once,
	// from the loop, as the check's last act: the callee may destroy the BinaryCheck.
	using Done = std::function<void(const std::string &error)>;

	// Starts the check. Throws std::runtime_error when it cannot (a binary that is missing or
	// not executable, no pipe, no fork).
	BinaryCheck(sd_event *event, std::string binary, int state_fd, usec_t bound, Done done);
	// A check still running is killed and reaped; `done` is not called.
	~BinaryCheck();
	BinaryCheck(const BinaryCheck &) = delete;
	BinaryCheck &operator=(const BinaryCheck &) = delete;

	pid_t pid() const { return pid_; }

private:
	static int on_output(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int on_exit(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int on_deadline(sd_event_source *s, std::uint64_t usec, void *userdata);
	void read_output();
	void reap(bool wait);
	void kill_and_reap();
	void maybe_finish();
	std::string verdict() const;

	std::string binary_;
	pid_t pid_ = -1;
	bool exited_ = false;      // reaped: status_ holds its wait status
	bool output_done_ = false; // it closed its output, or printed too much
	int status_ = 0;
	std::string out_;
	proto::UniqueFd output_fd_, pidfd_;
	EventSource output_, exit_, deadline_;
	Done done_;
};

} // namespace brokerd
