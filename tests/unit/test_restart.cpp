// The restart backoff and the crash-loop rule as a table: how a slot's failures are spaced, and when it stops.
#include "supervisor/restart.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

using brokerd::RestartBackoff;

namespace {

constexpr std::uint64_t kMs = 1000;
constexpr std::uint64_t kSec = 1000 * kMs;

// A slot whose every attempt fails `runs` after it starts (a crash, or the start timeout of a
// worker that never gets ready), and which restarts `spawn` after the delay it is given.
struct Case {
	const char *name;
	std::uint64_t start_timeout; // what the rule is told (0: ready "exec", no start timeout)
	std::uint64_t runs;
	std::uint64_t spawn;
	std::size_t attempts; // until the crash loop stops it; 0: never within 50 failures
	std::vector<std::uint64_t> delays; // the first restarts' delays
};

} // namespace

TEST_CASE("restart: a slot that keeps failing is stopped after 6 failures, however long its attempts")
{
	const Case cases[] = {
		{"crashes at once", 0, 0, 0, 6, {100 * kMs, 200 * kMs, 400 * kMs, 800 * kMs, 1600 * kMs}},
		{"crashes after 5s", 0, 5 * kSec, 10 * kMs, 6, {100 * kMs, 200 * kMs, 400 * kMs}},
		{"start timeout 300ms", 300 * kMs, 300 * kMs, 10 * kMs, 6, {100 * kMs, 200 * kMs}},
		// The audit's case: every attempt ends at its start timeout, 15 s apart and more; a 60 s
		// window never held 6 of them, and the slot restarted forever.
		{"start timeout 12s", 12 * kSec, 12 * kSec, 10 * kMs, 6, {}},
		{"start timeout 15s", 15 * kSec, 15 * kSec, 10 * kMs, 6, {}},
		{"start timeout 30s (default)", 30 * kSec, 30 * kSec, 50 * kMs, 6, {}},
		{"start timeout 10m", 600 * kSec, 600 * kSec, 1 * kSec, 6, {}},
		// A slow crash is no loop: a worker that serves 20 s between crashes restarts for ever,
		// its backoff capped at 30 s.
		{"crashes after 20s", 0, 20 * kSec, 10 * kMs, 0, {100 * kMs, 200 * kMs, 400 * kMs}},
	};
	for (const auto &c : cases) {
		INFO(c.name);
		RestartBackoff b;
		std::uint64_t now = 1000 * kSec;
		std::size_t attempts = 0;
		std::vector<std::uint64_t> delays;
		RestartBackoff::Decision d;
		while (attempts < 50) {
			now += c.runs;
			attempts++;
			d = b.failed(now, c.start_timeout);
			if (d.crash_loop)
				break;
			CHECK(d.delay <= RestartBackoff::kMaxDelay);
			delays.push_back(d.delay);
			now += d.delay + c.spawn;
		}
		CHECK(attempts == (c.attempts ? c.attempts : 50));
		CHECK(d.crash_loop == (c.attempts != 0));
		if (d.crash_loop) {
			CHECK(d.failures == RestartBackoff::kBurst + 1);
			CHECK(d.window == RestartBackoff::window(c.start_timeout));
		}
		delays.resize(std::min(delays.size(), c.delays.size()));
		CHECK(delays == c.delays);
	}
}

TEST_CASE("restart: a stable run resets the backoff, and old failures leave the window")
{
	RestartBackoff b;
	std::uint64_t now = 1000 * kSec;
	for (std::uint64_t want : {100 * kMs, 200 * kMs, 400 * kMs}) {
		auto d = b.failed(now, 0);
		CHECK(d.delay == want);
		now += d.delay;
	}
	CHECK(b.has_failed());
	// Ready, but not for long: the backoff goes on doubling.
	b.ready(now);
	now += RestartBackoff::kStableRun - 1;
	CHECK(b.failed(now, 0).delay == 800 * kMs);
	// Ready for a stable run: it starts again from the shortest delay.
	b.ready(now);
	now += RestartBackoff::kStableRun;
	auto d = b.failed(now, 0);
	CHECK(d.delay == 100 * kMs);
	CHECK(d.failures == 5);
	// Once the window has passed, only the new failure counts.
	now += RestartBackoff::window(0) + 1;
	d = b.failed(now, 0);
	CHECK(d.failures == 1);
	CHECK(!d.crash_loop);
	// The window grows by the burst's start timeouts.
	CHECK(RestartBackoff::window(0) == RestartBackoff::kWindow);
	CHECK(RestartBackoff::window(15 * kSec) == RestartBackoff::kWindow + RestartBackoff::kBurst * 15 * kSec);
}
