// Unit tests of the reexec binary check (daemon/binary_check): `binary --check-state` runs as a
// child the loop watches; its verdict comes once, and a check dropped early leaves nothing behind.
#include "daemon/binary_check.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>

using namespace brokerd;

namespace {

struct EventLoop {
	sd_event *e = nullptr;
	EventLoop() { REQUIRE(sd_event_new(&e) >= 0); }
	~EventLoop() { sd_event_unref(e); }
};

// An executable script `text` in a directory of its own.
std::string program(const std::string &text)
{
	char dir[] = "/tmp/test-binary-check.XXXXXX";
	REQUIRE(::mkdtemp(dir) != nullptr);
	std::string path = std::string(dir) + "/brokerd";
	std::ofstream(path) << text;
	REQUIRE(::chmod(path.c_str(), 0755) == 0);
	return path;
}

// The verdict on `text` as the binary, and how many times it came; 10 s at most.
std::pair<std::optional<std::string>, int> verdict(const std::string &text, std::uint64_t bound_usec)
{
	EventLoop loop;
	int state = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
	REQUIRE(state >= 0);
	std::optional<std::string> got;
	int calls = 0;
	BinaryCheck check(loop.e, program(text), state, bound_usec, [&](const std::string &v) {
		got = v;
		++calls;
		sd_event_exit(loop.e, 0);
	});
	::close(state);
	sd_event_source *guard = nullptr;
	auto stop = [](sd_event_source *s, std::uint64_t, void *) { return sd_event_exit(sd_event_source_get_event(s), 1); };
	REQUIRE(sd_event_add_time_relative(loop.e, &guard, CLOCK_MONOTONIC, 10'000'000, 0, stop, nullptr) >= 0);
	sd_event_loop(loop.e);
	sd_event_source_disable_unref(guard);
	return {got, calls};
}

bool gone(pid_t pid)
{
	return ::kill(pid, 0) < 0 && errno == ESRCH;
}

} // namespace

TEST_CASE("binary check: the verdict on what the binary prints and how it ends")
{
	// Only the binary that never answers meets its bound; the others must be judged before the
	// loop's 10 s guard, on their own.
	constexpr std::uint64_t kNever = 60'000'000;
	struct Case {
		std::string what;
		std::string script;
		std::uint64_t bound_usec;
		std::string verdict; // "" when the binary reads the state; else what the verdict ends with
	};
	const Case cases[] = {
		{"reads this format", "#!/bin/sh\necho 1\n", kNever, ""},
		{"another format", "#!/bin/sh\necho 999\n", kNever,
		 " reads re-exec state format \"999\", this brokerd writes format 1"},
		{"fails", "#!/bin/sh\necho bad config >&2\nexit 3\n", kNever,
		 " --check-state did not run (exit 3: bad config): not a brokerd that can carry on from this one"},
		{"prints too much", "#!/bin/sh\nexec /usr/bin/yes\n", kNever,
		 " --check-state did not run (killed by a signal: y): not a brokerd that can carry on from this one"},
		{"never answers", "#!/bin/sh\nexec /bin/sleep 60\n", 300'000,
		 " --check-state did not run (killed by a signal): not a brokerd that can carry on from this one"},
	};
	for (const Case &c : cases) {
		CAPTURE(c.what);
		auto [got, calls] = verdict(c.script, c.bound_usec);
		REQUIRE(got.has_value());
		CHECK(calls == 1);
		if (c.verdict.empty())
			CHECK(*got == "");
		else
			CHECK_MESSAGE(got->ends_with(c.verdict), *got);
	}
}

TEST_CASE("binary check: a missing binary is refused at once; a check dropped early is killed and reaped")
{
	EventLoop loop;
	int calls = 0;
	auto count = [&](const std::string &) { ++calls; };
	CHECK_THROWS_WITH_AS(BinaryCheck(loop.e, "/nonexistent/brokerd", 0, 1'000'000, count),
	                     "/nonexistent/brokerd: No such file or directory", std::runtime_error);

	pid_t pid = 0;
	{
		BinaryCheck check(loop.e, program("#!/bin/sh\nexec /bin/sleep 60\n"), 0, 5'000'000, count);
		pid = check.pid();
		REQUIRE(pid > 0);
		CHECK(!gone(pid));
	}
	CHECK(gone(pid));
	CHECK(sd_event_run(loop.e, 0) >= 0);
	CHECK(calls == 0);
}
