// Runtime skips for the doctest programs: a check that cannot run here says why, and is not a pass.
#pragma once

#include <string>

// Records that the running test case left a check out, and why; the case goes on. The program
// then exits 77, meson's SKIP, unless a case failed (tests/doctest_main.cpp prints every reason).
// A case that can skip is a meson test of its own (`--test-case=`), so that its SKIP does not
// hide the passes of the program's other cases.
void record_skip(const std::string &reason);

// Records the skip and leaves the test case: a return from the TEST_CASE body (inside a SUBCASE,
// from the whole case; not usable inside a lambda).
#define TEST_SKIP(reason) \
	do { \
		::record_skip(reason); \
		return; \
	} while (0)
