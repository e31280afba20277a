// The C worker API: thin wrappers over broker::Client that turn every exception into -errno.
#include "broker/client.h"

#include "broker/client.hpp"

#include <cerrno>
#include <chrono>
#include <functional>
#include <new>
#include <string>
#include <vector>

struct broker_client {
	explicit broker_client(broker::Client c) : client(std::move(c)) {}

	broker::Client client;
	broker_drain_handler drain = nullptr;
	void *drain_userdata = nullptr;
	broker_connection_handler connection = nullptr;
	void *connection_userdata = nullptr;
	broker_connection_handler returned = nullptr;
	void *returned_userdata = nullptr;
	broker_handoff_done_handler handoff_done = nullptr;
	void *handoff_done_userdata = nullptr;
	broker_link_handler link = nullptr;
	void *link_userdata = nullptr;
};

static_assert(BROKER_MAX_HANDOFF_STATE == broker::Client::kMaxHandoffState);

namespace {

// The boundary: no exception crosses into C.
template <typename F>
int guard(F &&f) noexcept
{
	try {
		return f();
	} catch (const broker::Error &e) {
		return e.code() > 0 ? -e.code() : -EIO;
	} catch (const std::bad_alloc &) {
		return -ENOMEM;
	} catch (...) {
		return -EIO;
	}
}

std::uint64_t to_usec(std::chrono::steady_clock::time_point t)
{
	// steady_clock is CLOCK_MONOTONIC on Linux.
	if (t == std::chrono::steady_clock::time_point::max())
		return UINT64_MAX;
	auto us = std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
	return us < 0 ? 0 : static_cast<std::uint64_t>(us);
}

} // namespace

namespace {

// on_connection and on_returned take the same C handler: `slot` is which of the two.
int set_connection_slot(broker_client *client, broker_connection_handler handler, void *userdata, bool returned)
{
	if (!client)
		return -EINVAL;
	return guard([&] {
		broker_connection_handler &h = returned ? client->returned : client->connection;
		void *&data = returned ? client->returned_userdata : client->connection_userdata;
		h = handler;
		data = userdata;
		std::function<void(int, std::string)> f;
		if (handler)
			f = [client, &h, &data](int fd, std::string state) { h(client, fd, state.data(), state.size(), data); };
		if (returned)
			client->client.on_returned(std::move(f));
		else
			client->client.on_connection(std::move(f));
		return 0;
	});
}

} // namespace

extern "C" {

int broker_client_from_env(broker_client **ret)
{
	return broker_client_from_env_with_flags(ret, 0);
}

int broker_client_from_env_with_flags(broker_client **ret, unsigned flags)
{
	if (!ret)
		return -EINVAL;
	*ret = nullptr;
	if (flags & ~(BROKER_CLIENT_ACCEPT_HANDOFF | BROKER_CLIENT_NO_RECONNECT))
		return -EINVAL;
	return guard([&] {
		broker::ClientOptions options;
		options.accept_handoff = flags & BROKER_CLIENT_ACCEPT_HANDOFF;
		options.reconnect = !(flags & BROKER_CLIENT_NO_RECONNECT);
		*ret = new broker_client(broker::Client::from_env(options));
		return 0;
	});
}

void broker_client_free(broker_client *client)
{
	delete client;
}

int broker_client_brokered(const broker_client *client)
{
	if (!client)
		return -EINVAL;
	return client->client.brokered() ? 1 : 0;
}

const char *broker_client_service(const broker_client *client)
{
	return client ? client->client.service().c_str() : nullptr;
}

const char *broker_client_instance(const broker_client *client)
{
	return client ? client->client.instance().c_str() : nullptr;
}

uint64_t broker_client_generation(const broker_client *client)
{
	return client ? client->client.generation() : 0;
}

int broker_client_listener(const broker_client *client, const char *name)
{
	if (!client || !name)
		return -EINVAL;
	return guard([&] { return client->client.listener(name); });
}

size_t broker_client_listener_count(const broker_client *client)
{
	return client ? client->client.listeners().size() : 0;
}

const char *broker_client_listener_name(const broker_client *client, size_t i)
{
	if (!client || i >= client->client.listeners().size())
		return nullptr;
	return client->client.listeners()[i].name.c_str();
}

int broker_client_listener_fd(const broker_client *client, size_t i)
{
	if (!client || i >= client->client.listeners().size())
		return -EINVAL;
	return client->client.listeners()[i].fd;
}

int broker_client_ready(broker_client *client)
{
	if (!client)
		return -EINVAL;
	return guard([&] {
		client->client.ready();
		return 0;
	});
}

int broker_client_status(broker_client *client, const char *text)
{
	if (!client || !text)
		return -EINVAL;
	return guard([&] {
		client->client.status(text);
		return 0;
	});
}

int broker_client_fd(const broker_client *client)
{
	if (!client)
		return -EINVAL;
	return client->client.fd();
}

int broker_client_events(const broker_client *client)
{
	if (!client)
		return -EINVAL;
	return client->client.events();
}

uint64_t broker_client_timeout(const broker_client *client)
{
	return client ? client->client.timeout() : UINT64_MAX;
}

int broker_client_process(broker_client *client)
{
	if (!client)
		return -EINVAL;
	return guard([&] { return client->client.process() ? 1 : 0; });
}

int broker_client_set_drain_handler(broker_client *client, broker_drain_handler handler, void *userdata)
{
	if (!client)
		return -EINVAL;
	return guard([&] {
		client->drain = handler;
		client->drain_userdata = userdata;
		if (!handler) {
			client->client.on_drain(nullptr);
			return 0;
		}
		client->client.on_drain([client](const broker::DrainRequest &req) {
			client->drain(client, to_usec(req.deadline), client->drain_userdata);
		});
		return 0;
	});
}

static_assert(BROKER_LINK_CONNECTED == static_cast<int>(broker::Link::Connected) &&
              BROKER_LINK_LOST == static_cast<int>(broker::Link::Lost) &&
              BROKER_LINK_REJECTED == static_cast<int>(broker::Link::Rejected));

int broker_client_link(const broker_client *client)
{
	if (!client)
		return -EINVAL;
	return static_cast<int>(client->client.link());
}

int broker_client_set_link_handler(broker_client *client, broker_link_handler handler, void *userdata)
{
	if (!client)
		return -EINVAL;
	return guard([&] {
		client->link = handler;
		client->link_userdata = userdata;
		if (!handler) {
			client->client.on_link(nullptr);
			return 0;
		}
		client->client.on_link([client](broker::Link link, const broker::Error *why) {
			int error = why ? (why->code() > 0 ? -why->code() : -EIO) : 0;
			client->link(client, static_cast<int>(link), error, client->link_userdata);
		});
		return 0;
	});
}

int broker_client_handoff(broker_client *client, const struct broker_connection *connections, size_t n)
{
	if (!client || (!connections && n > 0))
		return -EINVAL;
	return guard([&] {
		std::vector<broker::Connection> conns;
		conns.reserve(n);
		for (size_t i = 0; i < n; i++) {
			if (!connections[i].state && connections[i].state_size > 0)
				throw broker::Error(EINVAL, "handoff: state is NULL");
			const char *state = static_cast<const char *>(connections[i].state);
			conns.push_back({connections[i].fd, std::string_view(state ? state : "", connections[i].state_size)});
		}
		client->client.handoff(conns.data(), conns.size());
		return 0;
	});
}

size_t broker_client_handoff_pending(const broker_client *client)
{
	return client ? client->client.handoff_pending() : 0;
}

int broker_client_set_connection_handler(broker_client *client, broker_connection_handler handler, void *userdata)
{
	return set_connection_slot(client, handler, userdata, false);
}

int broker_client_set_returned_handler(broker_client *client, broker_connection_handler handler, void *userdata)
{
	return set_connection_slot(client, handler, userdata, true);
}

int broker_client_set_handoff_done_handler(broker_client *client, broker_handoff_done_handler handler,
                                           void *userdata)
{
	if (!client)
		return -EINVAL;
	return guard([&] {
		client->handoff_done = handler;
		client->handoff_done_userdata = userdata;
		if (!handler) {
			client->client.on_handoff_done(nullptr);
			return 0;
		}
		client->client.on_handoff_done([client](const broker::HandoffSummary &s) {
			client->handoff_done(client, s.handed, s.landed, s.returned, s.abandoned, client->handoff_done_userdata);
		});
		return 0;
	});
}

} // extern "C"
