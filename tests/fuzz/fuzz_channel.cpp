// libFuzzer target: the direct handoff channel's codec (proto/handoff_channel.hpp), whose frames
// come from another worker, a peer the receiver and the sender do not trust.
//
// Decode: any bytes to decode_connections and decode_ack (with a frame size the sender knows, or
// none). What either accepts is within its limits, and encodes back to exactly the same bytes: no
// two frames mean the same, and nothing the decoder reads is outside what it checked. Encode: a
// queue of arbitrary states cut by frame_fit (as many as fit, at least one) encodes to a frame that
// decode_connections accepts, giving back the same states.
#include "proto/handoff_channel.hpp"
#include "proto/limits.hpp"
#include "data_provider.hpp"
#include "fuzz.hpp"

#include <algorithm>
#include <deque>
#include <string>
#include <vector>

using namespace proto;
namespace ch = proto::handoff::channel;

namespace {

constexpr std::size_t kMaxFds = limits::kMaxFdsPerMessage;

void decode(const std::string &frame, std::size_t count)
{
	ch::Connections c;
	bool connections = !ch::decode_connections(frame, c);
	if (connections) {
		fuzz::check(ch::frame_type(frame) == ch::Type::Connections, "a connections frame of another type");
		fuzz::check(c.states.size() <= kMaxFds, "a frame of more connections than a message carries");
		std::deque<handoff::Item> queue;
		for (std::string_view s : c.states) {
			fuzz::check(s.size() <= handoff::kMaxState, "a state over the limit");
			fuzz::check(s.empty() || (s.data() >= frame.data() && s.data() + s.size() <= frame.data() + frame.size()),
			            "a state outside its frame");
			queue.push_back(handoff::Item{UniqueFd(), std::string(s)});
		}
		std::string again;
		ch::encode_connections(again, c.id, queue, queue.size());
		fuzz::check(again == frame, "a connections frame that encodes back to other bytes");
	}

	ch::Ack a;
	bool ack = !ch::decode_ack(frame, a, count);
	if (ack) {
		fuzz::check(ch::frame_type(frame) == ch::Type::Ack, "an acknowledgement of another type");
		std::size_t limit = count ? count : kMaxFds;
		for (std::size_t i = 0; i < a.refused.size(); i++) {
			fuzz::check(a.refused[i] < limit, "a refused index outside the frame");
			fuzz::check(i == 0 || a.refused[i] > a.refused[i - 1], "refused indices out of order");
		}
		std::string again;
		ch::encode_ack(again, a.id, a.refused);
		fuzz::check(again == frame, "an acknowledgement that encodes back to other bytes");
		// What a frame's own size takes, no size takes too.
		if (count) {
			ch::Ack b;
			fuzz::check(!ch::decode_ack(frame, b, 0) && b.refused == a.refused, "an acknowledgement that needs a size");
		}
	}
	fuzz::check(!(connections && ack), "a frame that is both");
}

void encode(fuzz::DataProvider &in)
{
	std::size_t n = in.ConsumeIntegralInRange<std::size_t>(0, 300);
	std::size_t max_fds = in.ConsumeIntegralInRange<std::size_t>(1, 300);
	std::deque<handoff::Item> queue;
	for (std::size_t i = 0; i < n; i++) {
		std::string text = in.ConsumeRandomLengthString(32);
		std::size_t size = in.ConsumeIntegralInRange<std::size_t>(0, handoff::kMaxState);
		std::string state;
		while (state.size() < size)
			state += text.empty() ? std::string(1, static_cast<char>(i)) : text;
		state.resize(size);
		queue.push_back(handoff::Item{UniqueFd(), std::move(state)});
	}
	std::size_t fit = ch::frame_fit(queue, max_fds);
	std::size_t most = std::min({queue.size(), max_fds, kMaxFds});
	fuzz::check(fit <= most && (queue.empty() || fit >= 1), "frame_fit outside its bounds");

	std::string frame;
	ch::encode_connections(frame, n, queue, fit);
	fuzz::check(frame.size() <= ch::kMaxFrameBytes, "a frame over 64 KiB"); // states within kMaxState
	if (fit < most) {
		std::string more;
		ch::encode_connections(more, n, queue, fit + 1);
		fuzz::check(more.size() > ch::kMaxFrameBytes, "frame_fit left out a connection that fits");
	}
	ch::Connections c;
	fuzz::check(!ch::decode_connections(frame, c), "an encoded frame refused");
	fuzz::check(c.id == n && c.states.size() == fit, "an encoded frame decodes to another");
	for (std::size_t i = 0; i < fit; i++)
		fuzz::check(c.states[i] == queue[i].state, "a state changed on the way");
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	fuzz::DataProvider in(data, size);
	if (in.ConsumeBool()) {
		encode(in);
	} else {
		std::size_t count = in.ConsumeIntegralInRange<std::size_t>(0, kMaxFds); // 0: not known
		decode(in.ConsumeRemainingBytesAsString(), count);
	}
	return 0;
}
