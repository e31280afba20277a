// UniqueFd: the one owning file-descriptor type. Everything else borrows a plain int.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace proto {

// Where fds from a peer go when dropped. Null (the library's case): closed inline. brokerd sets
// its closer thread here (broker/closer.hpp), as such a close can block its event loop.
inline void (*peer_fd_closer)(int fd) noexcept = nullptr;

class UniqueFd {
public:
	UniqueFd() = default;
	explicit UniqueFd(int fd) noexcept : fd_(fd) {}
	// An fd a peer gave us (SCM_RIGHTS), or a socket peers can queue fds on: its last close()
	// may block for as long as the peer likes (a TCP socket lingering on unsent data, a file on
	// FUSE, in-flight fds of the same kind), so it closes through peer_fd_closer. Moves keep
	// the mark; release() drops it.
	static UniqueFd from_peer(int fd) noexcept
	{
		UniqueFd u(fd);
		u.peer_ = fd >= 0;
		return u;
	}
	UniqueFd(UniqueFd &&o) noexcept : fd_(std::exchange(o.fd_, -1)), peer_(std::exchange(o.peer_, false)) {}
	UniqueFd &operator=(UniqueFd &&o) noexcept
	{
		if (this != &o) {
			reset();
			fd_ = std::exchange(o.fd_, -1);
			peer_ = std::exchange(o.peer_, false);
		}
		return *this;
	}
	UniqueFd(const UniqueFd &) = delete;
	UniqueFd &operator=(const UniqueFd &) = delete;
	~UniqueFd() { reset(); }

	int get() const noexcept { return fd_; }
	bool valid() const noexcept { return fd_ >= 0; }
	explicit operator bool() const noexcept { return valid(); }

	bool is_from_peer() const noexcept { return peer_; }

	[[nodiscard]] int release() noexcept
	{
		peer_ = false;
		return std::exchange(fd_, -1);
	}

	void reset(int fd = -1) noexcept
	{
		int old = std::exchange(fd_, fd);
		bool peer = std::exchange(peer_, false);
		if (old < 0)
			return;
		if (peer && peer_fd_closer)
			peer_fd_closer(old);
		else
			::close(old);
	}

private:
	int fd_ = -1;
	bool peer_ = false;
};

// Closes each of `fds`, owned plain fds (not from a peer): sorted, each run of consecutive numbers
// in one close_range(), which spares a system call per fd. A sender closes its copy of every
// connection it handed off, and a draining server's connections have mostly consecutive numbers.
// A run holds only fds of the list, so nothing else closes.
inline void close_all(std::vector<int> &fds) noexcept
{
	std::sort(fds.begin(), fds.end());
	for (std::size_t i = 0; i < fds.size();) {
		std::size_t j = i;
		while (j + 1 < fds.size() && fds[j + 1] <= fds[j] + 1)
			j++;
		if (fds[i] < 0 || j == i ||
		    ::close_range(static_cast<unsigned>(fds[i]), static_cast<unsigned>(fds[j]), 0) < 0)
			for (std::size_t k = i; k <= j; k++)
				if (fds[k] >= 0 && (k == i || fds[k] != fds[k - 1]))
					::close(fds[k]); // one alone, or a kernel without close_range (before 5.9)
		i = j + 1;
	}
	fds.clear();
}

} // namespace proto
