// libFuzzer target: brokerd.json text through config::parse, as --check-config, reload and
// upgrade read it.
//
// Any text is either a Config or a ConfigError: another exception is a message the operator
// cannot act on. A valid config's services go through the re-exec state codec and come back the
// same.
#include "config/config.hpp"
#include "fuzz.hpp"
#include "daemon/state.hpp"

#include <string_view>

using namespace brokerd;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	std::string_view text(reinterpret_cast<const char *>(data), size);
	config::Config cfg;
	try {
		cfg = config::parse(text);
	} catch (const config::ConfigError &e) {
		fuzz::check(*e.what() != '\0', "a ConfigError without a message");
		return 0;
	}
	for (const config::ServiceConfig &svc : cfg.services) {
		nlohmann::json saved = state::service_config(svc);
		fuzz::check(state::service_config(state::service_config(saved)) == saved,
		            "a service's config changed through the re-exec state");
	}
	return 0;
}
