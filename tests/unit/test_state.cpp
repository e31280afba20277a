// Unit tests of the re-exec state reader (state::read and state::check, as `brokerd
// --check-state` runs them): whatever the bytes, a refusal is a runtime_error that says why.
#include "daemon/state.hpp"

#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <stdexcept>
#include <string>

using namespace brokerd;

namespace {

// What --check-state prints for these bytes: the refusal, or "ok".
std::string check_text(const std::string &bytes)
{
	int fd = ::memfd_create("test-state", MFD_CLOEXEC);
	REQUIRE(fd >= 0);
	REQUIRE(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
	try {
		state::check(state::read(fd));
	} catch (const std::runtime_error &e) {
		return e.what();
	}
	return "ok";
}

} // namespace

TEST_CASE("a state brokerd cannot read is refused with a message")
{
	struct Case {
		std::string bytes;
		std::string message;
	};
	const Case cases[] = {
		{"", "re-exec state: not a JSON object"},
		{"[1]", "re-exec state: not a JSON object"},
		{R"({"format": 2})", "re-exec state: format 2, this brokerd reads format 1"},
		{R"({})", "re-exec state: no format, this brokerd reads format 1"},
		// Found by fuzzing: a mistyped format escaped as nlohmann's type_error.
		{R"({"format": "1"})", "re-exec state: no format, this brokerd reads format 1"},
		{R"({"format": 1.5})", "re-exec state: no format, this brokerd reads format 1"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.bytes);
		CHECK(check_text(c.bytes) == c.message);
	}
}
