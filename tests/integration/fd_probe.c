/* fd-probe: records the fds and LISTEN_* environment a worker was exec'ed with, then execs it. */
/*
 * Usage: itest-fd-probe PREFIX PROGRAM [ARGS...]. Writes PREFIX.<pid> (atomically, by rename) and
 * then execs PROGRAM in the same process, so the pid brokerd reports is the real worker's and
 * LISTEN_PID still matches. The probe itself leaves no fd behind.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void append(char *buf, size_t size, size_t *len, const char *fmt, const char *a, const char *b)
{
	int n = snprintf(buf + *len, size - *len, fmt, a, b);
	if (n > 0 && (size_t)n < size - *len)
		*len += (size_t)n;
}

int main(int argc, char **argv)
{
	static char out[65536];
	size_t len = 0;
	char num[32], target[512], path[600], name[128];

	if (argc < 3) {
		fprintf(stderr, "usage: itest-fd-probe PREFIX PROGRAM [ARGS...]\n");
		return 2;
	}

	snprintf(num, sizeof num, "%ld", (long)getpid());
	append(out, sizeof out, &len, "pid %s%s\n", num, "");

	/* Read the fd table before opening anything, then skip the directory's own fd. */
	DIR *d = opendir("/proc/self/fd");
	if (!d) {
		perror("itest-fd-probe: /proc/self/fd");
		return 1;
	}
	int own = dirfd(d);
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		int fd = atoi(e->d_name);
		if (fd == own)
			continue;
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
		ssize_t n = readlink(path, target, sizeof target - 1);
		target[n > 0 ? n : 0] = '\0';
		append(out, sizeof out, &len, "fd %s %s\n", e->d_name, target);

		struct sockaddr_storage ss;
		socklen_t sl = sizeof ss;
		if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 && ss.ss_family == AF_INET) {
			struct sockaddr_in *in = (struct sockaddr_in *)&ss;
			char host[INET_ADDRSTRLEN];
			inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
			snprintf(name, sizeof name, "%s:%u", host, (unsigned)ntohs(in->sin_port));
			append(out, sizeof out, &len, "sockname %s %s\n", e->d_name, name);
		}
	}
	closedir(d);

	static const char *const vars[] = {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
	                                   "BROKER_SOCKET", "BROKER_SERVICE", "BROKER_INSTANCE",
	                                   "BROKER_GENERATION"};
	for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
		const char *v = getenv(vars[i]);
		if (v)
			append(out, sizeof out, &len, "env %s=%s\n", vars[i], v);
	}
	append(out, sizeof out, &len, "end%s%s\n", "", "");

	char tmp[4200], final[4200];
	snprintf(tmp, sizeof tmp, "%s.%s.tmp", argv[1], num);
	snprintf(final, sizeof final, "%s.%s", argv[1], num);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, out, len) != (ssize_t)len || close(fd) < 0 || rename(tmp, final) < 0) {
		perror("itest-fd-probe: write record");
		return 1;
	}

	execvp(argv[2], argv + 2);
	perror("itest-fd-probe: exec");
	return 127;
}
