// The state one brokerd keeps for the brokerd that follows it after a crash (issue: brokerd is no
// single point of failure): one memfd, kept where it outlives brokerd (systemd's fd store), with
// two slots written in turn. Each slot is a header and a payload; the header goes last and names
// the payload's length and checksum, so a brokerd killed in the middle of a write leaves the
// other slot whole, and the reader takes the newest whole one.
//
// Layout: slot i at offset i * kSlotSize, its 64-byte header first, the payload after it.
// Header: magic "BRKDST01", u32 format, u32 the header's own CRC-32 (taken with this field 0),
// u64 seq (1 for the first write, one more for each next), u64 payload length, u32 the payload's
// CRC-32, then zeros. Integers in the host's byte order: a state never leaves its machine.
#pragma once

#include "os/result.hpp"
#include "proto/unique_fd.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace brokerd::persist {

inline constexpr std::uint32_t kFormat = 1;
inline constexpr std::size_t kHeaderSize = 64;
// Each slot's size, header included. The memfd is sparse: only what is written takes memory.
inline constexpr std::size_t kSlotSize = std::size_t{8} << 20;
inline constexpr std::size_t kMaxPayload = kSlotSize - kHeaderSize;

// CRC-32 (the polynomial of zlib and Ethernet), as the headers use it.
std::uint32_t crc32(std::string_view bytes);

struct Loaded {
	std::string payload;
	std::uint64_t seq = 0;
};

// The newest whole slot of the state in fd (which stays open): nullopt when no slot was ever
// written (a fresh memfd), else the payload, or why the state is refused (not a brokerd state,
// another format, both slots torn), naming each slot's fault.
Result<std::optional<Loaded>> read(int fd);

class StateFile {
public:
	// A new, empty state memfd, close-on-exec.
	static Result<StateFile> create();
	// A state memfd from before (from the fd store): writes go on after its newest whole slot.
	// Refused as read() refuses it.
	static Result<StateFile> adopt(proto::UniqueFd fd);

	// Writes payload into the slot after the newest one: the payload, then the header. Returns
	// why not (too large for a slot, or the write failed); the newest whole slot is then still
	// the one before.
	std::optional<std::string> write(std::string_view payload);

	int fd() const { return fd_.get(); }
	// The last write's seq; 0 before the first.
	std::uint64_t seq() const { return seq_; }

private:
	StateFile(proto::UniqueFd fd, std::uint64_t seq) : fd_(std::move(fd)), seq_(seq) {}

	proto::UniqueFd fd_;
	std::uint64_t seq_ = 0;
};

} // namespace brokerd::persist
