// A worker outside this tree, built against the installed <broker/client.hpp> with pkg-config.
// With no BROKER_SOCKET or LISTEN_FDS it must fail with ENXIO (exit 3); with one socket passed
// as plain systemd would ("probe" at fd 3) it must find it (exit 0).
#include <broker/client.hpp>

#include <sys/socket.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

int main()
{
	try {
		broker::Client client = broker::Client::from_env();
		if (client.brokered() || client.generation() != 0 || !client.service().empty()) {
			std::fprintf(stderr, "consumer.cpp: expected plain socket activation\n");
			return 1;
		}
		if (client.listeners().size() != 1 || client.listeners()[0].name != "probe") {
			std::fprintf(stderr, "consumer.cpp: expected exactly the socket \"probe\"\n");
			return 1;
		}
		int fd = client.listener("probe");
		int listening = 0;
		socklen_t len = sizeof(listening);
		if (fd != 3 || getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0 || !listening) {
			std::fprintf(stderr, "consumer.cpp: \"probe\" is fd %d, not a listening socket at fd 3\n", fd);
			return 1;
		}
		try {
			client.listener("nope");
			std::fprintf(stderr, "consumer.cpp: listener(\"nope\") did not throw\n");
			return 1;
		} catch (const broker::Error &e) {
			if (e.code() != ENOENT) {
				std::fprintf(stderr, "consumer.cpp: listener(\"nope\"): %s\n", e.what());
				return 1;
			}
		}
		client.ready(); // no NOTIFY_SOCKET: nothing to tell, and no error
		std::printf("consumer.cpp: probe=%d\n", fd);
		return 0;
	} catch (const broker::Error &e) {
		std::printf("consumer.cpp: %s: %s\n", e.code() == ENXIO ? "ENXIO" : std::strerror(e.code()), e.what());
		return e.code() == ENXIO ? 3 : 1;
	}
}
