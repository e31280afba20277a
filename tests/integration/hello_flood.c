// A worker that says Hello with its own BROKER_TOKEN on up to argv[1] connections, holding each
// one it gets, and prints how many it got and brokerd's answer to the first it did not.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *path = getenv("BROKER_SOCKET");
	const char *token = getenv("BROKER_TOKEN");
	if (argc != 2 || !path || !token)
		return 2;
	char call[256];
	int len = snprintf(call, sizeof call, "{\"method\":\"io.brokerd.Worker.Hello\",\"parameters\":{\"token\":\"%s\"}}",
	                   token);
	if (len < 0 || (size_t)len >= sizeof call)
		return 2;
	int n = atoi(argv[1]), held = 0;
	char reply[4096] = "";
	for (int i = 0; i < n; i++) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
			snprintf(reply, sizeof reply, "connect failed");
			break;
		}
		// A refused connection may be closed before the call is written: its answer is still there.
		(void)send(fd, call, (size_t)len + 1, MSG_NOSIGNAL);
		size_t got = 0;
		ssize_t r;
		while (got < sizeof reply - 1 && (r = recv(fd, reply + got, sizeof reply - 1 - got, 0)) > 0) {
			got += (size_t)r;
			if (memchr(reply, '\0', got))
				break;
		}
		reply[got] = '\0';
		if (got == 0 || strstr(reply, "\"error\"")) {
			close(fd);
			break;
		}
		held++;
	}
	printf("hello-flood: %d held; then: %s\n", held, reply);
	fflush(stdout);
	for (;;)
		pause(); // holding them until stopped
}
