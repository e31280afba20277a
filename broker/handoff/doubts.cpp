// HandoffDoubts: settling the batches a killed brokerd had in flight.
#include "handoff/doubts.hpp"

#include <algorithm>

namespace brokerd {

void HandoffDoubts::expect(const std::string &service, const std::string &instance)
{
	if (!closed_)
		expected_[instance] = service;
}

void HandoffDoubts::resume(const std::string &service, const std::string &instance, pid_t pid, EventSink &sink,
                           std::vector<Receipt> received, const std::vector<InDoubt> &in_doubt)
{
	expected_.erase(instance);
	// What it received is what it received: said again after another loss of its link, it is
	// the same list (or a longer one, whose new part came from this brokerd, which knows it).
	// Taken once, so that no worker grows these books by calling again and again.
	if (!closed_ && spoke_.insert(instance).second)
		for (auto &r : received) {
			Key key{r.instance, r.pid, r.batch};
			receipts_[key].push_back(std::move(r));
		}
	// Its batches in doubt are the ones it names now: those named before and not now were
	// settled meanwhile.
	std::erase_if(doubts_, [&](const auto &kv) { return std::get<0>(kv.first) == instance && std::get<1>(kv.first) == pid; });
	for (const InDoubt &d : in_doubt)
		doubts_[Key{instance, pid, d.batch}] = Doubt{service, &sink, d.batch, d.count};
}

void HandoffDoubts::gone(const std::string &instance)
{
	expected_.erase(instance);
}

void HandoffDoubts::forget(const EventSink &sink)
{
	std::erase_if(doubts_, [&](const auto &kv) { return kv.second.sender == &sink; });
}

std::size_t HandoffDoubts::silent() const
{
	return expected_.size();
}

bool HandoffDoubts::silent_in(const std::string &service) const
{
	return std::any_of(expected_.begin(), expected_.end(), [&](const auto &kv) { return kv.second == service; });
}

// What the receipts say of one batch: each index a receiver names and did not refuse landed; the
// others are back with the sender, or abandoned when a receiver that may have them never spoke.
HandoffDoubts::Resolved HandoffDoubts::settle(const Key &key, const Doubt &d, bool unknown_abandoned) const
{
	std::vector<bool> landed(d.count, false);
	if (auto it = receipts_.find(key); it != receipts_.end())
		for (const Receipt &r : it->second) {
			std::vector<bool> refused(r.count, false);
			for (std::uint64_t i : r.refused)
				if (i < r.count)
					refused[i] = true;
			for (std::uint64_t i = 0; i < r.count && r.first + i < d.count; i++)
				if (!refused[i])
					landed[r.first + i] = true;
		}
	Resolved out{d.service, d.sender, HandoffResult{d.batch, 0, {}, {}, {}}};
	for (std::uint64_t i = 0; i < d.count; i++) {
		if (landed[i])
			out.result.landed++;
		else
			(unknown_abandoned ? out.result.abandoned : out.result.returned).push_back(i);
	}
	return out;
}

std::vector<HandoffDoubts::Resolved> HandoffDoubts::take_resolved()
{
	std::vector<Resolved> out;
	for (auto it = doubts_.begin(); it != doubts_.end();) {
		if (!closed_ && silent_in(it->second.service)) {
			++it;
			continue;
		}
		out.push_back(settle(it->first, it->second, closed_));
		it = doubts_.erase(it);
	}
	return out;
}

std::vector<HandoffDoubts::Resolved> HandoffDoubts::expire()
{
	std::vector<Resolved> out;
	for (const auto &[key, d] : doubts_)
		out.push_back(settle(key, d, silent_in(d.service)));
	doubts_.clear();
	receipts_.clear();
	expected_.clear();
	spoke_.clear();
	closed_ = true;
	return out;
}

} // namespace brokerd
