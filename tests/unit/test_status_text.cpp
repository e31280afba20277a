// Unit: the status text rule (docs/protocol.md), shared by the notify socket and the Worker interface.
#include "proto/status_text.hpp"

#include "proto/limits.hpp"

#include <doctest/doctest.h>

#include <string>

using proto::check_status_text;

TEST_CASE("status text: valid UTF-8 without control characters, cut on a character boundary")
{
	const std::string e_acute = "\xC3\xA9";
	std::string long_ascii(600, 'a');
	std::string long_two_byte = "a";
	for (int i = 0; i < 300; i++)
		long_two_byte += e_acute;
	struct Case {
		const char *name;
		std::string text;
		bool taken;
		std::string kept; // when taken
	};
	const Case cases[] = {
		{"plain", "serving, 12 connections", true, "serving, 12 connections"},
		{"empty", "", true, ""},
		{"UTF-8", "caf\xC3\xA9 \xE2\x9C\x93 \xF0\x9F\x9A\x80", true, "caf\xC3\xA9 \xE2\x9C\x93 \xF0\x9F\x9A\x80"},
		{"long ASCII is cut at the limit", long_ascii, true, std::string(proto::limits::kMaxStatusText, 'a')},
		{"long UTF-8 is cut before a character that would cross the limit", long_two_byte, true,
		 long_two_byte.substr(0, proto::limits::kMaxStatusText - 1)},
		{"newline", "one\ntwo", false, {}},
		{"escape sequence", "\x1B[31mred", false, {}},
		{"NUL", std::string("a\0b", 3), false, {}},
		{"DEL", "a\x7F", false, {}},
		{"C1 control (U+0085)", "a\xC2\x85", false, {}},
		{"a lone continuation byte", "a\x80", false, {}},
		{"truncated sequence", "caf\xC3", false, {}},
		{"overlong encoding", "\xC0\xAF", false, {}},
		{"surrogate", "\xED\xA0\x80", false, {}},
		{"above U+10FFFF", "\xF4\x90\x80\x80", false, {}},
		{"Latin-1", "caf\xE9", false, {}},
	};
	for (const Case &c : cases) {
		CAPTURE(c.name);
		std::string text = c.text;
		auto why = check_status_text(text);
		CHECK(!why == c.taken);
		if (c.taken)
			CHECK(text == c.kept);
		else
			CHECK(!why->empty());
	}
}
