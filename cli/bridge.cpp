// brokerctl bridge: the far end of `brokerctl -H`, run by ssh. It copies bytes both ways between
// its standard input and output and brokerd's control socket, and never reads the messages.
#include "remote.hpp"

#include "errors.hpp"

#include "proto/sync_client.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

namespace brokerctl {

namespace {

// Bytes waiting in each direction: what one read may bring before the other side takes it.
constexpr std::size_t kBridgeBuffer = 64 * 1024;

// As many fds as one message may carry (SCM_MAX_FD): all of them are seen, and closed.
constexpr std::size_t kMaxFdsSeen = 253;

struct Buffer {
	std::array<char, kBridgeBuffer> data;
	std::size_t begin = 0, end = 0;
	bool eof = false; // the source has ended; once empty, so has this direction

	bool empty() const { return begin == end; }
	bool room() const { return end < data.size(); }
	void taken(std::size_t n)
	{
		begin += n;
		if (begin == end)
			begin = end = 0;
	}
};

[[noreturn]] void fail(const std::string &what)
{
	throw Failure(kExitFailure, "bridge: " + what);
}

bool transient(int e)
{
	return e == EINTR || e == EAGAIN || e == EWOULDBLOCK;
}

// Reads brokerd's bytes. Any fd that came with them is closed at once, and ends the bridge: it
// cannot be passed on, and the message it belongs to would mean something else without it.
void receive(int sock, Buffer &down)
{
	iovec iov{down.data.data() + down.end, down.data.size() - down.end};
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsSeen)];
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control;
	msg.msg_controllen = sizeof(control);
	ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	if (n < 0) {
		if (transient(errno))
			return;
		if (errno == ECONNRESET) {
			down.eof = true;
			return;
		}
		fail(std::string("reading from brokerd: ") + std::strerror(errno));
	}
	bool fds = (msg.msg_flags & MSG_CTRUNC) != 0;
	for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		fds = true;
		std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (std::size_t i = 0; i < count; ++i) {
			int fd;
			std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			::close(fd);
		}
	}
	if (fds)
		fail("brokerd sent file descriptors, which cannot cross a bridge");
	if (n == 0)
		down.eof = true;
	down.end += static_cast<std::size_t>(n);
}

} // namespace

int run_bridge(const std::string &socket, std::chrono::milliseconds timeout)
{
	// A closed channel is an EPIPE to handle, not a signal that ends the bridge without a word.
	::signal(SIGPIPE, SIG_IGN);
	std::unique_ptr<proto::varlink::SyncClient> client;
	try {
		client = std::make_unique<proto::varlink::SyncClient>(socket, timeout);
	} catch (const proto::varlink::Error &e) {
		throw connect_failure(e, socket);
	}
	const int sock = client->stream().fd(); // non-blocking; brokerd's replies are read here only

	Buffer up, down; // up: standard input to brokerd; down: brokerd to standard output
	bool shut = false;
	for (;;) {
		// brokerctl closed its end: brokerd hears it once what it sent has gone on.
		if (up.eof && up.empty() && !shut) {
			::shutdown(sock, SHUT_WR);
			shut = true;
		}
		// brokerd closed the connection, and standard output has had all of it.
		if (down.eof && down.empty())
			return kExitOk;

		std::array<pollfd, 3> p{};
		p[0] = {!up.eof && up.room() ? STDIN_FILENO : -1, POLLIN, 0};
		p[1] = {sock, static_cast<short>((!down.eof && down.room() ? POLLIN : 0) | (!up.empty() ? POLLOUT : 0)), 0};
		if (p[1].events == 0)
			p[1].fd = -1; // else a hang-up, reported whatever is asked, would spin this loop
		p[2] = {!down.empty() ? STDOUT_FILENO : -1, POLLOUT, 0};
		if (::poll(p.data(), p.size(), -1) < 0) {
			if (errno == EINTR)
				continue;
			fail(std::string("poll: ") + std::strerror(errno));
		}

		if (p[0].revents) {
			ssize_t n = ::read(STDIN_FILENO, up.data.data() + up.end, up.data.size() - up.end);
			if (n > 0)
				up.end += static_cast<std::size_t>(n);
			else if (n == 0 || !transient(errno))
				up.eof = true; // brokerctl is gone, or its channel failed: the same end
		}
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR))
			if (!down.eof && down.room())
				receive(sock, down);
		if ((p[1].revents & (POLLOUT | POLLERR | POLLHUP)) && !up.empty()) {
			ssize_t n = ::send(sock, up.data.data() + up.begin, up.end - up.begin, MSG_NOSIGNAL | MSG_DONTWAIT);
			if (n > 0)
				up.taken(static_cast<std::size_t>(n));
			else if (n < 0 && !transient(errno)) {
				// brokerd went away: what was still to send goes nowhere, and its close follows.
				up.taken(up.end - up.begin);
				up.eof = true;
			}
		}
		if (p[2].revents && !down.empty()) {
			ssize_t n = ::write(STDOUT_FILENO, down.data.data() + down.begin, down.end - down.begin);
			if (n > 0)
				down.taken(static_cast<std::size_t>(n));
			else if (n < 0 && !transient(errno))
				return kExitFailure; // brokerctl's end is gone; there is no one left to tell
		}
	}
}

} // namespace brokerctl
