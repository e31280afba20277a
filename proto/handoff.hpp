// The worker's side of connection handoff: batching, the window of batches in flight, and
// matching the broker's answers to the connections still held. No I/O here.
#pragma once
#include "proto/unique_fd.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace proto::handoff {

inline constexpr std::size_t kMaxState = 16384;  // bytes of one connection's state
inline constexpr std::size_t kWindow = 8;        // batches in flight, of the broker's 16
// A batch stops short of the message limit, leaving room for the call's own members.
inline constexpr std::size_t kBatchBytes = (1u << 20) - 4096;

// Standard base64 with padding, as the state travels in JSON.
std::string base64_encode(std::string_view bytes);
std::optional<std::string> base64_decode(std::string_view text);
// A well-formed encoding of at most max_decoded bytes, checked without decoding.
bool base64_valid(std::string_view text, std::size_t max_decoded);

struct Item {
	UniqueFd fd;
	std::string state; // raw bytes
};

// The connections a worker hands off: queued, then sent in batches of at most 253, then held
// until the broker says which landed (closed here) and which came back (given to the caller).
class Sender {
public:
	struct Batch {
		std::uint64_t id;
		nlohmann::json parameters; // io.brokerd.Worker.Handoff's
		std::vector<int> fds;      // borrowed: they stay open here until the batch completes
	};
	struct Completion {
		std::size_t landed = 0;
		std::vector<Item> returned;
		std::size_t abandoned = 0; // closed here: nobody could tell where they went
	};
	struct InFlight {
		std::uint64_t batch;
		std::size_t count;
	};

	void add(Item item) { queue_.push_back(std::move(item)); }
	// Two steps, so that a caller can queue connections without owning any fd yet (only the
	// queue allocates), then own them all at once: drop_back() undoes the first step, and
	// own_back() gives the last n queued items their fds and cannot fail.
	void drop_back(std::size_t n);
	void own_back(const int *fds, std::size_t n) noexcept;
	// Fewer batches in flight than kWindow (at least one).
	void set_window(std::size_t batches) { window_ = batches < 1 ? 1 : batches > kWindow ? kWindow : batches; }

	// The next batch to send, while fewer than the window are in flight and any are queued.
	std::optional<Batch> next();

	// The broker's "handoff" event for a batch. Returns false, changing nothing, for an unknown
	// batch or counts that do not add up to it.
	bool complete(std::uint64_t batch, std::uint64_t landed, const std::vector<std::uint64_t> &returned,
	              const std::vector<std::uint64_t> &abandoned, Completion &out);
	// The batches in flight: after a restart of brokerd, those in doubt (Worker.Resume).
	std::vector<InFlight> in_flight() const;

	// A batch that could not be queued for sending goes back to the front of the queue.
	void requeue(std::uint64_t batch);

	// When the broker has gone: the connections never sent, which are the caller's again.
	std::vector<Item> take_unsent();
	// ... and those in flight, which may have landed at a receiver whose acknowledgement was
	// lost with the broker: closed here, so that no socket is ever served twice. Returns how many.
	std::size_t drop_in_flight();
	// The newest `n` batches in flight never left (their messages were still queued): back to
	// the queue, in order, before the rest are dropped.
	void requeue_newest(std::size_t n);

	std::size_t queued() const { return queue_.size(); }
	// The direct channel sends from the queue's front itself (handoff_channel.hpp).
	const std::deque<Item> &queue() const { return queue_; }
	std::vector<Item> take_front(std::size_t n);
	std::size_t in_flight_batches() const { return in_flight_.size(); }
	std::size_t pending() const;
	// Each fd held here, queued or in flight.
	template <typename F>
	void for_each_fd(F &&f) const
	{
		for (const Item &item : queue_)
			f(item.fd.get());
		for (const auto &[id, items] : in_flight_)
			for (const Item &item : items)
				f(item.fd.get());
	}

private:
	std::deque<Item> queue_;
	std::map<std::uint64_t, std::vector<Item>> in_flight_;
	std::uint64_t next_id_ = 1;
	std::size_t window_ = kWindow;
};

// The chunks a receiver got, as their "connections" events named their origin: the newest
// limits::kMaxResumeReceipts, told to a brokerd that restarted (Worker.Resume) so that it can
// settle the batches their senders hold in doubt.
class Receipts {
public:
	// An event's "origin" (ignored unless well formed: a brokerd that predates it sends none),
	// its number of connections and the indices refused.
	void add(const nlohmann::json &origin, std::size_t count, const nlohmann::json &refused);
	// Resume's "received", newest last, the oldest left out beyond max_bytes.
	nlohmann::json list(std::size_t max_bytes) const;
	std::size_t size() const { return list_.size(); }

private:
	struct Receipt {
		std::string instance;
		std::uint64_t pid, batch, first, count;
		std::vector<std::uint64_t> refused;
	};
	std::deque<Receipt> list_;
};

} // namespace proto::handoff
