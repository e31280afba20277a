// Socket statistics: TCP_INFO, unix_diag and SO_MEMINFO for one socket, without a dump.
#include "os/socket_stats.hpp"

#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <linux/inet_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

namespace brokerd {

namespace {

int int_option(int fd, int level, int name)
{
	int value = -1;
	socklen_t len = sizeof(value);
	if (::getsockopt(fd, level, name, &value, &len) < 0)
		return -1;
	return value;
}

// A listener's TCP_INFO: tcp_get_info() puts sk_ack_backlog in tcpi_unacked and
// sk_max_ack_backlog in tcpi_sacked for a socket in TCP_LISTEN.
void tcp_queue(int fd, QueueStats &out)
{
	tcp_info info{};
	socklen_t len = sizeof(info);
	if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0 || len < offsetof(tcp_info, tcpi_sacked) + 4)
		return;
	if (info.tcpi_state != TCP_LISTEN)
		return;
	out.length = info.tcpi_unacked;
	out.limit = info.tcpi_sacked;
}

// A unix listener's queue by its inode: UNIX_DIAG_RQLEN has the queue length in udiag_rqueue
// and the backlog in udiag_wqueue for a listener.
void unix_queue(int fd, int diag_fd, QueueStats &out)
{
	struct stat st{};
	if (diag_fd < 0 || ::fstat(fd, &st) < 0)
		return;
	static std::uint32_t sequence = 0;
	struct {
		nlmsghdr header;
		unix_diag_req req;
	} request{};
	request.header.nlmsg_len = sizeof(request);
	request.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	request.header.nlmsg_flags = NLM_F_REQUEST;
	request.header.nlmsg_seq = ++sequence;
	request.req.sdiag_family = AF_UNIX;
	request.req.udiag_states = 1u << 10; // TCP_LISTEN
	request.req.udiag_ino = static_cast<std::uint32_t>(st.st_ino);
	request.req.udiag_show = UDIAG_SHOW_RQLEN;
	request.req.udiag_cookie[0] = INET_DIAG_NOCOOKIE;
	request.req.udiag_cookie[1] = INET_DIAG_NOCOOKIE;
	sockaddr_nl kernel{};
	kernel.nl_family = AF_NETLINK;
	if (::sendto(diag_fd, &request, sizeof(request), MSG_DONTWAIT, reinterpret_cast<sockaddr *>(&kernel),
	             sizeof(kernel)) < 0)
		return;
	// The kernel answered inside sendto(): the reply waits in the queue. A reply to an earlier
	// request that was given up on is read and skipped by its sequence number.
	alignas(nlmsghdr) char buffer[8192];
	for (;;) {
		ssize_t n = ::recv(diag_fd, buffer, sizeof(buffer), MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		int left = static_cast<int>(n);
		for (auto *h = reinterpret_cast<nlmsghdr *>(buffer); NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
			if (h->nlmsg_seq != sequence)
				continue;
			if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || h->nlmsg_len < NLMSG_LENGTH(sizeof(unix_diag_msg)))
				return; // NLMSG_ERROR: no such socket, or no unix_diag in this kernel
			auto *msg = static_cast<unix_diag_msg *>(NLMSG_DATA(h));
			if (msg->udiag_ino != request.req.udiag_ino || msg->udiag_state != 10)
				return;
			int attrs = static_cast<int>(h->nlmsg_len - NLMSG_LENGTH(sizeof(unix_diag_msg)));
			for (auto *a = reinterpret_cast<rtattr *>(msg + 1); RTA_OK(a, attrs); a = RTA_NEXT(a, attrs)) {
				if (a->rta_type != UNIX_DIAG_RQLEN || RTA_PAYLOAD(a) < sizeof(unix_diag_rqlen))
					continue;
				unix_diag_rqlen rq{};
				std::memcpy(&rq, RTA_DATA(a), sizeof(rq));
				out.length = rq.udiag_rqueue;
				out.limit = rq.udiag_wqueue;
			}
			return;
		}
	}
}

void drops(int fd, QueueStats &out)
{
	std::uint32_t mem[SK_MEMINFO_VARS]{};
	socklen_t len = sizeof(mem);
	if (::getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mem, &len) == 0 && len > SK_MEMINFO_DROPS * sizeof(mem[0]))
		out.drops = mem[SK_MEMINFO_DROPS];
}

} // namespace

proto::UniqueFd open_sock_diag()
{
	return proto::UniqueFd(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
}

QueueStats queue_stats(int fd, int diag_fd)
{
	QueueStats out;
	int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN);
	int type = int_option(fd, SOL_SOCKET, SO_TYPE);
	bool listening = int_option(fd, SOL_SOCKET, SO_ACCEPTCONN) == 1;
	bool inet = domain == AF_INET || domain == AF_INET6;
	if (inet && type == SOCK_STREAM) {
		if (listening)
			tcp_queue(fd, out);
		drops(fd, out);
	} else if (inet && type == SOCK_DGRAM) {
		drops(fd, out);
	} else if (domain == AF_UNIX && listening) {
		unix_queue(fd, diag_fd, out);
	}
	return out;
}

} // namespace brokerd
