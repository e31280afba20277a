// brokerctl's link to brokerd (see connection.hpp).
#include "connection.hpp"

#include "errors.hpp"


#include <climits>

namespace brokerctl {

using json = nlohmann::json;
namespace varlink = proto::varlink;

Connection::Connection(std::string path, std::chrono::milliseconds timeout)
	: path_(std::move(path)), timeout_(timeout)
{
}

Connection::~Connection() = default;

varlink::SyncClient &Connection::client()
{
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
		throw io_failure(e, method, timeout_);
	}
}

json Connection::receive(std::string_view method, const json &parameters, bool &continues)
{
	varlink::Message m;
	try {
		m = client().receive();
	} catch (const proto::varlink::Error &e) {
		throw io_failure(e, method, timeout_);
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
