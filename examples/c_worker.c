/* broker-example-c: a small poll()-based HTTP/1.1 worker in C11, using libbroker-client's C API.
 *
 * It answers GET and HEAD of any path with one line, "hello from web gen 1 pid 1234 (C)", keeps
 * connections alive (pipelined requests are answered one at a time, in order), and drains on a
 * drain request from brokerd or on SIGTERM/SIGINT: it stops accepting, finishes the requests it has,
 * and exits 0. It reads no request bodies: a request that announces one gets 413 and a close.
 * broker-example-http is the fuller C++ example; this one shows the C API with every error checked.
 *
 * Without brokerd:  systemd-socket-activate -l 127.0.0.1:9090 broker-example-c */

#include <broker/client.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Limits on what clients control, and on the work done per wakeup. */
#define MAX_LISTENERS 64
#define MAX_CONNS 256
#define MAX_HEAD 8192            /* request line and headers; more is 431 */
#define ACCEPT_BATCH 32          /* per listener per wakeup */
#define PROCESS_BATCH 64         /* broker_client_process() calls per wakeup */
#define IDLE_TIMEOUT_MS 30000
#define DRAIN_IDLE_GRACE_MS 250  /* see sweep() */
#define LINGER_MS 2000
#define DEFAULT_DRAIN_MS 30000   /* a signal carries no deadline */
#define DEADLINE_MARGIN_MS 200   /* exit before the SIGKILL, not with it */
#define SWEEP_MS 1000
#define DRAIN_SWEEP_MS 50

struct conn {
	int fd;
	char in[MAX_HEAD];
	size_t in_len;
	char out[512];           /* one response at a time */
	size_t out_len, out_sent;
	bool peer_eof;           /* the client shut down its side */
	bool close_after;        /* the queued response says "Connection: close" */
	bool lingering;          /* our FIN is out; discarding input until the client's */
	uint64_t last_active;    /* ms, CLOCK_MONOTONIC */
	uint64_t linger_until;
};

struct server {
	broker_client *client;
	int sigfd;
	int listeners[MAX_LISTENERS];
	size_t n_listeners;
	struct conn *conns[MAX_CONNS]; /* NULL: a free slot */
	size_t n_conns;
	bool draining;
	bool broker_lost;
	uint64_t now;            /* ms, CLOCK_MONOTONIC, once per wakeup */
	uint64_t deadline;
	const char *stop_reason;
	uint64_t next_sweep;
	uint64_t resume_accept;
	bool accept_error_logged;
	char body[160];
	size_t body_len;
};

__attribute__((format(printf, 1, 2))) static void logmsg(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	fprintf(stderr, "broker-example-c: %s\n", line);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* deadline: ms on CLOCK_MONOTONIC when SIGKILL comes, or UINT64_MAX when the broker named none. */
static void start_drain(struct server *s, const char *why, uint64_t deadline)
{
	bool known = deadline != UINT64_MAX;
	uint64_t left = known && deadline > s->now ? deadline - s->now : 0;
	if (known)
		deadline = deadline > DEADLINE_MARGIN_MS ? deadline - DEADLINE_MARGIN_MS : 0;
	if (s->draining) {
		if (deadline < s->deadline)
			s->deadline = deadline;
		return;
	}
	/* Not polling the listeners is all it takes: their queues belong to the kernel, and the other
	 * workers of the service keep accepting from them. */
	s->draining = true;
	s->deadline = deadline;
	s->next_sweep = s->now;
	char when[64] = "no deadline";
	if (known)
		snprintf(when, sizeof when, "deadline in %llu ms", (unsigned long long)left);
	logmsg("draining (%s): stopped accepting, %zu connections open, %s", why, s->n_conns, when);
	if (!s->broker_lost && broker_client_brokered(s->client) == 1) {
		int r = broker_client_status(s->client, "draining");
		if (r < 0)
			logmsg("cannot set status: %s, ignoring", strerror(-r));
	}
}

/* Called from broker_client_process(). */
static void on_drain(broker_client *client, uint64_t deadline_usec, void *userdata)
{
	(void)client;
	start_drain(userdata, "requested by brokerd", deadline_usec == UINT64_MAX ? UINT64_MAX : deadline_usec / 1000);
}

static void conn_close(struct server *s, size_t slot)
{
	close(s->conns[slot]->fd);
	free(s->conns[slot]);
	s->conns[slot] = NULL;
	s->n_conns--;
}

/* A lingering close: our FIN follows the last response, then we discard input until the client's
 * FIN. Closing with unread input would send a reset, which can destroy the response in flight. */
static void conn_begin_close(struct server *s, size_t slot)
{
	struct conn *c = s->conns[slot];
	if (c->peer_eof || shutdown(c->fd, SHUT_WR) < 0) {
		conn_close(s, slot);
		return;
	}
	c->lingering = true;
	c->in_len = 0;
	c->linger_until = s->now + LINGER_MS;
}

static const char *reason(int status)
{
	switch (status) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 405: return "Method Not Allowed";
	case 413: return "Content Too Large";
	case 431: return "Request Header Fields Too Large";
	case 505: return "HTTP Version Not Supported";
	default: return "Error";
	}
}

static void queue_response(struct server *s, struct conn *c, int status, bool head_only, bool keep_alive)
{
	char err_body[64];
	const char *body = s->body;
	size_t body_len = s->body_len;
	if (status != 200) {
		body_len = (size_t)snprintf(err_body, sizeof err_body, "%s\n", reason(status));
		body = err_body;
	}
	int n = snprintf(c->out, sizeof c->out,
			 "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%sConnection: %s\r\n\r\n%.*s",
			 status, reason(status), body_len, status == 405 ? "Allow: GET, HEAD\r\n" : "",
			 keep_alive ? "keep-alive" : "close", head_only ? 0 : (int)body_len, body);
	c->out_len = n > 0 && (size_t)n < sizeof c->out ? (size_t)n : 0;
	c->out_sent = 0;
	c->close_after = !keep_alive;
}

/* The length of the head at the front of buf, up to and including its empty line, or 0. */
static size_t head_length(const char *buf, size_t len)
{
	for (size_t i = 0; i + 1 < len; i++) {
		if (buf[i] != '\n')
			continue;
		if (buf[i + 1] == '\n')
			return i + 2;
		if (buf[i + 1] == '\r' && i + 2 < len && buf[i + 2] == '\n')
			return i + 3;
	}
	return 0;
}

/* Cuts the next line, ended by LF or CRLF, off *cursor. */
static char *next_line(char **cursor)
{
	char *line = strsep(cursor, "\n");
	size_t len = line ? strlen(line) : 0;
	if (len > 0 && line[len - 1] == '\r')
		line[len - 1] = '\0';
	return line;
}

/* Answers the request at the front of c->in. Returns false while it is incomplete. */
static bool answer_one(struct server *s, struct conn *c)
{
	/* RFC 9112 2.2: a server should ignore empty lines received before a request line. */
	size_t skip = 0;
	while (skip < c->in_len && (c->in[skip] == '\r' || c->in[skip] == '\n'))
		skip++;
	memmove(c->in, c->in + skip, c->in_len - skip);
	c->in_len -= skip;

	size_t len = head_length(c->in, c->in_len);
	if (len == 0) {
		if (c->in_len < sizeof c->in)
			return false;
		queue_response(s, c, 431, false, false);
		c->in_len = 0;
		return true;
	}

	char head[MAX_HEAD + 1];
	memcpy(head, c->in, len);
	head[len] = '\0';
	memmove(c->in, c->in + len, c->in_len - len);
	c->in_len -= len;

	if (memchr(head, '\0', len)) {
		queue_response(s, c, 400, false, false);
		return true;
	}
	char *cursor = head;
	char *line = next_line(&cursor);
	char *method = line;
	char *target = strchr(method, ' ');
	char *version = target ? strchr(target + 1, ' ') : NULL;
	if (!version || target == method || version == target + 1 ||
	    strchr(version + 1, ' ')) {
		queue_response(s, c, 400, false, false);
		return true;
	}
	*target++ = '\0';
	*version++ = '\0';
	bool http11 = strcmp(version, "HTTP/1.1") == 0;
	if (!http11 && strcmp(version, "HTTP/1.0") != 0) {
		queue_response(s, c, strncmp(version, "HTTP/", 5) == 0 ? 505 : 400, false, false);
		return true;
	}

	bool want_close = false, want_keep_alive = false, has_body = false;
	while ((line = next_line(&cursor)) && *line) {
		char *colon = strchr(line, ':');
		if (!colon || colon == line || line[0] == ' ' || line[0] == '\t' || colon[-1] == ' ') {
			queue_response(s, c, 400, false, false);
			return true;
		}
		*colon = '\0';
		const char *value = colon + 1;
		if (strcasecmp(line, "Connection") == 0) {
			want_close = want_close || strcasestr(value, "close");
			want_keep_alive = want_keep_alive || strcasestr(value, "keep-alive");
		} else if (strcasecmp(line, "Transfer-Encoding") == 0) {
			has_body = true;
		} else if (strcasecmp(line, "Content-Length") == 0) {
			has_body = has_body || strtoul(value, NULL, 10) != 0;
		}
	}
	if (has_body) {
		/* The body would follow in c->in; rather than skip it, answer and close. */
		queue_response(s, c, 413, false, false);
		return true;
	}

	bool head_only = strcmp(method, "HEAD") == 0;
	bool keep_alive = (http11 ? !want_close : want_keep_alive && !want_close) && !s->draining;
	if (!head_only && strcmp(method, "GET") != 0)
		queue_response(s, c, 405, false, keep_alive);
	else
		queue_response(s, c, 200, head_only, keep_alive);
	return true;
}

/* Sends the queued response; false when the connection is gone. */
static bool conn_flush(struct server *s, size_t slot)
{
	struct conn *c = s->conns[slot];
	while (c->out_sent < c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_sent, c->out_len - c->out_sent, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return true;
			conn_close(s, slot);
			return false;
		}
		c->out_sent += (size_t)n;
		c->last_active = s->now;
	}
	c->out_len = c->out_sent = 0;
	return true;
}

static void conn_event(struct server *s, size_t slot, short revents)
{
	struct conn *c = s->conns[slot];
	if (revents & (POLLERR | POLLNVAL)) {
		conn_close(s, slot);
		return;
	}
	if (c->lingering) {
		char buf[4096];
		ssize_t n = recv(c->fd, buf, sizeof buf, 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			conn_close(s, slot);
		return;
	}
	if ((revents & (POLLIN | POLLHUP)) && c->in_len < sizeof c->in) {
		ssize_t n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
		if (n > 0) {
			c->in_len += (size_t)n;
			c->last_active = s->now;
		} else if (n == 0) {
			c->peer_eof = true;
		} else if (errno != EAGAIN && errno != EINTR) {
			conn_close(s, slot);
			return;
		}
	}
	/* One response at a time: the next pipelined request waits until this one is sent. */
	for (;;) {
		if (!conn_flush(s, slot))
			return;
		if (c->out_len > 0)
			return; /* the socket is full; poll for POLLOUT */
		if (c->close_after) {
			conn_begin_close(s, slot);
			return;
		}
		if (!answer_one(s, c))
			break;
	}
	if (c->peer_eof)
		conn_close(s, slot);
}

static void accept_batch(struct server *s, int listener)
{
	for (int i = 0; i < ACCEPT_BATCH && s->n_conns < MAX_CONNS; i++) {
		int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EAGAIN) /* empty, or another worker of the service was faster */
				return;
			if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
				continue;
			/* EMFILE and friends: stop polling the listeners for a moment rather than spin. */
			if (!s->accept_error_logged)
				logmsg("accept: %s, pausing accept", strerror(errno));
			s->accept_error_logged = true;
			s->resume_accept = s->now + 100;
			return;
		}
		s->accept_error_logged = false;
		struct conn *c = calloc(1, sizeof *c);
		if (!c) {
			logmsg("out of memory, dropping a connection");
			close(fd);
			return;
		}
		c->fd = fd;
		c->last_active = s->now;
		size_t slot = 0;
		while (s->conns[slot])
			slot++;
		s->conns[slot] = c;
		s->n_conns++;
	}
}

/* Closes connections that have done nothing for IDLE_TIMEOUT_MS. While draining, it also closes
 * every connection with nothing in progress once it has been quiet for DRAIN_IDLE_GRACE_MS: a
 * keep-alive client's next request may already be on the wire, and a request that arrives within
 * the grace is still answered, with "Connection: close". */
static void sweep(struct server *s)
{
	for (size_t slot = 0; slot < MAX_CONNS; slot++) {
		struct conn *c = s->conns[slot];
		if (!c)
			continue;
		if (c->lingering) {
			if (s->now >= c->linger_until)
				conn_close(s, slot);
			continue;
		}
		uint64_t quiet = s->now - c->last_active;
		bool idle = c->in_len == 0 && c->out_len == 0;
		if (quiet >= IDLE_TIMEOUT_MS || (s->draining && idle && quiet >= DRAIN_IDLE_GRACE_MS))
			conn_begin_close(s, slot);
	}
	s->next_sweep = s->now + (s->draining ? DRAIN_SWEEP_MS : SWEEP_MS);
}

static void handle_signals(struct server *s)
{
	struct signalfd_siginfo si;
	while (read(s->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
		if (!s->draining) {
			start_drain(s, si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM", s->now + DEFAULT_DRAIN_MS);
		} else if (s->deadline > s->now) {
			/* brokerd escalating at its deadline, or an impatient operator */
			s->stop_reason = "signal while draining";
			s->deadline = s->now;
		}
	}
}

static void process_broker(struct server *s)
{
	for (int i = 0; i < PROCESS_BATCH; i++) {
		int r = broker_client_process(s->client);
		if (r == 0)
			return;
		if (r < 0) {
			/* Without the broker nobody would tell this instance to drain: retire it now. */
			logmsg("lost the broker connection: %s", strerror(-r));
			s->broker_lost = true;
			start_drain(s, "the broker connection was lost", s->now + DEFAULT_DRAIN_MS);
			return;
		}
	}
}

/* The poll() timeout: the earliest of the library's timeout, the sweep, the drain deadline and
 * the end of an accept pause. */
static int poll_timeout(const struct server *s)
{
	uint64_t next = UINT64_MAX;
	if (s->n_conns > 0 || s->draining)
		next = s->next_sweep;
	if (s->draining && s->deadline < next)
		next = s->deadline;
	if (!s->draining && s->resume_accept > s->now && s->resume_accept < next)
		next = s->resume_accept;
	if (!s->broker_lost) {
		uint64_t t = broker_client_timeout(s->client);
		if (t != UINT64_MAX && (t + 999) / 1000 < next)
			next = (t + 999) / 1000;
	}
	if (next == UINT64_MAX)
		return -1;
	if (next <= s->now)
		return 0;
	return next - s->now > 60000 ? 60000 : (int)(next - s->now);
}

static int run(struct server *s)
{
	struct pollfd pfds[2 + MAX_LISTENERS + MAX_CONNS];
	size_t slot_of[MAX_CONNS];

	while (!(s->draining && s->n_conns == 0)) {
		/* [0] signals, [1] the broker, then the listeners while accepting, then connections. */
		size_t n = 0;
		pfds[n++] = (struct pollfd){.fd = s->sigfd, .events = POLLIN};
		pfds[n++] = (struct pollfd){.fd = -1};
		if (!s->broker_lost) {
			pfds[1].fd = broker_client_fd(s->client);
			pfds[1].events = (short)broker_client_events(s->client);
		}
		bool accepting = !s->draining && s->n_conns < MAX_CONNS && s->now >= s->resume_accept;
		for (size_t i = 0; i < s->n_listeners; i++)
			pfds[n++] = (struct pollfd){.fd = accepting ? s->listeners[i] : -1, .events = POLLIN};
		size_t first_conn = n;
		for (size_t slot = 0; slot < MAX_CONNS; slot++) {
			struct conn *c = s->conns[slot];
			if (!c)
				continue;
			short events = c->out_len > c->out_sent ? POLLOUT : c->peer_eof ? 0 : POLLIN;
			slot_of[n - first_conn] = slot;
			pfds[n++] = (struct pollfd){.fd = c->fd, .events = events};
		}

		int r = poll(pfds, n, poll_timeout(s));
		if (r < 0 && errno != EINTR) {
			logmsg("poll: %s", strerror(errno));
			return 1;
		}
		s->now = now_ms();

		if (pfds[0].revents)
			handle_signals(s);
		uint64_t t = s->broker_lost ? UINT64_MAX : broker_client_timeout(s->client);
		if (!s->broker_lost && (pfds[1].revents || (t != UINT64_MAX && t / 1000 <= s->now)))
			process_broker(s);
		for (size_t i = 0; i < s->n_listeners; i++)
			if (!s->draining && (pfds[2 + i].revents & POLLIN))
				accept_batch(s, s->listeners[i]);
		for (size_t i = first_conn; i < n; i++) {
			size_t slot = slot_of[i - first_conn];
			if (pfds[i].revents && s->conns[slot] && s->conns[slot]->fd == pfds[i].fd)
				conn_event(s, slot, pfds[i].revents);
		}
		if (s->now >= s->next_sweep)
			sweep(s);
		if (s->draining && s->n_conns > 0 && s->now >= s->deadline) {
			logmsg("%s, closing %zu connections", s->stop_reason, s->n_conns);
			break;
		}
	}
	for (size_t slot = 0; slot < MAX_CONNS; slot++)
		if (s->conns[slot])
			conn_close(s, slot);
	return 0;
}

static int setup(struct server *s)
{
	int r = broker_client_from_env(&s->client);
	if (r < 0) {
		logmsg("cannot get sockets from brokerd or LISTEN_FDS: %s", strerror(-r));
		return r;
	}

	size_t count = broker_client_listener_count(s->client);
	for (size_t i = 0; i < count; i++) {
		const char *name = broker_client_listener_name(s->client, i);
		int fd = broker_client_listener_fd(s->client, i);
		if (fd < 0) {
			logmsg("listener %zu: %s", i, strerror(-fd));
			return fd;
		}
		int type = 0, listening = 0;
		socklen_t len = sizeof type;
		if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
		    getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &(socklen_t){sizeof listening}) < 0) {
			logmsg("listener %s: getsockopt: %s", name ? name : "?", strerror(errno));
			return -errno;
		}
		if (type != SOCK_STREAM || !listening) {
			logmsg("socket %s (fd %d) is not a listening stream socket, ignoring", name ? name : "?", fd);
			continue;
		}
		if (s->n_listeners == MAX_LISTENERS) {
			logmsg("more than %d listeners, ignoring the rest", MAX_LISTENERS);
			break;
		}
		/* O_NONBLOCK lives on the open file description, shared with brokerd and every other
		 * worker of the service: this sets it for all of them, which is why every worker must
		 * expect EAGAIN from accept(). */
		int flags = fcntl(fd, F_GETFL);
		if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
			logmsg("listener %s: fcntl: %s", name ? name : "?", strerror(errno));
			return -errno;
		}
		s->listeners[s->n_listeners++] = fd;
	}
	if (s->n_listeners == 0) {
		logmsg("no listening stream socket to serve");
		return -ENOENT;
	}

	r = broker_client_set_drain_handler(s->client, on_drain, s);
	if (r < 0) {
		logmsg("cannot set the drain handler: %s", strerror(-r));
		return r;
	}

	const char *service = broker_client_service(s->client);
	if (!service || !*service)
		service = "standalone";
	int n = snprintf(s->body, sizeof s->body, "hello from %s gen %llu pid %d (C)\n", service,
			 (unsigned long long)broker_client_generation(s->client), (int)getpid());
	if (n < 0 || (size_t)n >= sizeof s->body) {
		logmsg("service name too long");
		return -ENAMETOOLONG;
	}
	s->body_len = (size_t)n;

	r = broker_client_ready(s->client);
	if (r < 0) {
		logmsg("cannot report readiness: %s", strerror(-r));
		return r;
	}
	char status[64];
	snprintf(status, sizeof status, "serving on %zu sockets", s->n_listeners);
	r = broker_client_status(s->client, status);
	if (r < 0)
		logmsg("cannot set status: %s, ignoring", strerror(-r));
	logmsg("listening on %zu sockets (%s gen %llu pid %d)", s->n_listeners, service,
	       (unsigned long long)broker_client_generation(s->client), (int)getpid());
	return 0;
}

int main(void)
{
	static struct server s; /* large: the connection table */
	s.sigfd = -1;
	s.now = now_ms();
	s.stop_reason = "drain deadline reached";

	/* Block the drain signals before anything else, so that they queue on the signalfd. */
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) {
		logmsg("sigprocmask: %s", strerror(errno));
		return 1;
	}
	/* A peer that went away is an error from send(), not a fatal signal (the library writes too). */
	if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
		logmsg("signal(SIGPIPE): %s", strerror(errno));
		return 1;
	}
	s.sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (s.sigfd < 0) {
		logmsg("signalfd: %s", strerror(errno));
		return 1;
	}

	int ret = setup(&s) < 0 ? 1 : run(&s);
	if (s.client)
		broker_client_free(s.client);
	close(s.sigfd);
	return ret;
}
