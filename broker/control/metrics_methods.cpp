// io.brokerd.Control.Metrics: the metrics in the Prometheus text format, over the control socket.
#include "control/connection.hpp"

#include "metrics/exposition.hpp"

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

void ControlServer::Connection::control_metrics(control::Call &call)
{
	if (!call.params.empty())
		return error(vl::kInvalidParameter, {{"parameter", call.params.begin().key()}});
	std::vector<metrics::Family> families = server_.hooks_.metrics ? server_.hooks_.metrics()
	                                                               : std::vector<metrics::Family>{};
	metrics::Rendered r = metrics::render(families, proto::limits::kMaxMetricsText);
	reply({{"text", std::move(r.text)}, {"truncated", r.truncated}});
}

} // namespace brokerd
