// Unit tests of the notify datagram's grammar (take_notify_line), line by line.
#include "os/notify.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace brokerd;
using Kind = NotifyLine::Kind;

TEST_CASE("a notify datagram reads as sd_notify writes it")
{
	struct Line {
		Kind kind;
		std::string value;
		bool operator==(const Line &) const = default;
	};
	struct Case {
		std::string datagram;
		std::vector<Line> lines;
	};
	const Case cases[] = {
		{"READY=1", {{Kind::Ready, ""}}},
		{"READY=1\nSTATUS=serving 3\n", {{Kind::Ready, ""}, {Kind::Status, "serving 3"}}},
		{"STATUS=\nSTOPPING=1", {{Kind::Status, ""}, {Kind::Stopping, ""}}},
		{"MAINPID=4242", {{Kind::MainPid, "4242"}}},
		{"READY=0\nWATCHDOG=1\n\nready=1", {{Kind::Other, ""}, {Kind::Other, ""}, {Kind::Other, ""}, {Kind::Other, ""}}},
		{"STATUS=a=b\rc", {{Kind::Status, "a=b\rc"}}},
	};
	for (const Case &c : cases) {
		CAPTURE(c.datagram);
		std::string_view text = c.datagram;
		std::vector<Line> got;
		while (!text.empty()) {
			NotifyLine line = take_notify_line(text);
			got.push_back({line.kind, std::string(line.value)});
		}
		CHECK(got == c.lines);
	}
}
