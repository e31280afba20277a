// The Varlink interface descriptions brokerd serves through GetInterfaceDescription.
#pragma once

#include <string_view>
#include <vector>

namespace brokerd {

struct InterfaceText {
	std::string_view name;
	std::string_view description;
};

// org.varlink.service, io.brokerd.Control and io.brokerd.Worker, embedded at build time.
const std::vector<InterfaceText> &interface_texts();

} // namespace brokerd
