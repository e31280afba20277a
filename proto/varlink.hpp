// Varlink framing over AF_UNIX stream sockets: NUL-terminated JSON plus SCM_RIGHTS fd passing.
#pragma once
#include "proto/limits.hpp"
#include "proto/names.hpp"
#include "proto/unique_fd.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

namespace proto::varlink {

using json = nlohmann::json;

// Standard errors of org.varlink.service (broker/control/org.varlink.service.varlink).
inline constexpr auto kInterfaceNotFound = names::service::kInterfaceNotFound;
inline constexpr auto kMethodNotFound = names::service::kMethodNotFound;
inline constexpr auto kMethodNotImplemented = names::service::kMethodNotImplemented;
inline constexpr auto kInvalidParameter = names::service::kInvalidParameter;
inline constexpr auto kPermissionDenied = names::service::kPermissionDenied;
inline constexpr auto kExpectedMore = names::service::kExpectedMore;

// One received message with exactly the fds its parameters reference, in index order.
struct Message {
	json body;
	std::vector<UniqueFd> fds;
};

// Whether an object or array that starts at a parser callback's `depth` (0 at the top level) is
// within limits::kMaxJsonDepth levels. Every recursive walk of parsed JSON is bounded by it. It is
// checked by the parser's own callback, never by a separate scan of the text, which would not see
// what the parser sees (a quote inside a comment of a config hid the nesting after it).
constexpr bool depth_allowed(int depth)
{
	return depth >= 0 && static_cast<std::size_t>(depth) < limits::kMaxJsonDepth;
}

// A message's JSON text, parsed, or a discarded value when it is not valid JSON or nests deeper
// than depth_allowed(); the parse stops at the first level too deep.
json parse(std::string_view text);

// Counts the fds a message references. By protocol rule (docs/protocol.md), an fd is referenced
// by an integer member named "fd" anywhere inside "parameters"; the indices used must be exactly
// 0..n-1, each once. Returns n, or -EBADMSG if the references are not of that form.
int count_fd_refs(const json &body);
// The same for a message's parameters alone.
int count_fd_refs_in(const json &parameters);

// A non-blocking Varlink stream. It never blocks and never logs: callers poll fd(), call
// receive() when readable and flush() when want_write(), and read errors as negative errno.
//
// Received fds are queued in arrival order and each message takes exactly as many as it
// references. MSG_CTRUNC, missing or surplus fds, a message over the size limit, or invalid JSON
// are protocol errors: every fd involved is closed and the stream is unusable afterwards.
// Received fds are marked UniqueFd::from_peer, so that wherever they are dropped, brokerd closes
// them off its event loop.
class Stream {
public:
	// max_queued_fds bounds the fds a peer may have in flight; 0 refuses any fd at all.
	explicit Stream(UniqueFd fd, std::size_t max_message = limits::kMaxMessageSize,
	                std::size_t max_queued_fds = limits::kMaxQueuedFds);

	int fd() const { return fd_.get(); }
	// The socket may hold fds in flight when it closes: see UniqueFd::from_peer.
	void fd_from_peer() { fd_ = UniqueFd::from_peer(fd_.release()); }
	// Once a peer may send fds (a worker after Hello, for handoff).
	void set_max_queued_fds(std::size_t n) { max_queued_fds_ = n; }
	// The largest message the peer may send (the constructor's max_message bounds both ways):
	// a server gives a peer that has no use for large messages a smaller one, and reads no
	// more than that ahead.
	void set_max_input(std::size_t n) { max_input_ = n; }
	// Bytes queued to the peer past which enqueue() fails with -ENOBUFS.
	void set_max_write_queue(std::size_t n) { max_write_queue_ = n; }
	// Tolerate fds the kernel could not install (the fd limit, MSG_CTRUNC): the message that
	// owned them comes out of next() with an empty UniqueFd in their place, instead of the
	// stream failing. For a receiver of handed-off connections, which refuses what it lacks.
	void allow_lost_fds() { allow_lost_fds_ = true; }

	// Reads once. Returns bytes read (> 0), 0 at end of stream, -EAGAIN when nothing is
	// available, or another negative errno (-EPROTO for MSG_CTRUNC or too many queued fds).
	int receive();

	// Takes the next complete message: 1 when `out` was filled, 0 when none is complete yet,
	// or a negative errno for a protocol error: -EMSGSIZE (too large), -EBADMSG (bad JSON, not
	// an object, or bad fd references), -EPROTO (fd count mismatch).
	int next(Message &out);

	// Queues a message; its fds travel with its first byte and are closed once sent.
	// Returns 0, -E2BIG for more than kMaxFdsPerMessage fds, -EMSGSIZE when too large,
	// -ENOBUFS when the write queue is over its limit, or -EBADMSG if fd references and
	// `fds` do not match.
	int enqueue(const json &body, std::vector<UniqueFd> fds = {});
	// A reply (make_reply's form), written without copying `parameters` into a message first:
	// events that carry a batch of connections are large.
	int enqueue_reply(const json &parameters, bool continues, std::vector<UniqueFd> fds = {});
	// The same with fds the caller keeps owning; they must stay open until flush() has sent
	// the message. For a sender that holds its copies until the peer acknowledges anyway.
	int enqueue_borrowed(const json &body, std::vector<int> fds);

	// Writes what it can. Returns 0 when everything is written, -EAGAIN when some remains,
	// or another negative errno (-EPIPE, -ECONNRESET, ...).
	int flush();

	bool want_write() const { return !out_.empty(); }
	// Queued messages with borrowed fds that are not written whole: the peer cannot have acted
	// on one, even if its first bytes (and so its fds) reached the peer's socket.
	std::size_t unsent_borrowed() const;
	std::size_t queued_bytes() const { return out_bytes_; }
	// Heap the buffers hold, for accounting (capacity, not just content).
	std::size_t buffer_bytes() const { return in_.capacity() + out_bytes_; }
	bool broken() const { return broken_; }

	// For brokerd's re-exec: the bytes received and not yet taken, and those queued and not
	// yet sent. False, with nothing taken, while fds are queued either way.
	bool save(std::string &in, std::string &out) const;
	void restore(std::string in, std::string out);

	// True when bytes of an incomplete message are buffered (used for idle checks).
	bool partial_input() const { return !in_.empty(); }
	// True when next() has a whole message to give without reading.
	bool message_ready() const { return in_.find('\0', scanned_) != std::string::npos; }

private:
	struct Outgoing {
		std::string data;
		std::size_t offset = 0;
		std::vector<UniqueFd> fds; // sent with the first byte, then closed
		std::vector<int> borrowed; // sent with the first byte, never closed here
		bool borrowing = false;    // had borrowed fds
	};

	int queue(const json &body, std::size_t nfds, Outgoing o);
	int queue_text(Outgoing o);

	UniqueFd fd_;
	std::size_t max_message_;
	std::size_t max_input_;
	std::size_t max_write_queue_ = limits::kMaxWriteQueue;
	std::size_t max_queued_fds_;
	std::string in_;
	std::size_t scanned_ = 0; // bytes of in_ known to hold no NUL
	std::deque<UniqueFd> in_fds_; // an empty one marks where a message's lost fds begin
	bool allow_lost_fds_ = false;
	std::deque<Outgoing> out_;
	std::size_t out_bytes_ = 0;
	bool broken_ = false;
};

// Helpers to build Varlink messages.
json make_call(std::string_view method, json parameters, bool more = false, bool oneway = false);
json make_reply(json parameters, bool continues = false);
json make_error(std::string_view error, json parameters = json::object());

} // namespace proto::varlink
