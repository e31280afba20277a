// Unit tests of broker/os/socket_stats: accept queues of TCP and unix listeners, and drops.
#include "os/socket_stats.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using brokerd::QueueStats;
using brokerd::queue_stats;
using proto::UniqueFd;

namespace {

// Polls until `done` holds or 5 s pass: the kernel completes loopback handshakes in softirq.
bool until(const std::function<bool()> &done)
{
	auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
	while (!done()) {
		if (std::chrono::steady_clock::now() >= deadline)
			return false;
		::usleep(1000);
	}
	return true;
}

sockaddr_in loopback(std::uint16_t port = 0)
{
	sockaddr_in sa{};
	sa.sin_family = AF_INET;
	sa.sin_port = htons(port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sa;
}

// A TCP listener on 127.0.0.1 with `backlog`, and its port.
UniqueFd tcp_listener(int backlog, std::uint16_t &port)
{
	UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	REQUIRE(fd);
	sockaddr_in sa = loopback();
	REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof(sa)) == 0);
	REQUIRE(::listen(fd.get(), backlog) == 0);
	socklen_t len = sizeof(sa);
	REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr *>(&sa), &len) == 0);
	port = ntohs(sa.sin_port);
	return fd;
}

// Non-blocking connects to the port: the handshakes complete, or not, without waiting.
std::vector<UniqueFd> tcp_connects(std::uint16_t port, int n)
{
	std::vector<UniqueFd> out;
	for (int i = 0; i < n; i++) {
		UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
		REQUIRE(c);
		sockaddr_in sa = loopback(port);
		int r = ::connect(c.get(), reinterpret_cast<sockaddr *>(&sa), sizeof(sa));
		REQUIRE((r == 0 || errno == EINPROGRESS));
		out.push_back(std::move(c));
	}
	return out;
}

sockaddr_un abstract_address(const std::string &name, socklen_t &len)
{
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path + 1, name.data(), name.size());
	len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
	return sa;
}

} // namespace

TEST_CASE("a TCP listener's accept queue: the connections waiting, and its backlog")
{
	UniqueFd diag = brokerd::open_sock_diag();
	std::uint16_t port = 0;
	UniqueFd l = tcp_listener(8, port);
	QueueStats empty = queue_stats(l.get(), diag.get());
	REQUIRE(empty.length.has_value());
	CHECK(*empty.length == 0);
	CHECK(empty.limit == 8u);
	CHECK(empty.drops == 0u);

	auto clients = tcp_connects(port, 5);
	CHECK(until([&] { return queue_stats(l.get(), diag.get()).length == 5u; }));
	QueueStats five = queue_stats(l.get(), diag.get());
	CHECK(five.length == 5u);
	CHECK(five.limit == 8u);
	CHECK(five.drops == 0u);

	// Accepting one takes it off the queue.
	UniqueFd accepted(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
	REQUIRE(accepted);
	CHECK(queue_stats(l.get(), diag.get()).length == 4u);
}

TEST_CASE("a unix listener's accept queue, through unix_diag")
{
	UniqueFd diag = brokerd::open_sock_diag();
	REQUIRE(diag);
	UniqueFd l(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	REQUIRE(l);
	socklen_t len = 0;
	sockaddr_un sa = abstract_address("brokerd-test-socket-stats-" + std::to_string(::getpid()), len);
	REQUIRE(::bind(l.get(), reinterpret_cast<sockaddr *>(&sa), len) == 0);
	REQUIRE(::listen(l.get(), 8) == 0);
	QueueStats empty = queue_stats(l.get(), diag.get());
	CHECK(empty.length == 0u);
	CHECK(empty.limit == 8u);
	CHECK_FALSE(empty.drops.has_value());

	std::vector<UniqueFd> clients;
	for (int i = 0; i < 5; i++) {
		UniqueFd c(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
		REQUIRE(::connect(c.get(), reinterpret_cast<sockaddr *>(&sa), len) == 0);
		clients.push_back(std::move(c));
	}
	QueueStats five = queue_stats(l.get(), diag.get());
	CHECK(five.length == 5u);
	CHECK(five.limit == 8u);

	// Without the netlink socket a unix listener has no figures; nothing else is asked.
	QueueStats without = queue_stats(l.get(), -1);
	CHECK_FALSE(without.length.has_value());
	CHECK_FALSE(without.limit.has_value());

	// Two listeners, each its own figures: the lookup is by inode.
	UniqueFd other(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	sockaddr_un sa2 = abstract_address("brokerd-test-socket-stats-other-" + std::to_string(::getpid()), len);
	REQUIRE(::bind(other.get(), reinterpret_cast<sockaddr *>(&sa2), len) == 0);
	REQUIRE(::listen(other.get(), 3) == 0);
	QueueStats second = queue_stats(other.get(), diag.get());
	CHECK(second.length == 0u);
	CHECK(second.limit == 3u);
	CHECK(queue_stats(l.get(), diag.get()).length == 5u);
}

TEST_CASE("a full TCP accept queue drops handshakes, and the listener counts them")
{
	UniqueFd diag = brokerd::open_sock_diag();
	std::uint16_t port = 0;
	UniqueFd l = tcp_listener(2, port);
	auto clients = tcp_connects(port, 10);
	// The queue holds backlog + 1; the SYNs or handshakes past it are dropped (and retried by the
	// clients' kernels, which is why more may come: at least one is counted).
	CHECK(until([&] { return queue_stats(l.get(), diag.get()).drops.value_or(0) >= 1; }));
	QueueStats full = queue_stats(l.get(), diag.get());
	CHECK(full.limit == 2u);
	CHECK(full.length == 3u);
}

TEST_CASE("a UDP socket has no accept queue; it counts datagrams its full buffer dropped")
{
	UniqueFd diag = brokerd::open_sock_diag();
	UniqueFd u(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	REQUIRE(u);
	int small = 1; // the kernel raises it to its minimum
	REQUIRE(::setsockopt(u.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) == 0);
	sockaddr_in sa = loopback();
	REQUIRE(::bind(u.get(), reinterpret_cast<sockaddr *>(&sa), sizeof(sa)) == 0);
	socklen_t len = sizeof(sa);
	REQUIRE(::getsockname(u.get(), reinterpret_cast<sockaddr *>(&sa), &len) == 0);
	QueueStats before = queue_stats(u.get(), diag.get());
	CHECK_FALSE(before.length.has_value());
	CHECK_FALSE(before.limit.has_value());
	CHECK(before.drops == 0u);

	UniqueFd sender(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	char payload[1024]{};
	for (int i = 0; i < 64; i++)
		::sendto(sender.get(), payload, sizeof(payload), 0, reinterpret_cast<sockaddr *>(&sa), sizeof(sa));
	// Loopback delivers inside sendto(): the count is there at once.
	CHECK(queue_stats(u.get(), diag.get()).drops.value_or(0) >= 1);
}

TEST_CASE("no figures for what is no socket, nor for a stream socket that does not listen")
{
	UniqueFd diag = brokerd::open_sock_diag();
	int pipe_fds[2];
	REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
	UniqueFd r(pipe_fds[0]), w(pipe_fds[1]);
	QueueStats none = queue_stats(r.get(), diag.get());
	CHECK_FALSE(none.length.has_value());
	CHECK_FALSE(none.limit.has_value());
	CHECK_FALSE(none.drops.has_value());

	std::uint16_t port = 0;
	UniqueFd l = tcp_listener(4, port);
	auto clients = tcp_connects(port, 1);
	QueueStats client = queue_stats(clients[0].get(), diag.get());
	CHECK_FALSE(client.length.has_value());
	CHECK_FALSE(client.limit.has_value());

	int pair[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
	UniqueFd a(pair[0]), b(pair[1]);
	CHECK_FALSE(queue_stats(a.get(), diag.get()).length.has_value());
	CHECK(queue_stats(-1, diag.get()).length == std::nullopt);
}
