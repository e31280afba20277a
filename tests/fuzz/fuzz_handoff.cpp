// libFuzzer target: the handoff codec of libbroker-client (handoff.hpp): base64 of each
// connection's state, and handoff::Sender matching the broker's answers to what it holds.
//
// base64: what base64_valid accepts decodes, what it refuses does not, and any bytes encode and
// decode back. Sender: driven by a script of calls with arbitrary answers, it never loses or
// duplicates a connection (queued + in flight + landed + returned + dropped = added) and leaves
// no fd open.
#include "proto/handoff.hpp"
#include "data_provider.hpp"
#include "fuzz.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <set>
#include <string>
#include <vector>

using namespace proto;

namespace {

void codec(std::string_view text)
{
	auto decoded = handoff::base64_decode(text);
	fuzz::check(decoded.has_value() == handoff::base64_valid(text, text.size()), "base64_valid and base64_decode disagree");
	if (decoded) {
		fuzz::check(decoded->size() <= text.size() / 4 * 3, "decoded longer than its text allows");
		fuzz::check(handoff::base64_valid(text, decoded->size()), "valid text over the size it decodes to");
		if (!decoded->empty())
			fuzz::check(!handoff::base64_valid(text, decoded->size() - 1), "valid text under the size it decodes to");
	}
	std::string encoded = handoff::base64_encode(text);
	fuzz::check(encoded.size() % 4 == 0 && handoff::base64_valid(encoded, text.size()), "an encoding that is not valid");
	fuzz::check(handoff::base64_decode(encoded) == std::string(text), "bytes that do not survive encoding");
}

// Opened before any input, so it is not taken for a leak.
const int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);

void sender(fuzz::DataProvider &in)
{
	handoff::Sender s;
	std::size_t added = 0, landed = 0, returned = 0, dropped = 0;
	std::vector<handoff::Sender::Batch> sent;
	auto count = [&] {
		return s.pending() + landed + returned + dropped;
	};
	for (int step = 0; step < 64 && in.remaining_bytes() > 0; step++) {
		switch (in.ConsumeIntegralInRange(0, 7)) {
		case 0: { // add n connections, then own their fds
			std::size_t n = in.ConsumeIntegralInRange<std::size_t>(1, 260);
			std::string state = in.ConsumeBool() ? std::string() : std::string(in.ConsumeIntegralInRange(1, 64), 's');
			std::vector<int> fds;
			for (std::size_t i = 0; i < n; i++) {
				s.add(handoff::Item{UniqueFd(), state});
				fds.push_back(::fcntl(devnull, F_DUPFD_CLOEXEC, 0));
			}
			if (in.ConsumeBool()) {
				s.own_back(fds.data(), n);
				added += n;
			} else {
				s.drop_back(n);
				for (int fd : fds)
					::close(fd);
			}
			break;
		}
		case 1:
			if (auto b = s.next()) {
				fuzz::check(b->fds.size() == b->parameters["connections"].size() && !b->fds.empty(), "a batch's fds and connections differ");
				for (int fd : b->fds)
					fuzz::check(::fcntl(fd, F_GETFD) >= 0, "a batch with a closed fd");
				sent.push_back(std::move(*b));
			}
			break;
		case 2: { // the broker's answer, well-formed or not
			std::uint64_t id = sent.empty() || in.ConsumeBool() ? in.ConsumeIntegral<std::uint64_t>()
			                                                    : sent[in.ConsumeIntegralInRange<std::size_t>(0, sent.size() - 1)].id;
			std::uint64_t land = in.ConsumeIntegralInRange<std::uint64_t>(0, 300);
			std::vector<std::uint64_t> back;
			for (std::size_t i = in.ConsumeIntegralInRange(0, 8); i > 0; i--)
				back.push_back(in.ConsumeIntegralInRange<std::uint64_t>(0, 300));
			std::size_t before = s.pending();
			handoff::Sender::Completion done;
			if (s.complete(id, land, back, {}, done)) {
				fuzz::check(done.landed == land && done.returned.size() == back.size(), "a completion other than the answer");
				fuzz::check(std::set<std::uint64_t>(back.begin(), back.end()).size() == back.size(), "an index returned twice was taken");
				for (const handoff::Item &item : done.returned)
					fuzz::check(item.fd && ::fcntl(item.fd.get(), F_GETFD) >= 0, "a returned connection without its fd");
				fuzz::check(before - s.pending() == land + back.size(), "a completion lost connections");
				landed += land;
				returned += back.size();
			} else {
				fuzz::check(s.pending() == before, "a refused answer changed what is held");
			}
			break;
		}
		case 3:
			if (!sent.empty())
				s.requeue(sent[in.ConsumeIntegralInRange<std::size_t>(0, sent.size() - 1)].id);
			break;
		case 4:
			s.requeue_newest(in.ConsumeIntegralInRange<std::size_t>(0, 10));
			break;
		case 5:
			s.set_window(in.ConsumeIntegralInRange<std::size_t>(0, 20));
			break;
		case 6:
			dropped += s.take_unsent().size();
			break;
		case 7:
			dropped += s.drop_in_flight();
			break;
		}
		fuzz::check(s.in_flight_batches() <= handoff::kWindow, "more batches in flight than the window");
		fuzz::check(count() == added, "a connection was lost or counted twice");
	}
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	const int base = fuzz::lowest_free_fd();
	fuzz::DataProvider in(data, size);
	if (in.ConsumeBool()) {
		codec(in.ConsumeRemainingBytesAsString());
	} else {
		sender(in);
	}
	fuzz::check(fuzz::lowest_free_fd() == base, "an fd was left open");
	return 0;
}
