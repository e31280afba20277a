/* A C worker outside this tree, built against the installed <broker/client.h> with pkg-config.
 * With no BROKER_SOCKET or LISTEN_FDS it must fail with -ENXIO (exit 3); with one socket passed
 * as plain systemd would ("probe" at fd 3) it must find it (exit 0). */
#include <broker/client.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
	broker_client *client = NULL;
	int r = broker_client_from_env(&client);
	if (r < 0) {
		printf("consumer.c: broker_client_from_env: %s\n", r == -ENXIO ? "-ENXIO" : strerror(-r));
		return r == -ENXIO ? 3 : 1;
	}

	int ok = broker_client_brokered(client) == 0 && broker_client_listener_count(client) == 1 &&
	         strcmp(broker_client_listener_name(client, 0), "probe") == 0 &&
	         broker_client_listener_fd(client, 0) == 3 && broker_client_listener(client, "probe") == 3 &&
	         broker_client_listener(client, "nope") == -ENOENT && broker_client_listener_name(client, 1) == NULL &&
	         broker_client_fd(client) == -1 && broker_client_ready(client) == 0;
	broker_client_free(client);
	if (!ok) {
		fprintf(stderr, "consumer.c: expected exactly the socket \"probe\" at fd 3 under plain socket activation\n");
		return 1;
	}
	printf("consumer.c: probe=3\n");
	return 0;
}
