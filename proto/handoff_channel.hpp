// The direct handoff channel: one SOCK_SEQPACKET socket pair that brokerd makes for a sender and
// a receiver and hands one end to each ("peers" and "peer" events). The sender writes frames of
// connections, each one message with its fds attached; the receiver answers each frame with an
// acknowledgement. Both ends run on one host, so integers travel in host byte order.
//
//   connections frame:  Header{type Connections, id, count = fds attached, bytes = states' size}
//                       u32 length[count]   each state's size, in fd order
//                       states              the count states, back to back
//   acknowledgement:    Header{type Ack, id = the frame's, count = refused, bytes = 0}
//                       u32 refused[count]  indices into the frame, ascending, each once
//
// The codec is pure (no I/O) apart from send_frame() and receive_frame() at the end.
#pragma once

#include "proto/handoff.hpp"
#include "proto/unique_fd.hpp"

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace proto::handoff::channel {

inline constexpr std::uint32_t kMagic = 0x4b484250; // "PBHK" in memory on little-endian hosts
inline constexpr std::uint16_t kVersion = 1;
// One frame, header included: under any default socket send buffer, and room for the largest
// state (kMaxState) with its length.
inline constexpr std::size_t kMaxFrameBytes = 64u << 10;
// Channels one process holds in each direction: brokerd gives a sender at most this many, and a
// receiver keeps at most this many (one past it closes at once, and its sender takes back what
// it writes).
inline constexpr std::size_t kMaxPeers = 64;
// The send buffer brokerd gives the sender's end of a channel: the bytes of frames in flight on
// it. The default (net.core.wmem_default, 208 KiB) holds only a dozen frames of 253 connections
// with 64 bytes of state, so a receiver that stops reading for a moment (to register what it
// took) stalls its sender. The kernel counts twice what is set, overheads included: about 100
// such frames, and more than the sender's window without state. Setting more than
// net.core.wmem_max takes CAP_NET_ADMIN (SO_SNDBUFFORCE); without it the channel has what
// wmem_max allows.
inline constexpr int kChannelBuffer = 1 << 20;

enum class Type : std::uint16_t { Connections = 1, Ack = 2 };

struct Header {
	std::uint32_t magic = kMagic;
	std::uint16_t version = kVersion;
	Type type = Type::Connections;
	std::uint32_t count = 0;
	std::uint32_t bytes = 0;
	std::uint64_t id = 0;
};
static_assert(sizeof(Header) == 24);

// How many items from the front of queue one frame carries: at most max_fds (and 253), and as
// many as fit in kMaxFrameBytes, at least one.
std::size_t frame_fit(const std::deque<Item> &queue, std::size_t max_fds);
// The frame of queue's first n items (their states; the fds travel beside it), into out.
void encode_connections(std::string &out, std::uint64_t id, const std::deque<Item> &queue, std::size_t n);

struct Connections {
	std::uint64_t id = 0;
	std::vector<std::string_view> states; // into the frame's bytes, one per fd the sender attached
};
// Checks a whole connections frame; nullopt when it is well formed, else why not.
std::optional<std::string> decode_connections(std::string_view frame, Connections &out);

void encode_ack(std::string &out, std::uint64_t id, std::span<const std::uint32_t> refused);
struct Ack {
	std::uint64_t id = 0;
	std::vector<std::uint32_t> refused;
};
// Checks a whole acknowledgement: well formed, refused ascending without repeats and each under
// count (the frame's size, when the caller knows it; 0: up to 253).
std::optional<std::string> decode_ack(std::string_view frame, Ack &out, std::size_t count = 0);

// The header's type, or nullopt when the frame is too short or not of this protocol.
std::optional<Type> frame_type(std::string_view frame);

// One non-blocking sendmsg of bytes with fds attached: 0, or -errno (-EAGAIN when the socket is
// full, -ETOOMANYREFS at the kernel's limit of fds in flight).
int send_frame(int fd, std::string_view bytes, std::span<const int> fds);

struct Received {
	std::size_t size = 0;           // the frame's bytes, in the caller's buffer
	std::vector<UniqueFd> fds;      // those the kernel installed here
	bool truncated = false;         // the frame was longer than the buffer (the rest is gone)
	bool fds_cut = false;           // MSG_CTRUNC: fds beyond fds.size() did not arrive (fd limit)
};
// One non-blocking recvmsg into buffer (kMaxFrameBytes): 1 with a frame, 0 at the end of the
// stream, or -errno (-EAGAIN when nothing waits).
int receive_frame(int fd, std::string &buffer, Received &out);

} // namespace proto::handoff::channel
