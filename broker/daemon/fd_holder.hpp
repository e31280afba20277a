// The fd holder (issue 12): without a service manager, `brokerd --fd-holder` keeps what brokerd
// would keep in systemd's fd store, so that a brokerd started again by hand after a SIGKILL
// carries on with the same workers, listeners and pipes, as one systemd restarts does.
//
// brokerd starts it when it runs without NOTIFY_SOCKET and finds none: the same binary, in a
// session of its own, listening on `<control.path>.fdstore` (mode 0600), beside the control
// socket, so that the same config finds the same holder and two configs never share one.
// brokerd speaks to it over a SOCK_SEQPACKET connection exactly as it speaks to systemd's notify
// socket (SystemdNotifier: FDSTORE=1, FDNAME=, FDPOLL=0, FDSTOREREMOVE=1; READY=1, STATUS= and
// the rest are ignored), and the holder keeps the fds by systemd's rules: several may share a
// name, FDSTOREREMOVE=1 drops every fd of its name, an fd that is the same file as one kept is
// dropped as a duplicate, and one that hangs up (POLLHUP, POLLERR) is dropped unless it came with
// FDPOLL=0; at most kFdHolderMax fds. Two more verbs are the holder's own: FDGET=1 (every fd it
// keeps, one message each, "FDNAME=<name>" with one fd, then "FDEND=<count>") and STOP=1 (it
// closes every fd, removes its socket file and exits: a clean stop of brokerd).
//
// One brokerd at a time: the connection that is not turned away is the owner until it closes (its
// brokerd died, or stopped). A second one while the owner's process lives gets "BUSY=1\nPID=<pid>";
// a peer whose uid is neither root nor the holder's own gets "DENIED=1"; both are closed at once.
#pragma once

#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace brokerd {

// As FileDescriptorStoreMax= in packaging/brokerd.service.in.
inline constexpr std::size_t kFdHolderMax = 4096;
// Where brokerd puts the holder's fds: its listening socket, and brokerd's end of a connection
// that is the holder's first owner (so that nothing brokerd sends waits on an accept).
inline constexpr int kHolderListenFd = 3;
inline constexpr int kHolderOwnerFd = 4;

// The holder's socket for a control socket: "<control.path>.fdstore" ("@name.fdstore" for an
// abstract one).
std::string fd_holder_path(const std::string &control_path);

// `brokerd --fd-holder PATH`: keeps fds until told to stop, or until SIGTERM. The exit status.
int run_fd_holder(const std::string &path);

// brokerd's side: finds the holder or starts one, watches it, and stops it at a clean stop.
class FdHolderLink {
public:
	struct Fetched {
		std::string name;
		proto::UniqueFd fd;
		bool poll = true;
	};

	explicit FdHolderLink(std::string path) : path_(std::move(path)) {}
	// Stops a holder this brokerd started if brokerd never got as far as its loop (a start that
	// failed): nothing of it is anyone's to carry on with.
	~FdHolderLink();
	FdHolderLink(const FdHolderLink &) = delete;
	FdHolderLink &operator=(const FdHolderLink &) = delete;

	// The holder at path(): what it keeps goes to `fetched`, in the order it was stored. When
	// none listens there (no file, or a stale one, which is removed), a new one with nothing in
	// it. Returns the connection to send to; none when path() is too long for a unix socket
	// (logged). Throws, with why, when the path is no socket or belongs to another user, when
	// another brokerd owns the holder, or when it cannot start one.
	proto::UniqueFd open(std::vector<Fetched> &fetched);
	// A new holder, after the one before is gone; its connection, or none (logged).
	proto::UniqueFd start();
	// `lost` runs (once) when the holder's process exits; reaped when it was our child.
	void watch(sd_event *event, std::function<void()> lost);
	// brokerd's loop runs: from now on the holder is left running if brokerd fails.
	void running() { stop_unused_ = false; }
	// A clean stop: STOP=1, then waits (bounded) until it exited.
	void stop();

	const std::string &path() const { return path_; }
	pid_t pid() const { return pid_; }
	bool child() const { return child_; }
	int connection() const { return conn_.get(); }
	// After a re-exec: the holder the brokerd before used, and its connection (the notifier's).
	void carry_on(int connection, pid_t pid, bool child);

private:
	proto::UniqueFd spawn();
	proto::UniqueFd ask(proto::UniqueFd fd, std::vector<Fetched> &fetched);
	static int on_exit(sd_event_source *s, const siginfo_t *si, void *userdata);
	static int on_pidfd(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	void gone();

	std::string path_;
	proto::UniqueFd conn_; // a dup of the notifier's connection, for STOP=1
	proto::UniqueFd pidfd_;
	pid_t pid_ = 0;
	bool child_ = false;  // started by this process: reaped by it
	bool stop_unused_ = false;
	sd_event *event_ = nullptr;
	std::function<void()> lost_;
	EventSource source_;
};

} // namespace brokerd
