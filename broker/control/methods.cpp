// The control socket's methods: who may call each, and the handler that answers it.
#include "control/methods.hpp"

#include "control/connection.hpp"
#include "os/log.hpp"

namespace brokerd {

namespace control {

std::span<const Method> methods()
{
	using enum access::Tier;
	// docs/protocol.md's "Authorization" table, row by row; Worker is anyone (the Worker methods
	// but Hello then need a Hello on the connection, see worker_methods.cpp).
	static const Method table[] = {
		{"org.varlink.service.GetInfo", Worker, false, &Connection::get_info},
		{"org.varlink.service.GetInterfaceDescription", Worker, false, &Connection::get_interface_description},
		{"io.brokerd.Worker.Hello", Worker, false, &Connection::worker_hello},
		{"io.brokerd.Worker.Ready", Worker, false, &Connection::worker_ready},
		{"io.brokerd.Worker.Status", Worker, false, &Connection::worker_status},
		{"io.brokerd.Worker.Events", Worker, false, &Connection::worker_events},
		{"io.brokerd.Worker.Handoff", Worker, true, &Connection::worker_handoff},
		{"io.brokerd.Worker.Received", Worker, false, &Connection::worker_received},
		{"io.brokerd.Worker.Peers", Worker, false, &Connection::worker_peers},
		{"io.brokerd.Worker.Handed", Worker, false, &Connection::worker_handed},
		{"io.brokerd.Worker.Resume", Worker, false, &Connection::worker_resume},
		{"io.brokerd.Control.Status", Reader, false, &Connection::control_status},
		{"io.brokerd.Control.Sockets", Reader, false, &Connection::control_sockets},
		{"io.brokerd.Control.Watch", Reader, false, &Connection::control_watch},
		{"io.brokerd.Control.History", Reader, false, &Connection::control_history},
		{"io.brokerd.Control.Upgrade", Admin, false, &Connection::control_upgrade},
		{"io.brokerd.Control.Rollback", Admin, false, &Connection::control_rollback},
		{"io.brokerd.Control.Restart", Admin, false, &Connection::control_restart},
		{"io.brokerd.Control.Abort", Admin, false, &Connection::control_abort},
		{"io.brokerd.Control.Start", Admin, false, &Connection::control_start},
		{"io.brokerd.Control.Stop", Admin, false, &Connection::control_stop},
		{"io.brokerd.Control.Reload", Admin, false, &Connection::control_reload},
		{"io.brokerd.Control.Reexec", Admin, false, &Connection::control_reexec},
		{"io.brokerd.Control.Metrics", Reader, false, &Connection::control_metrics},
		{"io.brokerd.Control.Scale", Admin, false, &Connection::control_scale},
		{"io.brokerd.Control.Signal", Admin, false, &Connection::control_signal},
	};
	return table;
}

const Method *find_method(std::string_view name)
{
	for (const Method &m : methods())
		if (m.name == name)
			return &m;
	return nullptr;
}

std::optional<access::Tier> required(std::string_view name)
{
	const Method *m = find_method(name);
	return m ? std::optional(m->tier) : std::nullopt;
}

bool serves_interface(std::string_view interface)
{
	for (const Method &m : methods())
		if (m.name.size() > interface.size() && m.name.starts_with(interface) && m.name[interface.size()] == '.' &&
		    m.name.find('.', interface.size() + 1) == std::string_view::npos)
			return true;
	return false;
}

} // namespace control

using json = nlohmann::json;
namespace vl = proto::varlink;

void ControlServer::Connection::handle(vl::Message &m)
{
	json &body = m.body;
	auto method_it = body.find("method");
	if (method_it == body.end() || !method_it->is_string())
		return close("message without a method");
	std::string method = method_it->get<std::string>();
	auto flag = [&](const char *key) {
		auto it = body.find(key);
		return it != body.end() && it->is_boolean() && it->get<bool>();
	};
	oneway_ = flag("oneway");
	more_ = flag("more");
	control::Call call{json::object(), {}};
	// Missing or null parameters are no parameters, as in systemd's sd-varlink (varlink-go
	// sends null).
	if (auto p = body.find("parameters"); p != body.end() && !p->is_null()) {
		if (!p->is_object())
			return error(vl::kInvalidParameter, {{"parameter", "parameters"}});
		call.params = std::move(*p); // a Handoff batch is large: no copy
	}
	const control::Method *row = control::find_method(method);
	if (!m.fds.empty() && !(row && row->takes_fds)) {
		// No other method takes fds; they close with the message.
		return error(vl::kInvalidParameter, {{"parameter", "fd"}});
	}
	if (!row) {
		std::size_t dot = method.rfind('.');
		std::string iface = dot == std::string::npos ? std::string{} : method.substr(0, dot);
		if (!control::serves_interface(iface))
			return error(vl::kInterfaceNotFound, {{"interface", iface}});
		return error(vl::kMethodNotFound, {{"method", method}});
	}
	if (tier_ < row->tier) {
		log::client(log::Level::Warning, "control: " + method + " from " + who() + " denied");
		return error(vl::kPermissionDenied);
	}
	call.fds = std::move(m.fds);
	try {
		(this->*row->handler)(call);
	} catch (const json::exception &) {
		// A parameter of the wrong type surfaced while reading it.
		error(vl::kInvalidParameter, {{"parameter", "parameters"}});
	}
}

} // namespace brokerd
