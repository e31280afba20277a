// HandoffRouter: chunking, forwarding and acknowledgement of handed-off connections.
#include "handoff/router.hpp"

#include <algorithm>

namespace brokerd {

void HandoffRouter::reject(const std::string &service, EventSink &sender, std::uint64_t batch, std::size_t count,
                           const std::string &why)
{
	if (on_report)
		on_report(Report{service, &sender, nullptr, 0, count});
	HandoffResult result{batch, 0, std::vector<std::uint64_t>(count), {}, why};
	for (std::size_t i = 0; i < count; i++)
		result.returned[i] = i;
	sender.send_handoff_result(result);
}

void HandoffRouter::submit(const std::string &service, EventSink &sender, std::uint64_t batch,
                           std::vector<HandoffItem> items, std::span<EventSink *const> receivers,
                           const HandoffOrigin &who)
{
	// Our copies close at the end of this call unless a receiver's queue takes them.
	std::size_t count = items.size();
	for (const auto &[key, b] : batches_)
		if (b.sender == &sender && b.id == batch)
			return reject(service, sender, batch, count, "batch " + std::to_string(batch) + " is already in flight");
	if (batches_in_flight(sender) >= kMaxBatchesInFlight)
		return reject(service, sender, batch, count,
		              "more than " + std::to_string(kMaxBatchesInFlight) + " handoff batches in flight");
	if (receivers.empty())
		return reject(service, sender, batch, count, "no ready instance of a newer generation accepts handoffs");
	if (count == 0)
		return reject(service, sender, batch, 0, {});

	std::uint64_t key = next_key_++;
	Batch &b = batches_[key];
	b.service = service;
	b.sender = &sender;
	b.id = batch;
	b.origin = who;
	b.origin.batch = batch;
	// One extra unit while we send: a receiver that fails inside send_event() resolves its chunk
	// at once, and the batch must not settle before every chunk has gone out.
	b.outstanding = 1;

	std::size_t r = std::min(receivers.size(), count);
	std::size_t first = rotation_++ % receivers.size();
	std::size_t begin = 0;
	std::vector<std::uint64_t> chunks;
	for (std::size_t c = 0; c < r; c++) {
		// Even shares; the first (count % r) chunks get one more, and which receivers get
		// those rotates from batch to batch.
		std::size_t size = count / r + (c < count % r ? 1 : 0);
		std::uint64_t id = next_forward_++;
		Forward &f = forwards_[id];
		f.batch = key;
		f.receiver = receivers[(first + c) % receivers.size()];
		for (std::size_t i = begin; i < begin + size; i++) {
			f.bytes += 32 + items[i].state.size();
			f.indices.push_back(i);
			f.items.push_back(std::move(items[i]));
		}
		begin += size;
		batches_[key].outstanding++;
		receivers_[f.receiver].held.push_back(id);
		chunks.push_back(id);
	}
	// Each receiver takes what it has room for now; the rest waits for its acknowledgements.
	for (std::uint64_t id : chunks) {
		auto it = forwards_.find(id);
		if (it != forwards_.end())
			send_held(it->second.receiver);
	}
	if (--batches_[key].outstanding == 0)
		settle(key);
}

std::optional<std::string> HandoffRouter::received(EventSink &receiver, std::uint64_t forward,
                                                   const std::vector<std::uint64_t> &refused)
{
	auto it = forwards_.find(forward);
	// A chunk still held for want of room was not sent either: acknowledging it would count
	// connections as landed that nobody has.
	if (it == forwards_.end() || it->second.receiver != &receiver || !it->second.sent)
		return "no batch " + std::to_string(forward) + " was sent to this instance";
	std::vector<std::uint64_t> sorted = refused;
	std::sort(sorted.begin(), sorted.end());
	if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
		return "an index is refused twice";
	if (!sorted.empty() && sorted.back() >= it->second.indices.size())
		return "refused index " + std::to_string(sorted.back()) + " is out of range";

	std::vector<bool> is_refused(it->second.indices.size(), false);
	for (auto i : sorted)
		is_refused[i] = true;
	Forward f = std::move(it->second);
	forwards_.erase(it);
	finished(f);
	Batch &b = batches_.at(f.batch);
	std::size_t landed = 0, returned = 0;
	for (std::size_t i = 0; i < f.indices.size(); i++) {
		if (is_refused[i]) {
			b.returned.push_back(f.indices[i]);
			returned++;
		} else {
			landed++;
		}
	}
	b.landed += landed;
	if (on_report)
		on_report(Report{b.service, b.sender, &receiver, landed, returned});
	if (--b.outstanding == 0)
		settle(f.batch);
	send_held(&receiver);
	return std::nullopt;
}

// A chunk that never arrived, or whose receiver left before acknowledging: all of it returns.
// Held fds close here; the sender still has its own.
void HandoffRouter::resolve(std::uint64_t forward)
{
	auto it = forwards_.find(forward);
	if (it == forwards_.end())
		return;
	Forward f = std::move(it->second);
	forwards_.erase(it);
	finished(f);
	Batch &b = batches_.at(f.batch);
	b.returned.insert(b.returned.end(), f.indices.begin(), f.indices.end());
	if (on_report)
		on_report(Report{b.service, b.sender, f.receiver, 0, f.indices.size()});
	if (--b.outstanding == 0)
		settle(f.batch);
}

void HandoffRouter::settle(std::uint64_t key)
{
	auto it = batches_.find(key);
	if (it == batches_.end())
		return;
	Batch b = std::move(it->second);
	batches_.erase(it);
	if (!b.sender)
		return; // the sender left; its copies closed with it
	std::sort(b.returned.begin(), b.returned.end());
	b.sender->send_handoff_result(HandoffResult{b.id, b.landed, std::move(b.returned), {}, {}});
}

void HandoffRouter::forget(EventSink &sink)
{
	for (auto &[key, b] : batches_)
		if (b.sender == &sink)
			b.sender = nullptr;
	std::vector<std::uint64_t> lost;
	for (const auto &[id, f] : forwards_)
		if (f.receiver == &sink)
			lost.push_back(id);
	for (auto id : lost)
		resolve(id);
	receivers_.erase(&sink);
}

// Sends the receiver's held chunks, oldest first, while it has room: always at least one, so
// that a chunk larger than the limit still goes.
void HandoffRouter::send_held(EventSink *receiver)
{
	for (;;) {
		auto r = receivers_.find(receiver);
		if (r == receivers_.end() || r->second.held.empty())
			return;
		std::uint64_t id = r->second.held.front();
		auto it = forwards_.find(id);
		if (it == forwards_.end()) {
			r->second.held.pop_front();
			continue;
		}
		if (r->second.unacked_bytes > 0 && r->second.unacked_bytes + it->second.bytes > kMaxUnackedBytes)
			return;
		r->second.held.pop_front();
		send(id);
	}
}

void HandoffRouter::send(std::uint64_t id)
{
	Forward &f = forwards_.at(id);
	std::vector<HandoffItem> items = std::move(f.items);
	f.items.clear();
	f.sent = true;
	EventSink *receiver = f.receiver;
	receivers_[receiver].unacked_bytes += f.bytes;
	HandoffOrigin origin = batches_.at(f.batch).origin;
	origin.first = f.indices.empty() ? 0 : f.indices.front();
	// Our copies close once written. A receiver that cannot take the event gives the chunk
	// back; if its connection closed on the way, forget() has done that already.
	if (!receiver->send_connections(id, std::move(items), origin) && forwards_.count(id))
		resolve(id);
}

// A chunk is acknowledged or given up: its receiver has that much more room.
void HandoffRouter::finished(const Forward &f)
{
	auto r = receivers_.find(f.receiver);
	if (r == receivers_.end())
		return;
	if (f.sent)
		r->second.unacked_bytes -= std::min(r->second.unacked_bytes, f.bytes);
	if (r->second.unacked_bytes == 0 && r->second.held.empty())
		receivers_.erase(r);
}

std::size_t HandoffRouter::chunks_held() const
{
	std::size_t n = 0;
	for (const auto &[id, f] : forwards_)
		n += !f.sent;
	return n;
}

std::size_t HandoffRouter::batches_in_flight(const EventSink &sender) const
{
	return static_cast<std::size_t>(
		std::count_if(batches_.begin(), batches_.end(), [&](const auto &kv) { return kv.second.sender == &sender; }));
}

} // namespace brokerd
