// broker-bench-listen: binds a loopback TCP port itself and execs a socket-activated worker on it.
//
//   broker-bench-listen [--reuseport] HOST:PORT PROGRAM [ARGS...]
//
// The bench's counter-examples run the very worker that brokerd runs, but without a broker: the
// listener is the worker's own, created when it starts and closed when it exits. Like
// systemd-socket-activate it hands the socket over as fd 3 with LISTEN_FDS=1, LISTEN_PID and
// LISTEN_FDNAMES=http, then becomes the worker (same pid, so signals reach it directly). Unlike it,
// it can set SO_REUSEPORT, so that two generations can listen on the port at once.

#include "proto/unique_fd.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

namespace {

constexpr int kBacklog = 4096; // brokerd's default, so that the scenarios differ only in handover
constexpr int kExitUsage = 2;

int usage()
{
	std::fprintf(stderr, "usage: broker-bench-listen [--reuseport] 127.x.y.z:PORT PROGRAM [ARGS...]\n");
	return kExitUsage;
}

int die(const char *what)
{
	std::fprintf(stderr, "broker-bench-listen: %s: %s\n", what, std::strerror(errno));
	return 1;
}

} // namespace

int main(int argc, char **argv)
{
	int arg = 1;
	bool reuseport = false;
	if (arg < argc && std::string_view(argv[arg]) == "--reuseport") {
		reuseport = true;
		arg++;
	}
	if (argc - arg < 2)
		return usage();

	std::string_view target = argv[arg++];
	std::size_t colon = target.rfind(':');
	if (colon == std::string_view::npos)
		return usage();
	std::string host(target.substr(0, colon));
	std::string_view port_text = target.substr(colon + 1);
	unsigned port = 0;
	auto [p, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
	sockaddr_in sin{};
	sin.sin_family = AF_INET;
	sin.sin_port = htons(static_cast<std::uint16_t>(port));
	if (ec != std::errc() || p != port_text.data() + port_text.size() || port == 0 || port > 65535 ||
	    inet_pton(AF_INET, host.c_str(), &sin.sin_addr) != 1 || (ntohl(sin.sin_addr.s_addr) >> 24) != 127)
		return usage();

	proto::UniqueFd sock(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	if (!sock)
		return die("socket");
	int one = 1;
	// SO_REUSEADDR lets a restarted worker bind while the old one's connections sit in TIME_WAIT.
	if (setsockopt(sock.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
		return die("SO_REUSEADDR");
	if (reuseport && setsockopt(sock.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
		return die("SO_REUSEPORT");
	if (bind(sock.get(), reinterpret_cast<const sockaddr *>(&sin), sizeof sin) < 0)
		return die("bind");
	if (listen(sock.get(), kBacklog) < 0)
		return die("listen");

	// The one fd the worker inherits, at fd 3 and without CLOEXEC, as socket activation passes it.
	if (sock.get() != 3) {
		if (dup2(sock.get(), 3) < 0)
			return die("dup2");
		sock.reset();
	} else {
		if (fcntl(3, F_SETFD, 0) < 0)
			return die("fcntl(F_SETFD)");
		(void)sock.release();
	}
	if (setenv("LISTEN_FDS", "1", 1) < 0 || setenv("LISTEN_PID", std::to_string(getpid()).c_str(), 1) < 0 ||
	    setenv("LISTEN_FDNAMES", "http", 1) < 0)
		return die("setenv");
	execvp(argv[arg], argv + arg);
	return die(argv[arg]);
}
