// The rule for a worker's status text, for the notify socket's STATUS= and the Worker interface alike.
#include "proto/status_text.hpp"

#include "proto/limits.hpp"

#include <cstdint>

namespace proto {

namespace {

// The length of the UTF-8 sequence at `at` and its code point, or 0 when it is not valid
// (truncated, overlong, a surrogate, above U+10FFFF).
std::size_t decode(const std::string &s, std::size_t at, std::uint32_t &cp)
{
	auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
	unsigned char b = byte(at);
	std::size_t len = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
	if (len == 0 || at + len > s.size())
		return 0;
	cp = len == 1 ? b : len == 2 ? b & 0x1F : len == 3 ? b & 0x0F : b & 0x07;
	for (std::size_t i = 1; i < len; i++) {
		if ((byte(at + i) & 0xC0) != 0x80)
			return 0;
		cp = (cp << 6) | (byte(at + i) & 0x3F);
	}
	static constexpr std::uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
	if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return 0;
	return len;
}

} // namespace

std::optional<std::string> check_status_text(std::string &text)
{
	std::size_t cut = text.size();
	for (std::size_t at = 0; at < text.size();) {
		std::uint32_t cp = 0;
		std::size_t len = decode(text, at, cp);
		if (len == 0)
			return "not valid UTF-8 at byte " + std::to_string(at);
		if (cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp <= 0x9F))
			return "control character at byte " + std::to_string(at);
		if (at + len > limits::kMaxStatusText && cut == text.size())
			cut = at;
		at += len;
	}
	text.resize(cut);
	return std::nullopt;
}

} // namespace proto
