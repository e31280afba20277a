// libbroker-client: the C++ worker API. A worker gets its listening sockets, reports readiness
// and is told when to drain, whether it runs under brokerd or plain systemd socket activation.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>
#if __cplusplus >= 202002L
#include <span>
#endif

#define BROKER_EXPORT __attribute__((visibility("default")))

namespace broker {

// Every failure of the library: errno (positive) and, for errors the broker sent, the Varlink
// error name (for example "org.varlink.service.PermissionDenied").
class BROKER_EXPORT Error : public std::runtime_error {
public:
	Error(int errnum, const std::string &what, std::string varlink_error = {});
	int code() const noexcept { return errnum_; }
	const std::string &varlink_error() const noexcept { return varlink_error_; }

private:
	int errnum_;
	std::string varlink_error_;
};

// A listening socket handed to this worker. The fd stays valid for the Client's lifetime; sockets
// inherited at fd 3 and up belong to the process and the Client never closes them.
struct Listener {
	std::string name;
	int fd;
};

// Sent once when the broker wants this instance to stop: stop accepting, finish in-flight work,
// and exit before the deadline. SIGKILL follows the deadline.
struct DrainRequest {
	std::chrono::steady_clock::time_point deadline;
};

// An established connection on its way from a draining instance to its successor: the socket,
// and whatever the worker needs to carry on with it (a partly read request, protocol state, a
// session id). The library copies the state; it may be empty.
struct Connection {
	int fd;
	std::string_view state;
};

// Where the connections given to handoff() went, counted since the Client was made.
struct HandoffSummary {
	std::size_t handed = 0;   // given to handoff()
	std::size_t landed = 0;   // taken by an instance of the successor generation
	std::size_t returned = 0; // given back through on_returned(): nobody could take them
	// In flight when the broker went away, and closed by the library, as a successor may already
	// serve them: all of them without reconnect or once Rejected; with reconnect, only those the
	// restarted brokerd could not place (a receiver that may have them never spoke again).
	std::size_t abandoned = 0;
};

// The state of the connection to brokerd (see Client::on_link()).
enum class Link {
	Connected, // brokerd knows this instance (always, under plain systemd: nothing to lose)
	Lost,      // brokerd went away: keep serving; the library says Hello again with backoff
	Rejected,  // a brokerd answered, but refused this instance: drain, it will never tell you to
};

// Built by the caller: later versions add members at the end, with defaults. The library knows
// a program built before reconnect existed by the symbol it calls, not by this struct's size.
struct __attribute__((abi_tag("reconnect"))) ClientOptions {
	// Tell the broker (in Hello) that this instance takes connections handed off by its
	// predecessors; they arrive through on_connection().
	bool accept_handoff = false;
	// When brokerd goes away (crashed, killed, restarted), say Hello again with the same token
	// until one answers. Off: the loss ends the link, and process() throws Error(ECONNRESET).
	bool reconnect = true;
	// The wait before attempt n (0 first) is min·2^n capped at max, jittered: a random time
	// between half and all of it, so that a host's workers do not all knock at once.
	std::chrono::milliseconds reconnect_min{50};
	std::chrono::milliseconds reconnect_max{2000};
};

class BROKER_EXPORT Client {
public:
	// The largest state one handed-off connection may carry.
	static constexpr std::size_t kMaxHandoffState = 16384;

	// Connects to brokerd with BROKER_SOCKET and BROKER_TOKEN and says Hello. Without them it
	// falls back to LISTEN_FDS/LISTEN_FDNAMES (plain systemd). A worker spawned by brokerd
	// already holds its sockets at fd 3 and up, and the Client uses those without duplicating
	// them; a worker registered from elsewhere receives them with Hello.
	// Throws Error when neither is present, or when the broker refuses.
	static Client from_env();
	static Client from_env(const ClientOptions &options);

	Client(Client &&) noexcept;
	Client &operator=(Client &&) noexcept;
	~Client();

	// True when connected to brokerd, false under plain socket activation.
	bool brokered() const noexcept;
	const std::string &service() const noexcept;    // empty under plain systemd
	const std::string &instance() const noexcept;   // e.g. "web/3/1"
	std::uint64_t generation() const noexcept;      // 0 under plain systemd

	// The socket named `name` (throws Error with ENOENT if there is none), or all of them in
	// the order the service configured.
	int listener(std::string_view name) const;
	const std::vector<Listener> &listeners() const noexcept;

	// Tells the broker this instance is serving. Under plain systemd this is READY=1 to
	// NOTIFY_SOCKET when it is set. Never blocks. While the link is Lost, both are remembered
	// and sent on reconnect; once it is Rejected, both fail with ENOTCONN.
	void ready();
	// A one-line status shown by `brokerctl status` (STATUS= under plain systemd): at most 512
	// bytes of valid UTF-8 without control characters, or Error with EMSGSIZE or EINVAL.
	void status(std::string_view text);

	// Event-loop integration, in the sd-bus style: poll fd() for events(), wake up by
	// timeout() at the latest (CLOCK_MONOTONIC, in microseconds; UINT64_MAX for none), then call
	// process(). process() never blocks; it returns true when it did something, so callers
	// may loop until it returns false. fd() is -1 under plain systemd. An exception from a
	// handler leaves process() after the rest of that message's work is done; messages read
	// after it wait for the next call, which timeout() asks for at once.
	// fd() and events() may change after any call: while the link is Lost, fd() is -1 and
	// timeout() is the next attempt to reconnect, which process() makes with a non-blocking
	// connect(). A new connection never has the number of the one before it, so re-registering
	// whenever fd() changes is enough. With a brokerd that makes direct handoff channels (its
	// Hello says so), fd() is instead an epoll fd of the library's, holding the connection and
	// every channel, and events() is POLLIN: made with the Client or at the reconnect that
	// found such a brokerd, it stays the same from then on, Lost included.
	int fd() const noexcept;
	short events() const noexcept;
	std::uint64_t timeout() const noexcept;
	bool process();

	// Called from process() when the broker asks this instance to drain. The handler must not
	// destroy the Client. It may be called again after a reconnect: a brokerd that restarted
	// while this instance drained sends the drain again, with the time that remains; the later
	// call's deadline is the one that holds.
	void on_drain(std::function<void(const DrainRequest &)> handler);

	// The connection to brokerd. On Lost (with ClientOptions::reconnect), the worker keeps its
	// listeners and keeps serving: the library says Hello again with the same token, and once
	// a brokerd accepts it, subscribes to events again, repeats Ready (if ready() was called)
	// and the last status(), and reports Connected. Handoffs in flight at the loss stay pending:
	// the library tells the new brokerd about them (and about the connections it received), and
	// it answers as for any batch, which landed and which came back, within about 10 s; see
	// HandoffSummary::abandoned for the exception. handoff() fails with ENOTCONN until Connected. ready() and
	// status() while Lost are remembered and sent on reconnect.
	// Rejected is final: a brokerd answered the new Hello with an error (InvalidToken,
	// PermissionDenied, ...) or knows this worker as another instance. No more attempts; the
	// worker should drain and exit, as nothing will ever ask it to. process() then throws that
	// error, as it throws Error(ECONNRESET) on a loss with reconnect off, after the handler.
	Link link() const noexcept;
	// Called from process() on every change of link(), with why for Lost and Rejected (null for
	// Connected). The handler must not destroy the Client.
	void on_link(std::function<void(Link, const Error *)> handler);

	// Hands established connections to the successor generation, for example on drain. The
	// library owns every fd from now on: it sends them in batches from process(), closes each
	// one once an instance of the successor has taken it, and gives back through on_returned()
	// those nobody could take (no successor accepts handoffs, or the receiver died). If the
	// broker goes away, process() gives back those never sent; those in flight wait for the
	// broker's return (see link()), or close without reconnect.
	// Nothing is taken if it throws: Error with EMSGSIZE for a state over kMaxHandoffState,
	// EBADF for an fd that is not open, EINVAL for an fd listed twice, one of the library's own
	// (fd(), a channel), one handed off before and not settled yet, or one the kernel will not
	// pass to another process (io_uring's); ENOTCONN under plain systemd, where there is no
	// successor, or while link() is not Connected.
	// Stop reading a connection before handing it: bytes not yet read stay in the socket for
	// the successor, and bytes already read belong in its state.
	void handoff(const Connection *connections, std::size_t count);
#if __cplusplus >= 202002L
	void handoff(std::span<const Connection> connections) { handoff(connections.data(), connections.size()); }
#endif
	// Connections given to handoff() and not yet landed or returned.
	std::size_t handoff_pending() const noexcept;
	const HandoffSummary &handoff_summary() const noexcept;

	// A connection handed to this instance (it said accept_handoff): the handler owns fd, a
	// connected socket as accept4() would return it (CLOEXEC, and blocking or not as its sender
	// had it), and state is what the sender attached. Without a handler, connections are
	// refused and go back to their sender. The sender's copy of the socket stays open a little
	// longer, so close() alone does not take the fd out of an epoll set: EPOLL_CTL_DEL first.
	// The library acknowledges connections once the handler has them (a process that dies
	// before that leaves them with their sender), so a handler that keeps them and does its
	// slower work (epoll_ctl, reading) after process() returns lets the sender go sooner.
	void on_connection(std::function<void(int fd, std::string state)> handler);
	// A handed-off connection that nobody took: the handler owns fd again. Without a handler
	// the library closes it. Neither handler may destroy the Client.
	void on_returned(std::function<void(int fd, std::string state)> handler);
	// Called once handoff_pending() drops to 0. Unlike the other handlers, it may destroy the
	// Client (its work done, the worker exits).
	void on_handoff_done(std::function<void(const HandoffSummary &)> handler);

private:
	struct Impl;
	explicit Client(std::unique_ptr<Impl> impl);
	std::unique_ptr<Impl> impl_;
};

} // namespace broker
