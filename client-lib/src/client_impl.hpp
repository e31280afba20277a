// broker::Client's state, shared by client.cpp (the calls) and link.cpp (losing brokerd and
// finding it again). Private to the library.
#pragma once

#include "broker/client.hpp"

#include "proto/handoff.hpp"
#include "proto/unique_fd.hpp"
#include "proto/varlink.hpp"

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace broker {

namespace detail {

using proto::varlink::json;

std::uint64_t now_usec();
// How long to wait before writing again when the kernel refuses more fds in flight.
inline constexpr std::uint64_t kFdPressureRetry = 10'000;
bool is_disconnect(int r);
[[noreturn]] void throw_closed();
// A member of a Hello reply, of the type asked, or Error(EBADMSG).
const json &member(const json &object, const char *key, json::value_t type);

} // namespace detail

// Hidden explicitly: a nested class would otherwise inherit Client's exported visibility.
struct __attribute__((visibility("hidden"))) Client::Impl {
	using json = proto::varlink::json;

	// Where the connection to brokerd stands. Lost is Waiting (fd() -1 until attempt_at) or
	// Hello (a new connection, its Hello not answered yet); Closed is Lost with reconnect off.
	enum class Phase { Connected, Waiting, Hello, Rejected, Closed };

	Impl() = default;
	Impl(const Impl &) = delete;
	Impl &operator=(const Impl &) = delete;
	~Impl()
	{
		*alive = false;
		flush_acks();
	}

	// Shared with a running process(), which must stop touching anything once a handler has
	// destroyed the Client (on_handoff_done may).
	std::shared_ptr<bool> alive = std::make_shared<bool>(true);
	bool in_process = false; // a disconnect seen while sending is reported by process(), at its end
	bool peer_gone = false;
	std::uint64_t retry_at = 0; // CLOCK_MONOTONIC usec: the kernel's fds-in-flight limit was hit

	bool brokered = false;
	std::string service;
	std::string instance;
	std::uint64_t generation = 0;
	std::vector<Listener> listeners;
	std::vector<proto::UniqueFd> owned; // fds received with Hello; inherited ones are not ours
	std::optional<proto::varlink::Stream> stream;
	std::function<void(const DrainRequest &)> on_drain;

	// The direct handoff channels (channel.cpp): each a SOCK_SEQPACKET end brokerd gave us, to
	// a receiver ("peers") or from a sender ("peer").
	struct Peer {
		proto::UniqueFd fd;
		std::string instance; // at the other end
		bool sending = false;  // ours to write connections on
		std::uint32_t watched = 0; // its events in the epoll set, 0 before it is added
		// Sending: the frames not acknowledged yet, by id, their connections still ours.
		std::map<std::uint64_t, std::vector<proto::handoff::Item>> unacked;
		std::size_t unacked_count = 0;
		bool blocked = false; // the socket is full: wait for POLLOUT
		bool unwritable = false; // a write failed: no more frames; its acks are read to the end
		std::uint64_t sent = 0, landed = 0, returned = 0; // not told to brokerd yet (Handed)
		// Receiving: acknowledgements the socket did not take yet, of frames whose connections
		// on_connection has.
		std::deque<std::string> acks;
		bool ended = false; // the other end closed, or broke the protocol
	};
	enum class Path { Unasked, Asked, Direct, Brokered };
	bool peer_handoff = false; // brokerd makes direct channels, and our Events said we speak them
	Path path = Path::Unasked; // of the connections queued in sender
	std::vector<std::unique_ptr<Peer>> peers;
	std::size_t rotation = 0; // the sending peer that gets the next frame
	std::uint64_t next_frame = 1;
	std::size_t window_fds = SIZE_MAX; // connections unacknowledged on all channels at once
	std::size_t unacked_out = 0;        // ... and how many are
	std::string frame_buffer;
	// Once a peer exists, fd() is this epoll set, holding the stream and every peer; it stays
	// for the Client's life, as a caller may hold its number. Mutable: events() keeps it current.
	proto::UniqueFd epoll;
	mutable int watched_stream = -1;
	mutable std::uint32_t watched_stream_events = 0;

	proto::handoff::Sender sender;
	proto::handoff::Receipts receipts; // what this instance received, for a brokerd that restarts
	HandoffSummary summary;
	std::function<void(int, std::string)> on_connection;
	std::function<void(int, std::string)> on_returned;
	std::function<void(const HandoffSummary &)> on_handoff_done;

	// The link (link.cpp).
	ClientOptions options;
	std::string socket_path;
	json hello;               // what a reconnect says: the first Hello, without asking for fds
	Phase phase = Phase::Connected;
	std::function<void(Link, const Error *)> on_link;
	bool said_ready = false;  // replayed on reconnect
	std::optional<std::string> last_status;
	std::uint64_t attempt_at = 0;     // Waiting: the next connect()
	std::uint64_t hello_deadline = 0; // Hello: give this connection up and try again
	unsigned failures = 0;            // attempts failed since the loss, for the backoff
	int last_fd = -1;                 // the number of the connection closed last
	std::minstd_rand jitter; // seeded per process in from_env(): no fd, no syscall beyond getpid()

	void send(std::string_view method, json parameters);
	void tell(std::string_view method, json parameters);
	void flush_now();
	int flush_or_defer();
	void dispatch(proto::varlink::Message &m);
	void pump();
	void connections_event(const json &params, std::vector<proto::UniqueFd> &fds);
	void handoff_event(const json &params);
	void give_back(std::vector<proto::handoff::Item> items);
	void check_done(std::size_t pending_before);
	std::size_t pending() const;

	// The direct channels (channel.cpp).
	void peers_event(const json &params, std::vector<proto::UniqueFd> &fds);
	void peer_event(const json &params, std::vector<proto::UniqueFd> &fds);
	Peer *add_peer(proto::UniqueFd fd, std::string instance, bool sending);
	// Once, when connections first come (a channel, or brokerd's connections event).
	void grow_fd_table(int any_fd);
	bool fd_table_grown = false;
	void pump_direct();
	bool serve_peers();
	bool read_acks(Peer &p, std::vector<proto::handoff::Item> &back);
	// A frame read from a sender: its id, a slot per connection (empty where its fd did not
	// arrive), their states.
	struct Frame {
		std::uint64_t id = 0;
		std::vector<proto::UniqueFd> fds;
		std::vector<std::string> states;
	};
	bool read_frame(Peer &p, Frame &f);
	void take_frame(Peer &p, Frame &frame, std::exception_ptr &failure);
	void write_acks(Peer &p);
	void lose_peer(Peer &p, std::vector<proto::handoff::Item> &back);
	void report_handed();
	void prune_peers();
	void unwatch_stream();
	void flush_acks() noexcept;
	void watch() const;
	// Each fd the library itself holds open: its connection to brokerd, the epoll set fd() is,
	// every channel, and the sockets Hello gave it.
	template <typename F>
	void own_fds(F &&f) const
	{
		if (stream)
			f(stream->fd());
		f(epoll.get());
		for (const auto &p : peers)
			f(p->fd.get());
		for (const auto &fd : owned)
			f(fd.get());
	}
	bool process_stream();
	json events_parameters(const json &hello_reply);

	Link link() const noexcept;
	void disconnected(const Error &error);
	bool attempt();
	void retry_later();
	void close_stream();
	std::uint64_t backoff(unsigned n);
	void hello_reply(const proto::varlink::Message &m);
	void remember_token(const json &params);
	[[noreturn]] void reject(const Error &error);
};

} // namespace broker
