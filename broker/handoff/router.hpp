// HandoffRouter: moves established connections from a draining worker to its successors, and
// accounts for every one of them until it has landed or gone back to its sender.
#pragma once

#include "os/time.hpp"
#include "proto/unique_fd.hpp"

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <sys/types.h>

namespace brokerd {

// One connection of a Handoff call: the broker's copy of its fd, and its state as sent
// (base64, checked by the caller).
struct HandoffItem {
	proto::UniqueFd fd;
	std::string state;
};

// Where a chunk's connections come from, named as a receiver remembers them across a restart of
// brokerd (HandoffDoubts): the sending instance and its process, the sender's batch id, and the
// index in that batch of the chunk's first connection (the others follow in order).
struct HandoffOrigin {
	std::string instance;
	pid_t pid = 0;
	std::uint64_t batch = 0;
	std::uint64_t first = 0;
};

// A batch's outcome for its sender: how many landed, and by index into its call, which came back
// (the sender holds them) and which were abandoned (the sender closes them: after a restart of
// brokerd, nobody could tell whether a receiver has them). why says why all came back.
struct HandoffResult {
	std::uint64_t batch = 0;
	std::size_t landed = 0;
	std::vector<std::uint64_t> returned;
	std::vector<std::uint64_t> abandoned;
	std::string why;
};

// One end of a direct handoff channel (Worker.Peers), and the instance at the other end.
struct HandoffPeer {
	std::string instance;
	pid_t pid = 0;
	proto::UniqueFd end;
};

// Where a worker's events go: the control connection that holds its Events stream, which puts
// them on the wire (control/encode.cpp). Each returns false when the connection is gone (it may
// have closed, and told its owners so, from inside the call).
class EventSink {
public:
	// Stop accepting, finish, and exit within timeout.
	virtual bool send_drain(usec_t timeout) = 0;
	// A chunk of connections for a receiver; their fds travel with the event and are closed
	// once sent.
	virtual bool send_connections(std::uint64_t batch, std::vector<HandoffItem> items, const HandoffOrigin &origin) = 0;
	// A batch's result for its sender.
	virtual bool send_handoff_result(const HandoffResult &result) = 0;
	// Direct channels: a sender's, one per receiver (none: it uses Handoff), and a receiver's
	// one from a sender. Their ends close once sent. Only a worker's Events stream has them.
	virtual bool send_peers(std::vector<HandoffPeer> peers)
	{
		(void)peers;
		return false;
	}
	virtual bool send_peer(HandoffPeer peer)
	{
		(void)peer;
		return false;
	}
	// Its process has exited: read and handle what it wrote before, which is all there is.
	virtual void read_rest() {}

protected:
	~EventSink() = default;
};

// A sender's Handoff call is a batch. The router splits it into one chunk per receiver, sends
// each chunk as a "connections" event, and closes its own copies once sent: it holds fds only
// while they wait in a receiver's write queue. The sender keeps its copies until the batch's
// "handoff" event tells it which landed (those it closes) and which came back (those it still
// owns). A chunk whose receiver goes away before acknowledging counts as returned: the sender
// holds every connection that was not acknowledged, so none is lost and none is doubled.
class HandoffRouter {
public:
	static constexpr std::size_t kMaxBatchesInFlight = 16; // per sender
	// Bytes of "connections" events a receiver may have unacknowledged; more wait here, with
	// their fds, until it acknowledges. Half of a connection's write queue, so that a busy
	// receiver is slowed down, never disconnected.
	static constexpr std::size_t kMaxUnackedBytes = 4u << 20;

	// Every resolution, for the counters: landed connections went from sender to receiver;
	// returned ones went back to sender (receiver is null when none was tried). sender is null
	// when its connection has gone.
	struct Report {
		std::string service;
		EventSink *sender = nullptr;
		EventSink *receiver = nullptr;
		std::size_t landed = 0;
		std::size_t returned = 0;
	};
	std::function<void(const Report &)> on_report;

	// A Handoff call from sender, an instance whose process is named by who (its instance and
	// pid; batch and first are filled in here). receivers are the instances that may take
	// connections, in a stable order; an empty list returns everything at once. Too many
	// batches in flight, or a batch id in use, return everything with a message saying so.
	void submit(const std::string &service, EventSink &sender, std::uint64_t batch, std::vector<HandoffItem> items,
	            std::span<EventSink *const> receivers, const HandoffOrigin &who = {});

	// A Received call from receiver. Returns an error message for an unknown batch or an
	// invalid index; nothing changes then.
	std::optional<std::string> received(EventSink &receiver, std::uint64_t forward,
	                                    const std::vector<std::uint64_t> &refused);

	// The connection behind sink has gone: its unacknowledged chunks return to their senders,
	// and results for its own batches are dropped.
	void forget(EventSink &sink);

	std::size_t batches_in_flight(const EventSink &sender) const;
	std::size_t batches_in_flight() const { return batches_.size(); }
	std::size_t chunks_in_flight() const { return forwards_.size(); }
	// Chunks waiting for room at their receiver, and the fds they hold.
	std::size_t chunks_held() const;

private:
	struct Batch {
		std::string service;
		EventSink *sender = nullptr;
		std::uint64_t id = 0;       // the sender's
		std::size_t outstanding = 0; // chunks not yet resolved
		std::size_t landed = 0;
		std::vector<std::uint64_t> returned; // indices into the sender's call
		HandoffOrigin origin;                // batch and first are set per chunk
	};
	struct Forward {
		std::uint64_t batch = 0; // key in batches_
		EventSink *receiver = nullptr;
		std::vector<std::uint64_t> indices; // into the sender's call, in chunk order
		std::vector<HandoffItem> items;     // until sent: held for want of room
		std::size_t bytes = 0;              // the event's size, roughly
		bool sent = false;
	};
	struct Receiver {
		std::size_t unacked_bytes = 0;
		std::deque<std::uint64_t> held; // forward ids, in order
	};

	void reject(const std::string &service, EventSink &sender, std::uint64_t batch, std::size_t count,
	            const std::string &why);
	void resolve(std::uint64_t forward);
	void settle(std::uint64_t key);
	void send(std::uint64_t forward);
	void send_held(EventSink *receiver);
	void finished(const Forward &f);

	std::map<std::uint64_t, Batch> batches_;   // by our own key
	std::map<std::uint64_t, Forward> forwards_; // by forward id, the receiver's batch id
	std::map<EventSink *, Receiver> receivers_;
	std::uint64_t next_key_ = 1;
	std::uint64_t next_forward_ = 1;
	std::size_t rotation_ = 0; // which receiver gets the first chunk next, for evenness
};

} // namespace brokerd
