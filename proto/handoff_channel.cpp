// The direct handoff channel's frames (see handoff_channel.hpp).
#include "proto/handoff_channel.hpp"

#include "proto/limits.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace proto::handoff::channel {

namespace {

constexpr std::size_t kMaxFds = limits::kMaxFdsPerMessage;

std::optional<std::string> read_header(std::string_view frame, Type type, Header &h)
{
	if (frame.size() < sizeof(Header))
		return "a frame of " + std::to_string(frame.size()) + " bytes, shorter than its header";
	std::memcpy(&h, frame.data(), sizeof h);
	if (h.magic != kMagic || h.version != kVersion)
		return std::string("a frame of another protocol or version");
	if (h.type != type)
		return "a frame of type " + std::to_string(static_cast<unsigned>(h.type)) + " where " +
		       std::to_string(static_cast<unsigned>(type)) + " belongs";
	if (h.count > kMaxFds)
		return "a frame of " + std::to_string(h.count) + " entries, over " + std::to_string(kMaxFds);
	return std::nullopt;
}

void append(std::string &out, const void *p, std::size_t n)
{
	out.append(static_cast<const char *>(p), n);
}

} // namespace

std::size_t frame_fit(const std::deque<Item> &queue, std::size_t max_fds)
{
	std::size_t limit = std::min({queue.size(), max_fds, kMaxFds});
	std::size_t bytes = sizeof(Header), n = 0;
	while (n < limit) {
		std::size_t more = sizeof(std::uint32_t) + queue[n].state.size();
		if (n > 0 && bytes + more > kMaxFrameBytes)
			break;
		bytes += more;
		n++;
	}
	return n;
}

void encode_connections(std::string &out, std::uint64_t id, const std::deque<Item> &queue, std::size_t n)
{
	Header h;
	h.type = Type::Connections;
	h.count = static_cast<std::uint32_t>(n);
	h.id = id;
	for (std::size_t i = 0; i < n; i++)
		h.bytes += static_cast<std::uint32_t>(queue[i].state.size());
	out.clear();
	out.reserve(sizeof h + n * sizeof(std::uint32_t) + h.bytes);
	append(out, &h, sizeof h);
	for (std::size_t i = 0; i < n; i++) {
		auto len = static_cast<std::uint32_t>(queue[i].state.size());
		append(out, &len, sizeof len);
	}
	for (std::size_t i = 0; i < n; i++)
		out += queue[i].state;
}

std::optional<std::string> decode_connections(std::string_view frame, Connections &out)
{
	Header h;
	if (auto why = read_header(frame, Type::Connections, h))
		return why;
	std::size_t lengths = std::size_t{h.count} * sizeof(std::uint32_t);
	if (frame.size() != sizeof h + lengths + h.bytes)
		return "a frame of " + std::to_string(frame.size()) + " bytes where its header says " +
		       std::to_string(sizeof h + lengths + h.bytes);
	out.id = h.id;
	out.states.clear();
	out.states.reserve(h.count);
	std::size_t at = sizeof h + lengths;
	for (std::size_t i = 0; i < h.count; i++) {
		std::uint32_t len = 0;
		std::memcpy(&len, frame.data() + sizeof h + i * sizeof len, sizeof len);
		if (len > kMaxState)
			return "a state of " + std::to_string(len) + " bytes, over " + std::to_string(kMaxState);
		if (len > frame.size() - at)
			return std::string("states longer than the frame");
		out.states.push_back(frame.substr(at, len));
		at += len;
	}
	if (at != frame.size())
		return std::string("states shorter than the frame");
	return std::nullopt;
}

void encode_ack(std::string &out, std::uint64_t id, std::span<const std::uint32_t> refused)
{
	Header h;
	h.type = Type::Ack;
	h.count = static_cast<std::uint32_t>(refused.size());
	h.id = id;
	out.clear();
	append(out, &h, sizeof h);
	if (!refused.empty())
		append(out, refused.data(), refused.size_bytes());
}

std::optional<std::string> decode_ack(std::string_view frame, Ack &out, std::size_t count)
{
	Header h;
	if (auto why = read_header(frame, Type::Ack, h))
		return why;
	if (h.bytes != 0 || frame.size() != sizeof h + std::size_t{h.count} * sizeof(std::uint32_t))
		return "an acknowledgement of " + std::to_string(frame.size()) + " bytes for " + std::to_string(h.count) +
		       " refused";
	std::size_t limit = count ? count : kMaxFds;
	out.id = h.id;
	out.refused.resize(h.count);
	if (h.count)
		std::memcpy(out.refused.data(), frame.data() + sizeof h, h.count * sizeof(std::uint32_t));
	for (std::size_t i = 0; i < out.refused.size(); i++) {
		if (out.refused[i] >= limit)
			return "refused index " + std::to_string(out.refused[i]) + " of a frame of " + std::to_string(limit);
		if (i > 0 && out.refused[i] <= out.refused[i - 1])
			return std::string("refused indices out of order or repeated");
	}
	return std::nullopt;
}

std::optional<Type> frame_type(std::string_view frame)
{
	Header h;
	if (frame.size() < sizeof h)
		return std::nullopt;
	std::memcpy(&h, frame.data(), sizeof h);
	if (h.magic != kMagic || h.version != kVersion)
		return std::nullopt;
	return h.type;
}

int send_frame(int fd, std::string_view bytes, std::span<const int> fds)
{
	iovec iov{const_cast<char *>(bytes.data()), bytes.size()};
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
	if (!fds.empty()) {
		if (fds.size() > kMaxFds)
			return -EINVAL;
		msg.msg_control = control;
		msg.msg_controllen = CMSG_SPACE(fds.size_bytes());
		cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(fds.size_bytes());
		std::memcpy(CMSG_DATA(c), fds.data(), fds.size_bytes());
	}
	for (;;) {
		ssize_t n = ::sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n >= 0)
			return 0; // a datagram goes whole or not at all
		if (errno != EINTR)
			return -errno;
	}
}

int receive_frame(int fd, std::string &buffer, Received &out)
{
	buffer.resize(kMaxFrameBytes);
	iovec iov{buffer.data(), buffer.size()};
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
	msg.msg_control = control;
	msg.msg_controllen = sizeof control;
	ssize_t n;
	// ECONNRESET says once that the peer closed with frames of ours unread; what it had sent
	// before still waits here, and the next read gets it (then the end).
	bool reset = false;
	do {
		n = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == ECONNRESET && !reset) {
			reset = true;
			errno = EINTR;
		}
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	out.fds.clear();
	for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		std::size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (std::size_t i = 0; i < k; i++) {
			int received;
			std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof received);
			out.fds.push_back(UniqueFd::from_peer(received));
		}
	}
	out.size = static_cast<std::size_t>(n);
	out.truncated = (msg.msg_flags & MSG_TRUNC) != 0;
	out.fds_cut = (msg.msg_flags & MSG_CTRUNC) != 0;
	if (n == 0 && out.fds.empty() && !out.truncated)
		return 0; // SOCK_SEQPACKET: a zero-length read is the end; frames are never empty
	return 1;
}

} // namespace proto::handoff::channel
