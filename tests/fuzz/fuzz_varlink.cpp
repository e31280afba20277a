// libFuzzer target: varlink::Stream reading bytes and fds from a real socketpair.
//
// The input is cut into writes, each with a few fds attached. Every message the Stream gives out
// must be what a plain JSON parse of its text gives, within the nesting limit, with exactly the
// fds it references; every refusal must be one of the documented errors; and once the Stream is
// gone no fd is left open. A received message is sent back through Stream::enqueue and must
// arrive unchanged.
#include "proto/varlink.hpp"
#include "data_provider.hpp"
#include "fuzz.hpp"

#include <fcntl.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

using namespace proto;
using json = nlohmann::json;

namespace {

// Deepest nesting of objects and arrays in a parsed value (1 for {} or []).
std::size_t depth_of(const json &j)
{
	if (!j.is_structured())
		return 0;
	std::size_t deepest = 0;
	for (const json &v : j)
		deepest = std::max(deepest, depth_of(v));
	return deepest + 1;
}

bool send_bytes(int fd, std::string_view bytes, std::size_t nfds, int attached)
{
	iovec iov{const_cast<char *>(bytes.data()), bytes.size()};
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
	if (nfds > 0) {
		msg.msg_control = control;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		std::memset(control, 0, sizeof(control));
		cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		for (std::size_t i = 0; i < nfds; i++)
			std::memcpy(CMSG_DATA(c) + i * sizeof(int), &attached, sizeof(int));
	}
	return ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(bytes.size());
}

// What a message's text must give: the body, or nothing when the Stream must refuse it.
bool acceptable(std::string_view text, json &body)
{
	body = json::parse(text, nullptr, false);
	return !body.is_discarded() && body.is_object() && depth_of(body) <= limits::kMaxJsonDepth &&
	       varlink::count_fd_refs(body) >= 0;
}

// Sends a received message back the other way and reads it again.
void echo(varlink::Stream &rx, int back_fd, varlink::Message &m)
{
	std::size_t nfds = m.fds.size();
	for (const UniqueFd &f : m.fds)
		if (!f)
			return; // lost fds (allow_lost_fds) cannot be sent on
	json body = m.body;
	int r = rx.enqueue(body, std::move(m.fds));
	if (r == -EMSGSIZE || r == -E2BIG)
		return;
	fuzz::check(r == 0, "enqueue refused a message it had received");
	fuzz::check(rx.flush() == 0, "flush of one small message did not complete");
	varlink::Stream tx(UniqueFd(::fcntl(back_fd, F_DUPFD_CLOEXEC, 0)));
	varlink::Message again;
	int got = 0;
	while ((got = tx.next(again)) == 0)
		fuzz::check(tx.receive() > 0, "an echoed message did not arrive whole");
	fuzz::check(got == 1, "an echoed message was refused");
	fuzz::check(again.body == body, "an echoed message changed on the way");
	fuzz::check(again.fds.size() == nfds, "an echoed message lost fds");
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	static const int attached = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
	const int base = fuzz::lowest_free_fd();
	{
		fuzz::DataProvider in(data, size);
		std::size_t max_message = in.ConsumeBool() ? limits::kMaxMessageSize : in.ConsumeIntegralInRange(1, 512);
		bool lose = in.ConsumeBool();

		int sv[2];
		if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
			fuzz::fail("socketpair");
		UniqueFd writer(sv[0]);
		varlink::Stream rx(UniqueFd(sv[1]), max_message, 16);
		if (lose)
			rx.allow_lost_fds();

		std::string sent;     // every byte written, to cut into messages the way the Stream must
		std::size_t taken = 0; // messages the Stream has given out or refused
		bool done = false;
		auto drain = [&] {
			for (;;) {
				varlink::Message m;
				int r = rx.next(m);
				if (r == 0)
					return;
				std::size_t start = 0;
				for (std::size_t i = 0; i < taken; i++)
					start = sent.find('\0', start) + 1;
				std::size_t end = sent.find('\0', start);
				std::string_view text = std::string_view(sent).substr(start, end - start);
				taken++;
				json expected;
				if (r == 1) {
					fuzz::check(end != std::string::npos && text.size() <= max_message, "a message past its end or over the limit");
					fuzz::check(acceptable(text, expected), "the Stream gave out a message it must refuse");
					fuzz::check(m.body == expected, "the Stream's message differs from a plain parse");
					fuzz::check(m.fds.size() == static_cast<std::size_t>(varlink::count_fd_refs(m.body)),
					            "a message without exactly its fds");
					for (const UniqueFd &f : m.fds)
						fuzz::check(!f ? lose : ::fcntl(f.get(), F_GETFD) >= 0, "a message with a closed fd");
					echo(rx, writer.get(), m);
					continue;
				}
				fuzz::check(r == -EBADMSG || r == -EPROTO || r == -EMSGSIZE, "an undocumented error from next()");
				fuzz::check(rx.broken(), "an error left the Stream usable");
				if (r == -EBADMSG && end != std::string::npos && text.size() <= max_message)
					fuzz::check(!acceptable(text, expected), "the Stream refused a valid message");
				done = true;
				return;
			}
		};

		while (!done && in.remaining_bytes() > 0) {
			std::size_t nfds = in.ConsumeIntegralInRange<std::size_t>(0, 8) / 2; // half the writes carry none
			std::string chunk = in.ConsumeRandomLengthString(4096);
			if (chunk.empty())
				nfds = 0; // fds need a byte to travel with
			if (!send_bytes(writer.get(), chunk, nfds, attached))
				break;
			sent += chunk;
			for (;;) {
				int r = rx.receive();
				if (r == -EAGAIN)
					break;
				if (r <= 0) {
					fuzz::check(r == -EPROTO || r == -EMSGSIZE, "an undocumented error from receive()");
					done = true;
					break;
				}
				drain();
				if (done)
					break;
			}
		}
	}
	fuzz::check(fuzz::lowest_free_fd() == base, "an fd was left open");
	return 0;
}
