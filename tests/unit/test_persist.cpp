// The crash state's memfd (daemon/persist.*): written in turn into two slots, the newest whole
// one read back, a torn write falling back to the slot before, and anything else refused with
// what is wrong.
#include "daemon/persist.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>

using namespace brokerd;
using namespace brokerd::persist;

namespace {

persist::StateFile fresh()
{
	auto created = StateFile::create();
	REQUIRE(std::holds_alternative<StateFile>(created));
	return std::move(std::get<StateFile>(created));
}

// What read() makes of fd: the newest payload, "(empty)", or "refused: why".
std::string read_back(int fd)
{
	auto r = persist::read(fd);
	if (auto *f = std::get_if<Failure>(&r))
		return "refused: " + f->why;
	const auto &loaded = std::get<std::optional<Loaded>>(r);
	return loaded ? loaded->payload : "(empty)";
}

std::uint64_t seq_read(int fd)
{
	auto r = persist::read(fd);
	REQUIRE(std::holds_alternative<std::optional<Loaded>>(r));
	REQUIRE(std::get<std::optional<Loaded>>(r));
	return std::get<std::optional<Loaded>>(r)->seq;
}

void poke(int fd, off_t at, char c)
{
	REQUIRE(::pwrite(fd, &c, 1, at) == 1);
}

} // namespace

TEST_CASE("persist: the CRC-32 is zlib's")
{
	CHECK(crc32("") == 0u);
	CHECK(crc32("123456789") == 0xCBF43926u);
	CHECK(crc32("The quick brown fox jumps over the lazy dog") == 0x414FA339u);
}

TEST_CASE("persist: the CRC-32 of every length and alignment is the bit-by-bit one")
{
	auto bitwise = [](std::string_view bytes) {
		std::uint32_t c = 0xFFFFFFFFu;
		for (char b : bytes) {
			c ^= static_cast<unsigned char>(b);
			for (int k = 0; k < 8; k++)
				c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		}
		return c ^ 0xFFFFFFFFu;
	};
	std::string text;
	for (int i = 0; i < 100; i++)
		text += static_cast<char>(i * 37 + 11); // every byte value's high bit, too
	for (std::size_t from = 0; from < 9; from++)
		for (std::size_t n = 0; from + n <= text.size(); n++) {
			std::string_view part = std::string_view(text).substr(from, n);
			CAPTURE(from);
			CAPTURE(n);
			REQUIRE(crc32(part) == bitwise(part));
		}
}

TEST_CASE("persist: each write goes to the other slot, and the newest whole one is read back")
{
	StateFile f = fresh();
	CHECK(read_back(f.fd()) == "(empty)");
	for (std::string payload : {"{\"a\":1}", "{\"b\":22}", "{\"c\":333}", ""}) {
		REQUIRE_FALSE(f.write(payload));
		CHECK(read_back(f.fd()) == payload);
		CHECK(seq_read(f.fd()) == f.seq());
	}
	CHECK(f.seq() == 4);
}

TEST_CASE("persist: a write cut short leaves the slot before it, whatever part of it was torn")
{
	for (const char *torn : {"payload", "header", "length"}) {
		CAPTURE(torn);
		StateFile f = fresh();
		REQUIRE_FALSE(f.write("first"));
		REQUIRE_FALSE(f.write("second")); // seq 2, slot 0
		const off_t slot0 = 0;
		if (std::string(torn) == "payload")
			poke(f.fd(), slot0 + static_cast<off_t>(kHeaderSize) + 2, 'X');
		else if (std::string(torn) == "header")
			poke(f.fd(), slot0 + 17, 0x7f); // inside seq
		else
			poke(f.fd(), slot0 + 24, 3); // the length, as if the header were half written
		CHECK(read_back(f.fd()) == "first");
		CHECK(seq_read(f.fd()) == 1);
	}
}

TEST_CASE("persist: a state with no whole slot, another format or other bytes is refused, saying why")
{
	SUBCASE("both slots torn")
	{
		StateFile f = fresh();
		REQUIRE_FALSE(f.write("first"));
		REQUIRE_FALSE(f.write("second"));
		poke(f.fd(), static_cast<off_t>(kHeaderSize), 'X');
		poke(f.fd(), static_cast<off_t>(kSlotSize + kHeaderSize), 'X');
		CHECK(read_back(f.fd()) ==
		      "refused: no whole slot; slot 0: its payload is torn; slot 1: its payload is torn");
	}
	SUBCASE("only a torn one")
	{
		StateFile f = fresh();
		REQUIRE_FALSE(f.write("first"));
		poke(f.fd(), static_cast<off_t>(kSlotSize + 20), 1);
		CHECK(read_back(f.fd()) == "refused: no whole slot; slot 0: never written; slot 1: its header is torn");
	}
	SUBCASE("another format")
	{
		StateFile f = fresh();
		REQUIRE_FALSE(f.write("first"));
		// A later brokerd's header: format 2, its own CRC right.
		char h[kHeaderSize];
		REQUIRE(::pread(f.fd(), h, sizeof(h), static_cast<off_t>(kSlotSize)) == static_cast<ssize_t>(sizeof(h)));
		std::uint32_t format = 2, zero = 0;
		std::memcpy(h + 8, &format, 4);
		std::memcpy(h + 12, &zero, 4);
		std::uint32_t crc = crc32(std::string_view(h, sizeof(h)));
		std::memcpy(h + 12, &crc, 4);
		REQUIRE(::pwrite(f.fd(), h, sizeof(h), static_cast<off_t>(kSlotSize)) == static_cast<ssize_t>(sizeof(h)));
		CHECK(read_back(f.fd()) == "refused: slot 1: format 2, and this brokerd reads format 1");
		// It is not written over either.
		CHECK(std::holds_alternative<Failure>(StateFile::adopt(proto::UniqueFd(::dup(f.fd())))));
	}
	SUBCASE("other bytes")
	{
		proto::UniqueFd fd(::memfd_create("not-a-state", MFD_CLOEXEC));
		REQUIRE(::write(fd.get(), "{\"services\":[]}", 15) == 15);
		CHECK(read_back(fd.get()) == "refused: slot 0: not a brokerd state");
	}
	SUBCASE("an empty file is no state yet")
	{
		proto::UniqueFd fd(::memfd_create("empty", MFD_CLOEXEC));
		CHECK(read_back(fd.get()) == "(empty)");
	}
}

TEST_CASE("persist: a state too large for a slot is not written, and the one before stays")
{
	StateFile f = fresh();
	REQUIRE_FALSE(f.write("small"));
	auto why = f.write(std::string(kMaxPayload + 1, 'x'));
	REQUIRE(why);
	CHECK(why->find("more than a slot holds") != std::string::npos);
	CHECK(read_back(f.fd()) == "small");
	CHECK(f.seq() == 1);
	REQUIRE_FALSE(f.write(std::string(kMaxPayload, 'y')));
	CHECK(read_back(f.fd()).size() == kMaxPayload);
}

TEST_CASE("persist: an adopted state goes on after its newest slot")
{
	StateFile f = fresh();
	REQUIRE_FALSE(f.write("one"));
	REQUIRE_FALSE(f.write("two"));
	REQUIRE_FALSE(f.write("three"));
	auto adopted = StateFile::adopt(proto::UniqueFd(::dup(f.fd())));
	REQUIRE(std::holds_alternative<StateFile>(adopted));
	StateFile &next = std::get<StateFile>(adopted);
	CHECK(next.seq() == 3);
	REQUIRE_FALSE(next.write("four"));
	CHECK(read_back(next.fd()) == "four");
	// "three" is still whole in the other slot: a write torn now falls back to it.
	poke(next.fd(), static_cast<off_t>(kHeaderSize), 'X');
	CHECK(read_back(next.fd()) == "three");
}
