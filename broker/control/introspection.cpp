// org.varlink.service: GetInfo and GetInterfaceDescription, from the embedded interface files.
#include "control/connection.hpp"

#include "broker_config.h"
#include "control/interfaces.hpp"

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

void ControlServer::Connection::get_info(control::Call &)
{
	json ifaces = json::array();
	for (const auto &t : interface_texts())
		ifaces.push_back(t.name);
	reply({{"vendor", "brokerd"},
	       {"product", "brokerd"},
	       {"version", BROKER_VERSION},
	       {"url", "https://github.com/brokerd/brokerd"},
	       {"interfaces", ifaces}});
}

void ControlServer::Connection::get_interface_description(control::Call &call)
{
	const json &params = call.params;
	auto it = params.find("interface");
	if (it == params.end() || !it->is_string())
		return error(vl::kInvalidParameter, {{"parameter", "interface"}});
	for (const auto &t : interface_texts())
		if (t.name == it->get<std::string>())
			return reply({{"description", t.description}});
	error(vl::kInterfaceNotFound, {{"interface", *it}});
}

} // namespace brokerd
