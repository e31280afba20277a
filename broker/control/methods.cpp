// The control socket's methods: who may call each, and the handler that answers it.
#include "control/connection.hpp"

#include "proto/errors.hpp"
#include "os/log.hpp"

namespace brokerd {

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
	json params = json::object();
	// Missing or null parameters are no parameters, as in systemd's sd-varlink (varlink-go
	// sends null).
	if (auto p = body.find("parameters"); p != body.end() && !p->is_null()) {
		if (!p->is_object())
			return error(vl::kInvalidParameter, {{"parameter", "parameters"}});
		params = std::move(*p); // a Handoff batch is large: no copy
	}
	if (!m.fds.empty() && method != "io.brokerd.Worker.Handoff") {
		// No other method takes fds; they close with the message.
		return error(vl::kInvalidParameter, {{"parameter", "fd"}});
	}

	std::size_t dot = method.rfind('.');
	std::string iface = dot == std::string::npos ? std::string{} : method.substr(0, dot);
	std::string name = dot == std::string::npos ? method : method.substr(dot + 1);

	try {
		if (iface == "org.varlink.service") {
			if (name == "GetInfo")
				return get_info();
			if (name == "GetInterfaceDescription")
				return get_interface_description(params);
		} else if (iface == "io.brokerd.Control") {
			std::optional<access::Tier> needed = access::required(name);
			if (!needed)
				return error(vl::kMethodNotFound, {{"method", method}});
			if (tier() < *needed) {
				log::client(log::Level::Warning, "control: " + method + " from " + who() + " denied");
				return error(vl::kPermissionDenied);
			}
			if (name == "Status" || name == "Sockets")
				return control_status(params, name == "Sockets");
			if (name == "Watch")
				return control_watch(params);
			if (name == "Upgrade" || name == "Rollback" || name == "Restart") {
				std::string kind = name == "Upgrade" ? "upgrade" : name == "Rollback" ? "rollback" : "restart";
				return control_upgrade(params, kind);
			}
			if (name == "Abort")
				return control_abort(params);
			if (name == "Start" || name == "Stop")
				return control_start_stop(params, name == "Start");
			if (name == "Reexec")
				return control_reexec(params);
			return control_reload(params);
		} else if (iface == "io.brokerd.Worker") {
			if (name == "Hello")
				return worker_hello(params);
			if (name == "Ready")
				return worker_ready();
			if (name == "Status")
				return worker_status(params);
			if (name == "Events")
				return worker_events();
			if (name == "Handoff")
				return worker_handoff(params, std::move(m.fds));
			if (name == "Received")
				return worker_received(params);
		} else {
			return error(vl::kInterfaceNotFound, {{"interface", iface}});
		}
		return error(vl::kMethodNotFound, {{"method", method}});
	} catch (const json::exception &) {
		// A parameter of the wrong type surfaced while reading it.
		return error(vl::kInvalidParameter, {{"parameter", "parameters"}});
	}
}

} // namespace brokerd
