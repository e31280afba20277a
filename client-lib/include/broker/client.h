/* libbroker-client: the C worker API. Every function returning int returns >= 0 on success
 * and -errno on failure. The library never logs and never exits. */
#ifndef BROKER_CLIENT_H
#define BROKER_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BROKER_C_EXPORT __attribute__((visibility("default")))

typedef struct broker_client broker_client;

/* Called from broker_client_process() when the broker asks this instance to drain.
 * deadline_usec is CLOCK_MONOTONIC in microseconds; SIGKILL follows it. The handler must not
 * free the client. */
typedef void (*broker_drain_handler)(broker_client *client, uint64_t deadline_usec, void *userdata);

/* Connects with BROKER_SOCKET/BROKER_TOKEN, or falls back to LISTEN_FDS. */
BROKER_C_EXPORT int broker_client_from_env(broker_client **ret);
/* The same, with flags: BROKER_CLIENT_ACCEPT_HANDOFF says this instance takes connections
 * handed off by its predecessors; BROKER_CLIENT_NO_RECONNECT makes the loss of brokerd final, as
 * it was before reconnecting existed (see broker_client_link()). */
#define BROKER_CLIENT_ACCEPT_HANDOFF 0x1u
#define BROKER_CLIENT_NO_RECONNECT 0x2u
BROKER_C_EXPORT int broker_client_from_env_with_flags(broker_client **ret, unsigned flags);
BROKER_C_EXPORT void broker_client_free(broker_client *client);

/* 1 under brokerd, 0 under plain systemd. */
BROKER_C_EXPORT int broker_client_brokered(const broker_client *client);
BROKER_C_EXPORT const char *broker_client_service(const broker_client *client);
BROKER_C_EXPORT const char *broker_client_instance(const broker_client *client);
BROKER_C_EXPORT uint64_t broker_client_generation(const broker_client *client);

/* The fd of the socket called name, or -ENOENT. */
BROKER_C_EXPORT int broker_client_listener(const broker_client *client, const char *name);
BROKER_C_EXPORT size_t broker_client_listener_count(const broker_client *client);
/* The name and fd of listener i (< count); NULL and -EINVAL when out of range. */
BROKER_C_EXPORT const char *broker_client_listener_name(const broker_client *client, size_t i);
BROKER_C_EXPORT int broker_client_listener_fd(const broker_client *client, size_t i);

BROKER_C_EXPORT int broker_client_ready(broker_client *client);
BROKER_C_EXPORT int broker_client_status(broker_client *client, const char *text);

/* Event-loop integration: poll fd for events, wake by timeout (CLOCK_MONOTONIC usec,
 * UINT64_MAX for none), then call process (> 0 when it did something, 0 when idle). The fd may
 * change after any call; with a brokerd that makes direct handoff channels it is an epoll fd of
 * the library's that stays (see broker::Client::fd() in <broker/client.hpp>). */
BROKER_C_EXPORT int broker_client_fd(const broker_client *client);
BROKER_C_EXPORT int broker_client_events(const broker_client *client);
BROKER_C_EXPORT uint64_t broker_client_timeout(const broker_client *client);
BROKER_C_EXPORT int broker_client_process(broker_client *client);
BROKER_C_EXPORT int broker_client_set_drain_handler(broker_client *client, broker_drain_handler handler,
                                                    void *userdata);
/* The drain handler may run again after a reconnect: a brokerd that restarted while this instance
 * drained sends the drain again with the time that remains; the later deadline holds. */

/* The connection to brokerd (see broker::Client::link() in <broker/client.hpp>).
 * BROKER_LINK_LOST: brokerd went away; keep serving. broker_client_fd() is -1 (or the epoll fd) and
 *   broker_client_timeout() the next attempt; broker_client_process() reconnects without
 *   blocking, says Hello with the same token, and repeats Ready and the last status. Until then
 *   ready and status are remembered, and handoff fails with -ENOTCONN.
 * BROKER_LINK_REJECTED: a brokerd refused this instance; no more attempts: drain and exit.
 *   broker_client_process() returns the refusal (-EREMOTEIO, -EACCES, ...) after the handler,
 *   as it returns -ECONNRESET on a loss with BROKER_CLIENT_NO_RECONNECT.
 * Under plain systemd the link is always BROKER_LINK_CONNECTED. */
#define BROKER_LINK_CONNECTED 0
#define BROKER_LINK_LOST 1
#define BROKER_LINK_REJECTED 2
BROKER_C_EXPORT int broker_client_link(const broker_client *client);
/* Called from broker_client_process() on every change of the link, with -errno saying why (0 for
 * BROKER_LINK_CONNECTED). The handler must not free the client. */
typedef void (*broker_link_handler)(broker_client *client, int link, int error, void *userdata);
BROKER_C_EXPORT int broker_client_set_link_handler(broker_client *client, broker_link_handler handler,
                                                   void *userdata);

/* Connection handoff (see broker::Client::handoff in <broker/client.hpp>).
 * An established connection and the state its successor needs, at most
 * BROKER_MAX_HANDOFF_STATE bytes. */
#define BROKER_MAX_HANDOFF_STATE 16384
struct broker_connection {
	int fd;
	const void *state;
	size_t state_size;
};

/* Takes ownership of all n fds, or of none when it fails (-EMSGSIZE, -EBADF for an fd that is
 * not open, -ENOTCONN, -EINVAL for a NULL state with a size, an fd listed twice, one of the
 * library's own, one handed off before and not settled yet, or one the kernel will not pass to
 * another process, -ENOMEM). */
BROKER_C_EXPORT int broker_client_handoff(broker_client *client, const struct broker_connection *connections,
                                          size_t n);
BROKER_C_EXPORT size_t broker_client_handoff_pending(const broker_client *client);

/* A connection handed to this instance, or one of ours that nobody took: the handler owns fd;
 * state is valid only during the call. Set the connection handler before broker_client_ready():
 * connections that arrive without one go back to their sender. When broker_client_process()
 * finds brokerd gone, the returned and done handlers run inside that call, before the link
 * handler. */
typedef void (*broker_connection_handler)(broker_client *client, int fd, const void *state, size_t state_size,
                                          void *userdata);
BROKER_C_EXPORT int broker_client_set_connection_handler(broker_client *client, broker_connection_handler handler,
                                                         void *userdata);
BROKER_C_EXPORT int broker_client_set_returned_handler(broker_client *client, broker_connection_handler handler,
                                                       void *userdata);
/* Called once no handed-off connection is pending; the counts are since the client was made
 * (see broker::HandoffSummary; abandoned: in flight when the broker went away, closed, as nobody could tell where they went). This
 * handler may free the client; the others must not. */
typedef void (*broker_handoff_done_handler)(broker_client *client, size_t handed, size_t landed, size_t returned,
                                            size_t abandoned, void *userdata);
BROKER_C_EXPORT int broker_client_set_handoff_done_handler(broker_client *client,
                                                           broker_handoff_done_handler handler, void *userdata);

#ifdef __cplusplus
}
#endif

#endif /* BROKER_CLIENT_H */
