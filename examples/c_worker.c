/* broker-example-c: a small poll()-based HTTP/1.1 worker in C11, using libbroker-client's C API.
 *
 * It answers GET and HEAD of any path with one line, "hello from web gen 1 pid 1234 (C)", keeps
 * connections alive (pipelined requests are answered one at a time, in order), and drains on a
 * drain request from brokerd or on SIGTERM/SIGINT: it stops accepting, finishes the requests it has,
 * and exits 0. It reads no request bodies: a request that announces one gets 413 and a close.
 * broker-example-http is the fuller C++ example; this one shows the C API with every error checked.
 *
 * Under brokerd it also hands its connections to the next generation when it drains, and takes
 * those its predecessors hand to it (connection handoff, see hand_off() and send_handoffs()):
 *   - a keep-alive connection between requests moves at once, with the part of a request it has
 *     read so far as its state; the successor starts from that state as if it had read it itself,
 *     then reads the rest from the socket. The client sees one TCP connection throughout, answered
 *     by the new generation from then on.
 *   - a connection with a response in flight moves once the response is out.
 *   - a connection that nobody could take comes back (the returned handler) and is served to its
 *     end with "Connection: close", as every connection is when draining under plain systemd.
 * It exits once it holds no connection and no handoff is pending, or at the deadline.
 * If brokerd goes away it keeps serving while the library reconnects; it drains only if a brokerd
 * refuses it (BROKER_LINK_REJECTED, which broker_client_process() reports as an error).
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
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Limits on what clients control, and on the work done per wakeup. */
#define MAX_LISTENERS 64
#define MAX_CONNS 16384          /* also clipped to RLIMIT_NOFILE; see setup() */
#define RESERVED_FDS 16          /* stdio, the signalfd, the broker connection, and some room */
#define MAX_HEAD 8192            /* request line and headers; more is 431 */
#define ACCEPT_BATCH 32          /* per listener per wakeup */
#define PROCESS_BATCH 64         /* broker_client_process() calls per wakeup */
#define IDLE_TIMEOUT_MS 30000
#define REQUEST_TIMEOUT_MS 15000 /* one whole request; see sweep() */
#define DRAIN_IDLE_GRACE_MS 250  /* see sweep() */
#define LINGER_MS 2000
#define DEFAULT_DRAIN_MS 30000   /* a signal carries no deadline */
#define DEADLINE_MARGIN_MS 200   /* exit before the SIGKILL, not with it */
#define SWEEP_MS 1000
#define DRAIN_SWEEP_MS 50

/* A partly received request travels with its connection as handoff state, so it must fit. */
_Static_assert(MAX_HEAD <= BROKER_MAX_HANDOFF_STATE, "the input buffer must fit in a handoff's state");

struct conn {
	int fd;
	char in[MAX_HEAD];       /* received, not yet answered: at most one partial request between responses */
	size_t in_len;
	char out[512];           /* one response at a time */
	size_t out_len, out_sent;
	bool peer_eof;           /* the client shut down its side */
	bool close_after;        /* the queued response says "Connection: close" */
	bool lingering;          /* our FIN is out; discarding input until the client's */
	bool returned;           /* a handoff nobody took: served to its end here, with "Connection: close" */
	bool handing;            /* queued for the next broker_client_handoff() call, see send_handoffs() */
	bool gone;               /* closed or handed off: freed by reap() at the end of this wakeup */
	uint64_t last_active;    /* ms, CLOCK_MONOTONIC */
	uint64_t request_start;  /* since when we wait for the rest of the request in in[] */
	uint64_t linger_until;
};

struct server {
	broker_client *client;
	bool brokered;
	int sigfd;
	int listeners[MAX_LISTENERS];
	size_t n_listeners;
	/* The connections, and those gone in this wakeup until reap(): an event for a connection that
	 * went away earlier in the same wakeup still finds its (gone) struct. */
	struct conn **conns;
	size_t n_slots, cap;     /* used and allocated entries of conns */
	size_t n_open;           /* neither closed nor handed off */
	size_t n_handing;
	size_t max_conns;        /* accepting pauses here */
	struct pollfd *pfds;     /* rebuilt every wakeup, with the connection each entry is for */
	struct conn **polled;
	size_t poll_cap;
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

/* ---- The connection table ---- */

/* A new connection for fd, or NULL when out of memory (the caller still owns fd). */
static struct conn *conn_add(struct server *s, int fd)
{
	if (s->n_slots == s->cap) {
		size_t cap = s->cap ? 2 * s->cap : 64;
		struct conn **conns = realloc(s->conns, cap * sizeof *conns);
		if (!conns)
			return NULL;
		s->conns = conns;
		s->cap = cap;
	}
	struct conn *c = calloc(1, sizeof *c);
	if (!c)
		return NULL;
	c->fd = fd;
	c->last_active = s->now;
	c->request_start = s->now;
	s->conns[s->n_slots++] = c;
	s->n_open++;
	return c;
}

/* With poll() closing is all it takes: the fd is simply not in the next poll set. An epoll loop
 * must EPOLL_CTL_DEL first, because close() ends an epoll registration only with the last
 * reference to the socket, and after a handoff its sender still holds one for a while. */
static void conn_close(struct server *s, struct conn *c)
{
	if (c->gone)
		return;
	close(c->fd);
	c->fd = -1;
	c->gone = true;
	s->n_open--;
}

/* Frees what went away in this wakeup. Nothing may point at those connections afterwards. */
static void reap(struct server *s)
{
	if (s->n_slots == s->n_open)
		return;
	size_t kept = 0;
	for (size_t i = 0; i < s->n_slots; i++) {
		if (s->conns[i]->gone)
			free(s->conns[i]);
		else
			s->conns[kept++] = s->conns[i];
	}
	s->n_slots = kept;
}

/* ---- HTTP ---- */

/* A lingering close: our FIN follows the last response, then we discard input until the client's
 * FIN. Closing with unread input would send a reset, which can destroy the response in flight. */
static void conn_begin_close(struct server *s, struct conn *c)
{
	if (c->peer_eof || shutdown(c->fd, SHUT_WR) < 0) {
		conn_close(s, c);
		return;
	}
	c->lingering = true;
	c->in_len = 0;
	/* Nothing more goes out after our FIN. Dropping what did not, the poll loop cannot wait for
	 * POLLOUT, which a socket shut down for writing reports at once and forever. */
	c->out_len = c->out_sent = 0;
	c->linger_until = s->now + LINGER_MS;
}

static const char *reason(int status)
{
	switch (status) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
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

/* Whether c may go to the successor generation: only under brokerd, while it is still reachable,
 * and never a connection that already came back once (nobody takes it; it is served to its end). */
static bool may_hand_off(const struct server *s, const struct conn *c)
{
	return s->brokered && broker_client_link(s->client) == BROKER_LINK_CONNECTED && !c->returned;
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

	/* While draining, a connection that can move to the successor stays alive and moves once this
	 * answer is out; any other is closed after it, so that the client's next request opens a new
	 * connection, which a worker still accepting will take. */
	bool head_only = strcmp(method, "HEAD") == 0;
	bool keep_alive = (http11 ? !want_close : want_keep_alive && !want_close) &&
			  (!s->draining || may_hand_off(s, c));
	if (!head_only && strcmp(method, "GET") != 0)
		queue_response(s, c, 405, false, keep_alive);
	else
		queue_response(s, c, 200, head_only, keep_alive);
	return true;
}

/* Sends the queued response; false when the connection is gone. */
static bool conn_flush(struct server *s, struct conn *c)
{
	if (c->out_len == 0)
		return true;
	while (c->out_sent < c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_sent, c->out_len - c->out_sent, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return true;
			conn_close(s, c);
			return false;
		}
		c->out_sent += (size_t)n;
		c->last_active = s->now;
	}
	c->out_len = c->out_sent = 0;
	/* What is left of the input waited for us, not for the client: its time starts now. */
	c->request_start = s->now;
	return true;
}

/* ---- Connection handoff (brokered only) ---- */

/* Nothing of ours in flight on c: no unsent response, no close under way. Its input holds at most
 * a partly received request (conn_serve() answered every complete one), which is its state. */
static bool between_responses(const struct conn *c)
{
	return !c->gone && !c->lingering && !c->close_after && !c->peer_eof && c->out_len == 0;
}

/* Takes c out of this server and queues it for the successor: send_handoffs() gives the whole
 * wakeup's worth to the library in one call, which sends them 253 to a message. c stays allocated
 * until then, so its input buffer can serve as the state. */
static void hand_off(struct server *s, struct conn *c)
{
	c->handing = true;
	c->gone = true; /* for this server it is; see conn_close() for an epoll loop */
	s->n_open--;
	s->n_handing++;
}

static void send_handoffs(struct server *s)
{
	if (s->n_handing == 0)
		return;
	struct broker_connection *list = calloc(s->n_handing, sizeof *list);
	size_t n = 0;
	int r = -ENOMEM;
	if (list) {
		for (size_t i = 0; i < s->n_slots; i++) {
			struct conn *c = s->conns[i];
			if (c->handing)
				list[n++] = (struct broker_connection){.fd = c->fd, .state = c->in, .state_size = c->in_len};
		}
		/* From here the library owns the fds (it copies the states): it closes each one that the
		 * successor takes, and gives back through the returned handler those nobody could take. */
		r = broker_client_handoff(s->client, list, n);
		free(list);
	}
	if (r < 0)
		logmsg("cannot hand off %zu connections: %s, serving them here", s->n_handing, strerror(-r));
	for (size_t i = 0; i < s->n_slots; i++) {
		struct conn *c = s->conns[i];
		if (!c->handing)
			continue;
		c->handing = false;
		if (r >= 0) {
			c->fd = -1; /* the library's now; reap() frees the rest */
		} else {
			/* It took none of them: still ours, served to their end like a returned connection. */
			c->gone = false;
			c->returned = true;
			c->last_active = s->now;
			s->n_open++;
		}
	}
	s->n_handing = 0;
}

/* Answers what has arrived, one response at a time, then decides what comes next for c. */
static void conn_serve(struct server *s, struct conn *c)
{
	for (;;) {
		if (!conn_flush(s, c))
			return;
		if (c->out_len > 0)
			return; /* the socket is full; poll for POLLOUT */
		if (c->close_after) {
			conn_begin_close(s, c);
			return;
		}
		if (!answer_one(s, c))
			break;
	}
	if (c->peer_eof)
		conn_close(s, c);
	else if (s->draining && may_hand_off(s, c))
		hand_off(s, c); /* the response in flight is out, so the connection can move now */
}

/* A connection handed to us by a predecessor (returned: false), or one of ours that came back
 * (returned: true). Either way it is served as if freshly accepted, with its state already read.
 * It is taken even past max_conns: refusing it would fail a client that did nothing wrong, while
 * the limit still pauses accepting until we are below it again. */
static void adopt(struct server *s, int fd, const void *state, size_t state_size, bool returned)
{
	/* The socket comes blocking or not as its sender had it, and this loop must never block. */
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
		logmsg("handed-off connection: fcntl(O_NONBLOCK): %s, closing it", strerror(errno));
		close(fd);
		return;
	}
	struct conn *c = conn_add(s, fd);
	if (!c) {
		logmsg("out of memory, closing a handed-off connection");
		close(fd);
		return;
	}
	/* conn_add() started a fresh REQUEST_TIMEOUT_MS for a partial request in the state: the state
	 * carries no timestamp, and each handoff follows an upgrade, so a slow client gains at most one
	 * period per generation, which it does not choose. */
	c->returned = returned;
	if (state_size > sizeof c->in) {
		/* More than this worker ever buffers (the sender was another program): a head too large. */
		queue_response(s, c, 431, false, false);
	} else {
		memcpy(c->in, state, state_size);
		c->in_len = state_size;
	}
	/* The state may hold a whole request, and while draining the connection may move on at once. */
	conn_serve(s, c);
}

/* Called from broker_client_process(): the fd is ours, the state only valid during the call. */
static void on_connection(broker_client *client, int fd, const void *state, size_t state_size, void *userdata)
{
	(void)client;
	adopt(userdata, fd, state, state_size, false);
}

static void on_returned(broker_client *client, int fd, const void *state, size_t state_size, void *userdata)
{
	(void)client;
	adopt(userdata, fd, state, state_size, true);
}

static void on_handoff_done(broker_client *client, size_t handed, size_t landed, size_t returned,
			    size_t abandoned, void *userdata)
{
	(void)client;
	(void)userdata;
	logmsg("handoff settled: %zu connections handed, %zu taken by the successor, %zu returned, %zu abandoned",
	       handed, landed, returned, abandoned);
}

static size_t handoff_pending(const struct server *s)
{
	return s->broker_lost ? 0 : broker_client_handoff_pending(s->client);
}

/* ---- Draining ---- */

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
	/* Every connection between responses moves now; those with a response in flight follow from
	 * conn_serve() once it is out. */
	size_t open = s->n_open;
	for (size_t i = 0; i < s->n_slots; i++) {
		struct conn *c = s->conns[i];
		if (may_hand_off(s, c) && between_responses(c))
			hand_off(s, c);
	}
	char when[64] = "no deadline";
	if (known)
		snprintf(when, sizeof when, "deadline in %llu ms", (unsigned long long)left);
	char handed[64] = "";
	if (s->brokered)
		snprintf(handed, sizeof handed, ", %zu of them handed off", s->n_handing);
	logmsg("draining (%s): stopped accepting, %zu connections open%s, %s", why, open, handed, when);
	if (!s->broker_lost && s->brokered) {
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

/* Called from broker_client_process(). Lost: serve on while the library finds brokerd again.
 * Rejected: process_broker() sees the error and drains. */
static void on_link(broker_client *client, int link, int error, void *userdata)
{
	(void)client;
	(void)userdata;
	if (link == BROKER_LINK_LOST)
		logmsg("lost the broker connection: %s; serving on, reconnecting", strerror(-error));
	else if (link == BROKER_LINK_CONNECTED)
		logmsg("reconnected to the broker");
}

/* ---- The event loop ---- */

static void conn_event(struct server *s, struct conn *c, short revents)
{
	if (revents & (POLLERR | POLLNVAL)) {
		conn_close(s, c);
		return;
	}
	if (c->lingering) {
		char buf[4096];
		ssize_t n = recv(c->fd, buf, sizeof buf, 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			conn_close(s, c);
		return;
	}
	if ((revents & (POLLIN | POLLHUP)) && c->in_len < sizeof c->in) {
		ssize_t n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
		if (n > 0) {
			if (c->in_len == 0)
				c->request_start = s->now;
			c->in_len += (size_t)n;
			c->last_active = s->now;
		} else if (n == 0) {
			c->peer_eof = true;
		} else if (errno != EAGAIN && errno != EINTR) {
			conn_close(s, c);
			return;
		}
	}
	conn_serve(s, c);
}

static void accept_batch(struct server *s, int listener)
{
	for (int i = 0; i < ACCEPT_BATCH && s->n_open < s->max_conns; i++) {
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
		if (!conn_add(s, fd)) {
			logmsg("out of memory, dropping a connection");
			close(fd);
			return;
		}
	}
}

/* Closes connections that have done nothing for IDLE_TIMEOUT_MS, and answers 408 and closes those
 * that took REQUEST_TIMEOUT_MS to send one request: the idle timer restarts with every byte, so
 * without a deadline per request a client trickling a byte every few seconds would hold its
 * connection for ever, and enough of them would fill max_conns. The request clock runs only while
 * we wait for the client (no response queued), from the request's first byte or from the end of the
 * response before it. While draining, a connection that can move to the successor is handed off
 * (start_drain() and conn_serve() hand them as they become free; this is the safety net), and any
 * other is closed once it has had nothing in progress for DRAIN_IDLE_GRACE_MS: a keep-alive
 * client's next request may already be on the wire, and a request that arrives within the grace is
 * still answered, with "Connection: close". A handoff has no such race: bytes the client sends
 * meanwhile wait in the socket for the successor. */
static void sweep(struct server *s)
{
	for (size_t i = 0; i < s->n_slots; i++) {
		struct conn *c = s->conns[i];
		if (c->gone)
			continue;
		if (c->lingering) {
			if (s->now >= c->linger_until)
				conn_close(s, c);
			continue;
		}
		if (s->draining && may_hand_off(s, c) && between_responses(c)) {
			hand_off(s, c);
			continue;
		}
		if (c->in_len > 0 && c->out_len == 0 && !c->close_after && !c->peer_eof &&
		    s->now - c->request_start >= REQUEST_TIMEOUT_MS) {
			c->in_len = 0;
			queue_response(s, c, 408, false, false);
			conn_serve(s, c); /* sends it and begins the close */
			continue;
		}
		uint64_t quiet = s->now - c->last_active;
		bool idle = c->in_len == 0 && c->out_len == 0;
		if (quiet >= IDLE_TIMEOUT_MS || (s->draining && idle && quiet >= DRAIN_IDLE_GRACE_MS))
			conn_begin_close(s, c);
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
		/* May call on_drain, on_connection, on_returned and on_handoff_done. */
		int r = broker_client_process(s->client);
		if (r == 0)
			return;
		if (r < 0) {
			/* The link ended for good (a brokerd refused this instance, see on_link): nobody
			 * would tell it to drain, so it retires now. */
			logmsg("the broker connection ended: %s", strerror(-r));
			s->broker_lost = true;
			start_drain(s, "the broker connection ended", s->now + DEFAULT_DRAIN_MS);
			return;
		}
	}
}

/* The poll() timeout: the earliest of the library's timeout, the sweep, the drain deadline and
 * the end of an accept pause. */
static int poll_timeout(const struct server *s)
{
	uint64_t next = UINT64_MAX;
	if (s->n_open > 0 || s->draining)
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

/* Room in the poll arrays for n entries. */
static bool poll_reserve(struct server *s, size_t n)
{
	if (n <= s->poll_cap)
		return true;
	size_t cap = s->poll_cap ? s->poll_cap : 256;
	while (cap < n)
		cap *= 2;
	struct pollfd *pfds = realloc(s->pfds, cap * sizeof *pfds);
	if (!pfds)
		return false;
	s->pfds = pfds;
	struct conn **polled = realloc(s->polled, cap * sizeof *polled);
	if (!polled)
		return false;
	s->polled = polled;
	s->poll_cap = cap;
	return true;
}

/* poll() keeps this loop short and has no registrations to keep in step with the connections, at
 * the cost of walking every connection each wakeup; broker-example-http's epoll loop scales further. */
static int run(struct server *s)
{
	int ret = 0;
	while (!(s->draining && s->n_open == 0 && handoff_pending(s) == 0)) {
		/* [0] signals, [1] the broker, then the listeners while accepting, then connections. */
		if (!poll_reserve(s, 2 + s->n_listeners + s->n_slots)) {
			logmsg("out of memory for the poll set");
			ret = 1;
			break;
		}
		struct pollfd *pfds = s->pfds;
		size_t n = 0;
		pfds[n++] = (struct pollfd){.fd = s->sigfd, .events = POLLIN};
		pfds[n++] = (struct pollfd){.fd = -1};
		if (!s->broker_lost) {
			/* The library's fd and the events it wants can change after any call into it. */
			pfds[1].fd = broker_client_fd(s->client);
			pfds[1].events = (short)broker_client_events(s->client);
		}
		bool accepting = !s->draining && s->n_open < s->max_conns && s->now >= s->resume_accept;
		for (size_t i = 0; i < s->n_listeners; i++)
			pfds[n++] = (struct pollfd){.fd = accepting ? s->listeners[i] : -1, .events = POLLIN};
		size_t first_conn = n;
		for (size_t i = 0; i < s->n_slots; i++) {
			struct conn *c = s->conns[i];
			short events = POLLIN;
			/* A lingering connection only reads: after shutdown(SHUT_WR) POLLOUT never ends. */
			if (!c->lingering && c->out_len > c->out_sent)
				events = POLLOUT;
			else if (!c->lingering && c->peer_eof)
				events = 0;
			s->polled[n - first_conn] = c;
			pfds[n++] = (struct pollfd){.fd = c->fd, .events = events};
		}

		int r = poll(pfds, n, poll_timeout(s));
		if (r < 0 && errno != EINTR) {
			logmsg("poll: %s", strerror(errno));
			ret = 1;
			break;
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
		/* Connections added above are not in this poll set; those gone since are skipped. */
		for (size_t i = first_conn; i < n; i++) {
			struct conn *c = s->polled[i - first_conn];
			if (pfds[i].revents && !c->gone)
				conn_event(s, c, pfds[i].revents);
		}
		if (s->now >= s->next_sweep)
			sweep(s);
		send_handoffs(s);
		reap(s);

		if (s->draining && (s->n_open > 0 || handoff_pending(s) > 0) && s->now >= s->deadline) {
			logmsg("%s, closing %zu connections (%zu handed off and not yet taken)", s->stop_reason,
			       s->n_open, handoff_pending(s));
			break;
		}
	}
	/* Those handed off and not yet taken are the library's: broker_client_free() closes them. */
	for (size_t i = 0; i < s->n_slots; i++) {
		conn_close(s, s->conns[i]);
		free(s->conns[i]);
	}
	s->n_slots = 0;
	free(s->conns);
	free(s->pfds);
	free(s->polled);
	return ret;
}

/* Every connection is an fd. The soft limit is often 1024, for the sake of select()'s FD_SETSIZE,
 * which this worker does not use: take the hard limit, which the administrator chose. */
static void raise_fd_limit(void)
{
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) < 0 || nofile.rlim_cur == nofile.rlim_max)
		return;
	nofile.rlim_cur = nofile.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &nofile) < 0)
		logmsg("cannot raise RLIMIT_NOFILE to %llu: %s, ignoring", (unsigned long long)nofile.rlim_max,
		       strerror(errno));
}

static int setup(struct server *s)
{
	/* Under plain systemd the flag changes nothing: there is no broker to tell. */
	int r = broker_client_from_env_with_flags(&s->client, BROKER_CLIENT_ACCEPT_HANDOFF);
	if (r < 0) {
		logmsg("cannot get sockets from brokerd or LISTEN_FDS: %s", strerror(-r));
		return r;
	}
	s->brokered = broker_client_brokered(s->client) == 1;

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

	/* Keep fds for the listeners and the rest (RESERVED_FDS); connections get what is left. */
	s->max_conns = MAX_CONNS;
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY) {
		rlim_t reserved = s->n_listeners + RESERVED_FDS;
		rlim_t room = nofile.rlim_cur > reserved ? nofile.rlim_cur - reserved : 1;
		if (room < s->max_conns)
			s->max_conns = (size_t)room;
	}

	r = broker_client_set_drain_handler(s->client, on_drain, s);
	if (r < 0) {
		logmsg("cannot set the drain handler: %s", strerror(-r));
		return r;
	}
	if (s->brokered) {
		/* Handed-in connections come to on_connection; ours that nobody took to on_returned. */
		if ((r = broker_client_set_connection_handler(s->client, on_connection, s)) < 0 ||
		    (r = broker_client_set_returned_handler(s->client, on_returned, s)) < 0 ||
		    (r = broker_client_set_handoff_done_handler(s->client, on_handoff_done, s)) < 0 ||
		    (r = broker_client_set_link_handler(s->client, on_link, s)) < 0) {
			logmsg("cannot set the handoff and link handlers: %s", strerror(-r));
			return r;
		}
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
	logmsg("listening on %zu sockets (%s gen %llu pid %d, at most %zu connections)", s->n_listeners, service,
	       (unsigned long long)broker_client_generation(s->client), (int)getpid(), s->max_conns);
	return 0;
}

int main(void)
{
	struct server s = {.sigfd = -1, .now = now_ms(), .stop_reason = "drain deadline reached"};

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
	raise_fd_limit();

	int ret = setup(&s) < 0 ? 1 : run(&s);
	if (s.client)
		broker_client_free(s.client);
	close(s.sigfd);
	return ret;
}
