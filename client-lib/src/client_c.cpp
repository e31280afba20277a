// The C worker API: thin wrappers over broker::Client that turn every exception into -errno.
#include "broker/client.h"

#include "broker/client.hpp"

#include <cerrno>
#include <chrono>
#include <new>

struct broker_client {
	explicit broker_client(broker::Client c) : client(std::move(c)) {}

	broker::Client client;
	broker_drain_handler drain = nullptr;
	void *drain_userdata = nullptr;
};

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

extern "C" {

int broker_client_from_env(broker_client **ret)
{
	if (!ret)
		return -EINVAL;
	*ret = nullptr;
	return guard([&] {
		*ret = new broker_client(broker::Client::from_env());
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

} // extern "C"
