// What the libFuzzer targets share: a finding is an abort with a message, and fd accounting.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace fuzz {

// A broken property: libFuzzer keeps the input as a crash.
[[noreturn]] inline void fail(const char *what)
{
	std::fprintf(stderr, "fuzz: %s\n", what);
	std::abort();
}

inline void check(bool ok, const char *what)
{
	if (!ok)
		fail(what);
}

// The lowest free fd number. A target that takes it before an input and again after sees the
// same number unless the input left an fd open (fds are allocated lowest first).
inline int lowest_free_fd()
{
	int fd = ::fcntl(0, F_DUPFD_CLOEXEC, 0);
	if (fd < 0)
		fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		fail("no fd to probe with");
	::close(fd);
	return fd;
}

} // namespace fuzz
