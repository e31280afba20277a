// The crash state's memfd: two slots written in turn, the newest whole one read back.
#include "daemon/persist.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

namespace brokerd::persist {

namespace {

constexpr std::string_view kMagic = "BRKDST01";

// Field offsets in a header.
constexpr std::size_t kFormatAt = 8;
constexpr std::size_t kHeaderCrcAt = 12;
constexpr std::size_t kSeqAt = 16;
constexpr std::size_t kLengthAt = 24;
constexpr std::size_t kPayloadCrcAt = 32;

using Header = std::array<char, kHeaderSize>;

// Slicing by 8: table k gives the CRC of a byte followed by k zero bytes, so that eight bytes
// cost eight lookups and no dependency between them. The crash state is written on every turn
// of the loop that changed anything, and its CRC is most of the write's own cost.
constexpr std::array<std::array<std::uint32_t, 256>, 8> crc_tables()
{
	std::array<std::array<std::uint32_t, 256>, 8> t{};
	for (std::uint32_t i = 0; i < 256; i++) {
		std::uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		t[0][i] = c;
	}
	for (std::size_t k = 1; k < t.size(); k++)
		for (std::uint32_t i = 0; i < 256; i++)
			t[k][i] = t[0][t[k - 1][i] & 0xFFu] ^ (t[k - 1][i] >> 8);
	return t;
}

template <typename T>
T field(const Header &h, std::size_t at)
{
	T v;
	std::memcpy(&v, h.data() + at, sizeof(v));
	return v;
}

template <typename T>
void set_field(Header &h, std::size_t at, T v)
{
	std::memcpy(h.data() + at, &v, sizeof(v));
}

std::uint32_t header_crc(Header h)
{
	set_field<std::uint32_t>(h, kHeaderCrcAt, 0);
	return crc32(std::string_view(h.data(), h.size()));
}

std::string errno_text(const char *what)
{
	return std::string(what) + ": " + std::strerror(errno);
}

// Reads up to n bytes at offset, fewer only at the end of the file; -1 on an error (errno set).
ssize_t read_at(int fd, char *buf, std::size_t n, off_t offset)
{
	std::size_t done = 0;
	while (done < n) {
		ssize_t r = ::pread(fd, buf + done, n - done, offset + static_cast<off_t>(done));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		if (r == 0)
			break;
		done += static_cast<std::size_t>(r);
	}
	return static_cast<ssize_t>(done);
}

bool write_at(int fd, const char *buf, std::size_t n, off_t offset)
{
	while (n > 0) {
		ssize_t r = ::pwrite(fd, buf, n, offset);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return false;
		buf += r;
		n -= static_cast<std::size_t>(r);
		offset += r;
	}
	return true;
}

// One slot: empty (never written: all zeros or past the end), whole, or why it is neither.
struct Slot {
	bool empty = false;
	std::optional<Loaded> whole;
	std::string fault;
	bool foreign = false; // not a brokerd state at all, or another format: no slot of it is read
};

Slot read_slot(int fd, unsigned index)
{
	Slot s;
	const off_t at = static_cast<off_t>(index * kSlotSize);
	Header h{};
	ssize_t n = read_at(fd, h.data(), h.size(), at);
	if (n < 0) {
		s.fault = errno_text("read");
		return s;
	}
	// Past the end, or zeros (a sparse memfd): never written.
	if (std::all_of(h.begin(), h.end(), [](char c) { return c == 0; })) {
		s.empty = true;
		return s;
	}
	const std::size_t got = static_cast<std::size_t>(n);
	if (got < kMagic.size() || std::string_view(h.data(), kMagic.size()) != kMagic) {
		s.fault = "not a brokerd state";
		s.foreign = true;
		return s;
	}
	if (got < h.size()) {
		s.fault = "its header is cut short";
		return s;
	}
	if (field<std::uint32_t>(h, kHeaderCrcAt) != header_crc(h)) {
		s.fault = "its header is torn";
		return s;
	}
	if (auto format = field<std::uint32_t>(h, kFormatAt); format != kFormat) {
		s.fault = "format " + std::to_string(format) + ", and this brokerd reads format " + std::to_string(kFormat);
		s.foreign = true;
		return s;
	}
	auto length = field<std::uint64_t>(h, kLengthAt);
	if (length > kMaxPayload) {
		s.fault = "its length " + std::to_string(length) + " is more than a slot holds";
		return s;
	}
	Loaded l;
	l.seq = field<std::uint64_t>(h, kSeqAt);
	if (l.seq == 0 || l.seq % 2 != index) {
		s.fault = "its seq " + std::to_string(l.seq) + " is not one this slot is written with";
		return s;
	}
	l.payload.resize(static_cast<std::size_t>(length));
	n = read_at(fd, l.payload.data(), l.payload.size(), at + static_cast<off_t>(kHeaderSize));
	if (n < 0) {
		s.fault = errno_text("read");
		return s;
	}
	if (static_cast<std::size_t>(n) < l.payload.size()) {
		s.fault = "its payload is cut short";
		return s;
	}
	if (crc32(l.payload) != field<std::uint32_t>(h, kPayloadCrcAt)) {
		s.fault = "its payload is torn";
		return s;
	}
	s.whole = std::move(l);
	return s;
}

} // namespace

std::uint32_t crc32(std::string_view bytes)
{
	static constexpr auto t = crc_tables();
	auto byte = [&](std::size_t i) { return static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])); };
	std::uint32_t c = 0xFFFFFFFFu;
	std::size_t i = 0;
	for (; i + 8 <= bytes.size(); i += 8) {
		std::uint32_t lo = c ^ (byte(i) | byte(i + 1) << 8 | byte(i + 2) << 16 | byte(i + 3) << 24);
		c = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
		    t[3][byte(i + 4)] ^ t[2][byte(i + 5)] ^ t[1][byte(i + 6)] ^ t[0][byte(i + 7)];
	}
	for (; i < bytes.size(); i++)
		c = t[0][(c ^ byte(i)) & 0xFFu] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

Result<std::optional<Loaded>> read(int fd)
{
	std::array<Slot, 2> slots{read_slot(fd, 0), read_slot(fd, 1)};
	for (unsigned i = 0; i < slots.size(); i++)
		if (slots[i].foreign)
			return Failure{"slot " + std::to_string(i) + ": " + slots[i].fault};
	const Loaded *newest = nullptr;
	for (const Slot &s : slots)
		if (s.whole && (!newest || s.whole->seq > newest->seq))
			newest = &*s.whole;
	if (newest)
		return std::optional<Loaded>(*newest);
	if (slots[0].empty && slots[1].empty)
		return std::optional<Loaded>();
	std::string why = "no whole slot";
	for (unsigned i = 0; i < slots.size(); i++)
		why += "; slot " + std::to_string(i) + ": " + (slots[i].empty ? std::string("never written") : slots[i].fault);
	return Failure{why};
}

Result<StateFile> StateFile::create()
{
	proto::UniqueFd fd(::memfd_create("brokerd-state", MFD_CLOEXEC));
	if (!fd)
		return Failure{errno_text("memfd_create")};
	if (::ftruncate(fd.get(), static_cast<off_t>(2 * kSlotSize)) < 0)
		return Failure{errno_text("ftruncate")};
	return StateFile(std::move(fd), 0);
}

Result<StateFile> StateFile::adopt(proto::UniqueFd fd)
{
	auto loaded = read(fd.get());
	if (auto *f = std::get_if<Failure>(&loaded))
		return *f;
	const auto &newest = std::get<std::optional<Loaded>>(loaded);
	if (::ftruncate(fd.get(), static_cast<off_t>(2 * kSlotSize)) < 0)
		return Failure{errno_text("ftruncate")};
	return StateFile(std::move(fd), newest ? newest->seq : 0);
}

std::optional<std::string> StateFile::write(std::string_view payload)
{
	if (payload.size() > kMaxPayload)
		return "the state is " + std::to_string(payload.size()) + " bytes, more than a slot holds (" +
		       std::to_string(kMaxPayload) + ")";
	const std::uint64_t seq = seq_ + 1;
	const off_t at = static_cast<off_t>((seq % 2) * kSlotSize);
	if (!write_at(fd_.get(), payload.data(), payload.size(), at + static_cast<off_t>(kHeaderSize)))
		return errno_text("write");
	Header h{};
	std::memcpy(h.data(), kMagic.data(), kMagic.size());
	set_field<std::uint32_t>(h, kFormatAt, kFormat);
	set_field<std::uint64_t>(h, kSeqAt, seq);
	set_field<std::uint64_t>(h, kLengthAt, payload.size());
	set_field<std::uint32_t>(h, kPayloadCrcAt, crc32(payload));
	set_field<std::uint32_t>(h, kHeaderCrcAt, header_crc(h));
	if (!write_at(fd_.get(), h.data(), h.size(), at))
		return errno_text("write");
	seq_ = seq;
	return std::nullopt;
}

} // namespace brokerd::persist
