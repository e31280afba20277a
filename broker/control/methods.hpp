// The control socket's methods as one table: who may call each, whether it takes fds, and the
// handler that answers it. The table is both the authorization and the dispatch.
#pragma once

#include "control/access.hpp"
#include "control/server.hpp"
#include "proto/unique_fd.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace brokerd::control {

using Connection = ControlServer::Connection;

// One call, for its handler: its parameters (an object) and the fds that came with it.
struct Call {
	nlohmann::json params;
	std::vector<proto::UniqueFd> fds;
};

struct Method {
	std::string_view name; // with its interface: "io.brokerd.Control.Status"
	// The least tier that may call it; a caller below gets PermissionDenied. Some parameters
	// need more (access::reexec_binary, access::program_choice): their handlers ask.
	access::Tier tier;
	// Whether a call may bring fds: one that brings any to a method that takes none is refused.
	bool takes_fds;
	// Replies or errors exactly once (unless the call is oneway).
	void (Connection::*handler)(Call &call);
};

// Every method brokerd serves, each once: org.varlink.service, io.brokerd.Control and
// io.brokerd.Worker, as their .varlink files declare them.
std::span<const Method> methods();
// The method called `name` (with its interface), or nullptr.
const Method *find_method(std::string_view name);
// The tier the method called `name` needs, or nullopt for a method brokerd does not serve.
std::optional<access::Tier> required(std::string_view name);
// Whether brokerd serves any method of `interface`.
bool serves_interface(std::string_view interface);

} // namespace brokerd::control
