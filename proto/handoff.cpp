// Connection handoff, the worker's side: base64 for the state, and the batch window.
#include "proto/handoff.hpp"

#include "proto/limits.hpp"

#include <algorithm>
#include <array>
#include <iterator>

namespace proto::handoff {

using nlohmann::json;

namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

constexpr std::array<signed char, 256> decode_table()
{
	std::array<signed char, 256> t{};
	for (auto &v : t)
		v = -1;
	for (int i = 0; i < 64; i++)
		t[static_cast<unsigned char>(kAlphabet[i])] = static_cast<signed char>(i);
	return t;
}
constexpr auto kDecode = decode_table();

std::size_t encoded_size(std::size_t bytes)
{
	return (bytes + 2) / 3 * 4;
}

} // namespace

std::string base64_encode(std::string_view bytes)
{
	std::string out;
	out.reserve(encoded_size(bytes.size()));
	std::size_t i = 0;
	auto at = [&](std::size_t k) { return static_cast<unsigned char>(bytes[k]); };
	for (; i + 3 <= bytes.size(); i += 3) {
		unsigned v = at(i) << 16 | at(i + 1) << 8 | at(i + 2);
		out += kAlphabet[v >> 18 & 63];
		out += kAlphabet[v >> 12 & 63];
		out += kAlphabet[v >> 6 & 63];
		out += kAlphabet[v & 63];
	}
	std::size_t rest = bytes.size() - i;
	if (rest > 0) {
		unsigned v = at(i) << 16 | (rest == 2 ? at(i + 1) << 8 : 0u);
		out += kAlphabet[v >> 18 & 63];
		out += kAlphabet[v >> 12 & 63];
		out += rest == 2 ? kAlphabet[v >> 6 & 63] : '=';
		out += '=';
	}
	return out;
}

bool base64_valid(std::string_view text, std::size_t max_decoded)
{
	if (text.size() % 4 != 0 || text.size() > encoded_size(max_decoded))
		return false;
	std::size_t pad = 0;
	if (!text.empty() && text.back() == '=')
		pad = text.size() >= 2 && text[text.size() - 2] == '=' ? 2 : 1;
	for (std::size_t i = 0; i < text.size() - pad; i++)
		if (kDecode[static_cast<unsigned char>(text[i])] < 0)
			return false;
	return text.size() / 4 * 3 - pad <= max_decoded;
}

std::optional<std::string> base64_decode(std::string_view text)
{
	if (!base64_valid(text, text.size()))
		return std::nullopt;
	std::string out;
	out.reserve(text.size() / 4 * 3);
	for (std::size_t i = 0; i < text.size(); i += 4) {
		unsigned v = 0;
		int have = 0;
		for (int k = 0; k < 4; k++) {
			char c = text[i + k];
			if (c == '=')
				break;
			v |= static_cast<unsigned>(kDecode[static_cast<unsigned char>(c)]) << (18 - 6 * k);
			have++;
		}
		out += static_cast<char>(v >> 16 & 255);
		if (have > 2)
			out += static_cast<char>(v >> 8 & 255);
		if (have > 3)
			out += static_cast<char>(v & 255);
	}
	return out;
}

std::optional<Sender::Batch> Sender::next()
{
	if (queue_.empty() || in_flight_.size() >= window_)
		return std::nullopt;
	Batch b{next_id_++, json::object(), {}};
	json conns = json::array();
	std::vector<Item> held;
	std::size_t bytes = 0;
	while (!queue_.empty() && held.size() < limits::kMaxFdsPerMessage) {
		Item &item = queue_.front();
		// {"fd":252,"state":"..."}, with room to spare.
		std::size_t cost = 32 + encoded_size(item.state.size());
		if (!held.empty() && bytes + cost > kBatchBytes)
			break;
		bytes += cost;
		json conn = {{"fd", held.size()}};
		if (!item.state.empty())
			conn["state"] = base64_encode(item.state);
		conns.push_back(std::move(conn));
		b.fds.push_back(item.fd.get());
		held.push_back(std::move(item));
		queue_.pop_front();
	}
	b.parameters = {{"batch", b.id}, {"connections", std::move(conns)}, {"remaining", queue_.size()}};
	in_flight_.emplace(b.id, std::move(held));
	return b;
}

bool Sender::complete(std::uint64_t batch, std::uint64_t landed, const std::vector<std::uint64_t> &returned,
                      const std::vector<std::uint64_t> &abandoned, Completion &out)
{
	auto it = in_flight_.find(batch);
	if (it == in_flight_.end())
		return false;
	std::vector<Item> &items = it->second;
	if (landed + returned.size() + abandoned.size() != items.size())
		return false;
	std::vector<bool> back(items.size(), false), seen(items.size(), false);
	for (const auto *list : {&returned, &abandoned})
		for (auto i : *list) {
			if (i >= items.size() || seen[i])
				return false;
			seen[i] = true;
			back[i] = list == &returned;
		}
	// Everything that allocates first: should it fail, the batch is still whole.
	std::vector<int> closing;
	closing.reserve(items.size());
	out.returned.clear();
	out.returned.reserve(returned.size());
	out.landed = landed;
	out.abandoned = abandoned.size();
	for (std::size_t i = 0; i < items.size(); i++)
		if (back[i])
			out.returned.push_back(std::move(items[i]));
	// The landed ones close here: the successor holds them now; so do the abandoned ones.
	for (auto &item : items)
		if (item.fd && !item.fd.is_from_peer())
			closing.push_back(item.fd.release());
	in_flight_.erase(it);
	close_all(closing);
	return true;
}

void Sender::drop_back(std::size_t n)
{
	while (n-- > 0 && !queue_.empty())
		queue_.pop_back();
}

void Sender::own_back(const int *fds, std::size_t n) noexcept
{
	std::size_t first = queue_.size() - n;
	for (std::size_t i = 0; i < n; i++)
		queue_[first + i].fd.reset(fds[i]);
}

void Sender::requeue(std::uint64_t batch)
{
	auto it = in_flight_.find(batch);
	if (it == in_flight_.end())
		return;
	for (auto item = it->second.rbegin(); item != it->second.rend(); ++item)
		queue_.push_front(std::move(*item));
	in_flight_.erase(it);
}

void Sender::requeue_newest(std::size_t n)
{
	// Newest first: each goes to the front, so they end up in their original order.
	while (n-- > 0 && !in_flight_.empty())
		requeue(std::prev(in_flight_.end())->first);
}

std::vector<Item> Sender::take_unsent()
{
	std::vector<Item> out;
	out.reserve(queue_.size());
	for (auto &item : queue_)
		out.push_back(std::move(item));
	queue_.clear();
	return out;
}

std::vector<Item> Sender::take_front(std::size_t n)
{
	n = std::min(n, queue_.size());
	std::vector<Item> out;
	out.reserve(n);
	for (std::size_t i = 0; i < n; i++) {
		out.push_back(std::move(queue_.front()));
		queue_.pop_front();
	}
	return out;
}

std::size_t Sender::drop_in_flight()
{
	std::size_t n = 0;
	for (const auto &[id, items] : in_flight_)
		n += items.size();
	in_flight_.clear();
	return n;
}

std::vector<Sender::InFlight> Sender::in_flight() const
{
	std::vector<InFlight> out;
	for (const auto &[id, items] : in_flight_)
		out.push_back({id, items.size()});
	return out;
}

void Receipts::add(const json &origin, std::size_t count, const json &refused)
{
	auto count_of = [&](const char *key, std::uint64_t &out) {
		auto it = origin.find(key);
		if (it == origin.end() || !it->is_number_unsigned())
			return false;
		out = it->get<std::uint64_t>();
		return true;
	};
	Receipt r{{}, 0, 0, 0, count, {}};
	auto instance = origin.is_object() ? origin.find("instance") : origin.end();
	if (instance == origin.end() || !instance->is_string() || !count_of("pid", r.pid) || !count_of("batch", r.batch) ||
	    !count_of("first", r.first))
		return;
	r.instance = instance->get<std::string>();
	for (const json &i : refused)
		r.refused.push_back(i.get<std::uint64_t>());
	if (list_.size() == limits::kMaxResumeReceipts)
		list_.pop_front();
	list_.push_back(std::move(r));
}

json Receipts::list(std::size_t max_bytes) const
{
	// Newest first until the size is reached, then in order.
	std::deque<json> kept;
	std::size_t bytes = 0;
	for (auto it = list_.rbegin(); it != list_.rend(); ++it) {
		json r = {{"instance", it->instance}, {"pid", it->pid}, {"batch", it->batch}, {"first", it->first}, {"count", it->count}};
		if (!it->refused.empty())
			r["refused"] = it->refused;
		bytes += r.dump().size() + 1;
		if (bytes > max_bytes)
			break;
		kept.push_front(std::move(r));
	}
	json out = json::array();
	for (auto &r : kept)
		out.push_back(std::move(r));
	return out;
}

std::size_t Sender::pending() const
{
	std::size_t n = queue_.size();
	for (const auto &[id, items] : in_flight_)
		n += items.size();
	return n;
}

} // namespace proto::handoff
