// The broker's side of a worker connection, faked for libbroker-client's unit tests: NUL-framed
// JSON over a real AF_UNIX socket, fds passed with SCM_RIGHTS both ways.
#pragma once

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace broker_test {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Everything in a test waits for an event, bounded by this.
inline constexpr auto kTimeout = 10s;

// A tiny owning fd for the test side (the project's UniqueFd is private to the library).
class Fd {
public:
	Fd() = default;
	explicit Fd(int fd) : fd_(fd) {}
	Fd(Fd &&o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
	Fd &operator=(Fd &&o) noexcept
	{
		reset(std::exchange(o.fd_, -1));
		return *this;
	}
	~Fd() { reset(); }
	int get() const { return fd_; }
	int release() { return std::exchange(fd_, -1); }
	void reset(int fd = -1)
	{
		if (fd_ >= 0)
			::close(fd_);
		fd_ = fd;
	}

private:
	int fd_ = -1;
};

inline int ms_left(Clock::time_point deadline)
{
	auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
	return left > 0 ? static_cast<int>(left) : 0;
}

// Polls one fd until it reports `events` or the deadline passes.
inline bool wait_for(int fd, short events, Clock::time_point deadline)
{
	for (;;) {
		pollfd p{fd, events, 0};
		int r = ::poll(&p, 1, ms_left(deadline));
		if (r > 0)
			return true;
		if (r == 0)
			return false;
		if (errno != EINTR)
			return false;
	}
}

// This process's fd table: how many fds it has room for (FDSize in /proc/self/status).
inline long fd_table_size()
{
	std::ifstream status("/proc/self/status");
	std::string line;
	while (std::getline(status, line))
		if (line.rfind("FDSize:", 0) == 0)
			return std::stol(line.substr(7));
	return -1;
}

// An abstract AF_UNIX address unique to this process and call.
inline std::string abstract_name(const char *what)
{
	static int n = 0;
	return "@broker-test-client-" + std::to_string(::getpid()) + "-" + what + "-" + std::to_string(n++);
}

inline sockaddr_un unix_address(const std::string &name, socklen_t &len)
{
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path, name.data(), name.size());
	sa.sun_path[0] = '\0';
	len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
	return sa;
}

inline Fd bind_abstract(int type, const std::string &name)
{
	Fd fd(::socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
	REQUIRE(fd.get() >= 0);
	socklen_t len;
	sockaddr_un sa = unix_address(name, len);
	REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&sa), len) == 0);
	if (type == SOCK_STREAM)
		REQUIRE(::listen(fd.get(), 16) == 0);
	return fd;
}

inline Fd connect_abstract(const std::string &name)
{
	Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	REQUIRE(fd.get() >= 0);
	socklen_t len;
	sockaddr_un sa = unix_address(name, len);
	REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), len) == 0);
	return fd;
}

// The broker's side of one worker connection: NUL-framed JSON, fds with the first byte. The
// try_ methods report failure instead of asserting, for use off the test's own thread.
class FakeBroker {
public:
	static constexpr std::size_t kMaxFds = 253; // SCM_MAX_FD

	explicit FakeBroker(const std::string &name) : listen_(bind_abstract(SOCK_STREAM, name)) {}

	bool accept(Clock::time_point deadline)
	{
		if (!wait_for(listen_.get(), POLLIN, deadline))
			return false;
		conn_ = Fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
		return conn_.get() >= 0;
	}

	// The next message, or null at end of stream or when the deadline passes. The fds that
	// came with it are kept (see take_fds()).
	json receive(Clock::time_point deadline)
	{
		for (;;) {
			auto nul = buf_.find('\0');
			if (nul != std::string::npos) {
				json j = json::parse(buf_.substr(0, nul));
				buf_.erase(0, nul + 1);
				return j;
			}
			if (read_some(65536, deadline) == 0)
				return nullptr;
		}
	}

	// One read of at most `max` bytes into the message buffer, once the socket has any: how many
	// bytes came, 0 at end of stream, on error or when the deadline passes.
	std::size_t read_some(std::size_t max, Clock::time_point deadline)
	{
		for (;;) {
			if (!wait_for(conn_.get(), POLLIN, deadline))
				return 0;
			std::string tmp(max, '\0');
			alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
			iovec iov{tmp.data(), tmp.size()};
			msghdr msg{};
			msg.msg_iov = &iov;
			msg.msg_iovlen = 1;
			msg.msg_control = control;
			msg.msg_controllen = sizeof(control);
			ssize_t n = ::recvmsg(conn_.get(), &msg, MSG_CMSG_CLOEXEC);
			if (n < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			for (cmsghdr *c = CMSG_FIRSTHDR(&msg); n >= 0 && c; c = CMSG_NXTHDR(&msg, c)) {
				if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
					continue;
				std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (std::size_t i = 0; i < count; i++) {
					int fd;
					std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					fds_.emplace_back(fd);
				}
			}
			if (n <= 0)
				return 0;
			buf_.append(tmp.data(), static_cast<std::size_t>(n));
			return static_cast<std::size_t>(n);
		}
	}

	// The fds received so far, in order; the caller owns them now.
	std::vector<Fd> take_fds() { return std::exchange(fds_, {}); }

	// Writes raw bytes, the fds attached to the first one, whole or not at all by the deadline.
	bool try_send_raw(const std::string &data, const std::vector<int> &fds, Clock::time_point deadline)
	{
		if (fds.size() > kMaxFds)
			return false;
		std::size_t off = 0;
		while (off < data.size()) {
			iovec iov{const_cast<char *>(data.data()) + off, data.size() - off};
			msghdr msg{};
			msg.msg_iov = &iov;
			msg.msg_iovlen = 1;
			alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
			if (off == 0 && !fds.empty()) {
				msg.msg_control = control;
				msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
				cmsghdr *c = CMSG_FIRSTHDR(&msg);
				c->cmsg_level = SOL_SOCKET;
				c->cmsg_type = SCM_RIGHTS;
				c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
				std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
			}
			ssize_t n = ::sendmsg(conn_.get(), &msg, MSG_NOSIGNAL);
			if (n < 0 && errno == EAGAIN) {
				// The worker runs on this thread too: it cannot make room, so wait only so long.
				if (!wait_for(conn_.get(), POLLOUT, deadline))
					return false;
				continue;
			}
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return false;
			off += static_cast<std::size_t>(n);
		}
		return true;
	}

	bool try_send(const json &body, const std::vector<int> &fds = {})
	{
		std::string data = body.dump();
		data.push_back('\0');
		return try_send_raw(data, fds, Clock::now() + kTimeout);
	}

	void send(const json &body, const std::vector<int> &fds = {}) { REQUIRE(try_send(body, fds)); }

	// An event on the worker's Events stream.
	void event(const json &parameters, const std::vector<int> &fds = {})
	{
		send({{"parameters", parameters}, {"continues", true}}, fds);
	}

	int conn() const { return conn_.get(); }
	int listener() const { return listen_.get(); }
	void close() { conn_.reset(); }
	// brokerd killed: its connection and its listening socket go, and the address is free for
	// another FakeBroker (the restarted brokerd).
	void go_away()
	{
		conn_.reset();
		listen_.reset();
		buf_.clear();
		fds_.clear();
	}
	// A connection waiting in the listener's backlog: someone called connect().
	bool knocked() const
	{
		pollfd p{listen_.get(), POLLIN, 0};
		return ::poll(&p, 1, 0) > 0;
	}

private:
	Fd listen_;
	Fd conn_;
	std::string buf_;
	std::vector<Fd> fds_;
};

} // namespace broker_test
