// The unit tests' leak check: how many fds this process holds.
#pragma once

#include <doctest/doctest.h>

#include <dirent.h>

#include <cstddef>

inline std::size_t open_fds()
{
	DIR *d = ::opendir("/proc/self/fd");
	REQUIRE(d);
	std::size_t n = 0;
	while (const dirent *e = ::readdir(d))
		n += e->d_name[0] != '.';
	::closedir(d);
	return n - 1; // the directory's own fd
}
