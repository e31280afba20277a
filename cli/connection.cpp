// brokerctl's link to brokerd (see connection.hpp).
#include "connection.hpp"

#include "errors.hpp"

#include <cerrno>
#include <climits>
#include <utility>

namespace brokerctl {

using json = nlohmann::json;
namespace varlink = proto::varlink;

Connection::Connection(std::string path, std::chrono::milliseconds timeout, std::optional<RemoteTarget> remote)
	: path_(std::move(path)), timeout_(timeout), remote_(std::move(remote))
{
}

Connection::~Connection()
{
	end_bridge();
}

// How long a bridge's ssh may take to leave once its channel is closed: it only says goodbye.
constexpr auto kBridgeExitWait = std::chrono::seconds(5);

void Connection::end_bridge()
{
	// Closing our end is ssh's EOF: it passes it on and exits, and the remote bridge with it.
	client_.reset();
	if (ssh_ > 0)
		reap_bridge(std::exchange(ssh_, -1), *remote_, kBridgeExitWait);
}

void Connection::io_failed(const proto::varlink::Error &e, std::string_view method)
{
	if (ssh_ > 0 && (e.code() == ECONNRESET || e.code() == EPIPE)) {
		client_.reset();
		auto exit = reap_bridge(std::exchange(ssh_, -1), *remote_, kBridgeExitWait);
		if (exit)
			throw Failure(static_cast<ExitCode>(exit->code), exit->message);
	}
	throw io_failure(e, method, timeout_);
}

varlink::SyncClient &Connection::client()
{
	if (!client_ && remote_) {
		Bridge bridge = spawn_bridge(*remote_);
		ssh_ = bridge.ssh;
		client_ = std::make_unique<varlink::SyncClient>(std::move(bridge.fd), timeout_);
	}
	if (!client_) {
		try {
			client_ = std::make_unique<varlink::SyncClient>(path_, timeout_);
		} catch (const proto::varlink::Error &e) {
			throw connect_failure(e, path_);
		}
	}
	return *client_;
}

void Connection::send(std::string_view method, const json &parameters, bool more)
{
	varlink::SyncClient &c = client();
	try {
		c.send(varlink::make_call(method, parameters, more));
	} catch (const proto::varlink::Error &e) {
		io_failed(e, method);
	}
}

json Connection::receive(std::string_view method, const json &parameters, bool &continues)
{
	varlink::Message m;
	try {
		m = client().receive();
	} catch (const proto::varlink::Error &e) {
		io_failed(e, method);
	}
	// Fds are never part of a Control reply; any the broker sent close with `m`.
	const json &body = m.body;
	auto params = body.find("parameters");
	json reply = params != body.end() && params->is_object() ? *params : json::object();

	auto error = body.find("error");
	if (error != body.end())
		throw remote_failure(error->is_string() ? error->get<std::string>() : "(unnamed error)", reply, method,
		                     parameters);

	auto cont = body.find("continues");
	continues = cont != body.end() && cont->is_boolean() && cont->get<bool>();
	return reply;
}

void Connection::set_wait(Wait wait)
{
	// SyncClient polls with an int of milliseconds: INT_MAX (24 days) is "for ever" enough.
	client().set_timeout(wait == Wait::Unbounded ? std::chrono::milliseconds(INT_MAX) : timeout_);
}

json Connection::call(std::string_view method, json parameters, Wait wait)
{
	send(method, parameters, false);
	set_wait(wait);
	bool continues = false;
	json reply = receive(method, parameters, continues);
	set_wait(Wait::Timeout);
	return reply;
}

bool Connection::stream(std::string_view method, json parameters, const std::function<bool(const json &)> &on_reply,
                        Wait wait)
{
	send(method, parameters, true);
	set_wait(wait);
	bool continues = false;
	do {
		json reply = receive(method, parameters, continues);
		if (!on_reply(reply))
			break;
	} while (continues);
	set_wait(Wait::Timeout);
	return continues;
}

} // namespace brokerctl
