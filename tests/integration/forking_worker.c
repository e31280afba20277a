/* A forking server, as systemd runs one with Type=notify and MAINPID=: the process brokerd
 * started forks the daemon, names it with MAINPID= and READY=1, and exits 0. The daemon serves
 * the first LISTEN_FDS socket, answering each connection with "pid N\n" and closing it, and
 * forks a helper that only waits: a leftover of the instance's session. SIGTERM ends the daemon
 * with status 0; the helper is left for brokerd to clean up.
 *
 * With an argument, the daemon writes "<daemon pid> <helper pid>\n" to that file once ready.
 * With FORKING_WORKER_NO_READY set, the first process sends MAINPID= alone (for "ready": "exec").
 * With FORKING_WORKER_IGNORE_TERM set, the daemon ignores SIGTERM (a drain it never honours). */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int notify(const char *text)
{
	const char *path = getenv("NOTIFY_SOCKET");
	if (!path || !*path || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		return -1;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	memcpy(sa.sun_path, path, strlen(path));
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = '\0';
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
	ssize_t n = sendto(fd, text, strlen(text), 0, (struct sockaddr *)&sa, len);
	close(fd);
	return n < 0 ? -1 : 0;
}

static void on_term(int sig)
{
	(void)sig;
	_exit(0);
}

int main(int argc, char **argv)
{
	const char *fds = getenv("LISTEN_FDS");
	if (!fds || atoi(fds) < 1) {
		fprintf(stderr, "forking-worker: no LISTEN_FDS\n");
		return 2;
	}
	pid_t daemon = fork();
	if (daemon < 0) {
		perror("forking-worker: fork");
		return 1;
	}
	if (daemon > 0) {
		/* The first process: name the daemon, then go. */
		char msg[64];
		snprintf(msg, sizeof msg, "MAINPID=%d%s", (int)daemon, getenv("FORKING_WORKER_NO_READY") ? "" : "\nREADY=1");
		if (notify(msg) < 0) {
			perror("forking-worker: notify");
			return 1;
		}
		return 0;
	}

	pid_t helper = fork();
	if (helper == 0) {
		for (;;)
			pause();
	}
	signal(SIGTERM, getenv("FORKING_WORKER_IGNORE_TERM") ? SIG_IGN : on_term);
	if (argc > 1) {
		FILE *f = fopen(argv[1], "w");
		if (!f || fprintf(f, "%d %d\n", (int)getpid(), (int)helper) < 0 || fclose(f) != 0) {
			perror("forking-worker: pid file");
			return 1;
		}
	}
	for (;;) {
		int c = accept4(3, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
				continue;
			perror("forking-worker: accept");
			return 1;
		}
		char line[32];
		int n = snprintf(line, sizeof line, "pid %d\n", (int)getpid());
		if (write(c, line, (size_t)n) < 0)
			perror("forking-worker: write");
		close(c);
	}
}
