// Socket statistics read from the kernel for one listening socket: its accept queue and its drops.
#pragma once

#include "proto/unique_fd.hpp"

#include <cstdint>
#include <optional>

namespace brokerd {

// What the kernel says of a listening socket. A figure the socket's kind does not keep, or the
// kernel would not give, is nullopt.
struct QueueStats {
	// The accept queue: connections that completed their handshake and wait for accept(), and
	// the most it holds (the listen() backlog, capped by net.core.somaxconn). TCP and unix stream
	// listeners; a datagram socket has none.
	std::optional<std::uint32_t> length, limit;
	// Packets the kernel dropped for this socket since it was created (sk_drops): SYNs and
	// handshakes refused because the accept queue was full (TCP), datagrams refused because the
	// receive buffer was full (UDP). A unix listener keeps no count: a full one refuses.
	std::optional<std::uint64_t> drops;
};

// A NETLINK_SOCK_DIAG socket for queue_stats(), CLOEXEC; invalid when the kernel refuses one.
// Opened once (at start): each query then costs one request and one reply, answered inside the
// call, never a dump of every socket.
proto::UniqueFd open_sock_diag();

// The figures of the socket `fd` (TCP, UDP or unix, IPv4 or IPv6), never blocking, in O(1):
// TCP_INFO for a TCP listener's queue, unix_diag through `diag_fd` (from open_sock_diag(), or -1:
// then a unix listener has no queue figures) for a unix one, SO_MEMINFO for the drops. For an fd
// that is no socket, or a socket that is not listening, the queue figures are nullopt.
QueueStats queue_stats(int fd, int diag_fd);

} // namespace brokerd
