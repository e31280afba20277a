// io.brokerd.Control: Scale (the operator's instance count) and Signal (a signal to every instance).
#include "control/connection.hpp"

#include "config/config.hpp"

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

void ControlServer::Connection::control_scale(control::Call &call)
{
	const json &params = call.params;
	Service *svc = service_param(params, {"instances", "wait"});
	if (!svc)
		return;
	auto n = params.find("instances");
	if (n == params.end() || !n->is_number_unsigned() || n->get<std::uint64_t>() < 1 ||
	    n->get<std::uint64_t>() > config::kMaxInstances)
		return error(vl::kInvalidParameter,
		             {{"parameter", "instances"},
		              {"message", "expected a number of instances from 1 to " + std::to_string(config::kMaxInstances)}});
	bool wait = true;
	if (auto it = params.find("wait"); it != params.end() && !it->is_null()) {
		if (!it->is_boolean())
			return error(vl::kInvalidParameter, {{"parameter", "wait"}});
		wait = it->get<bool>();
	}
	auto scaled = server_.supervisor_.scale_service(*svc, n->get<unsigned>(), wait && !oneway_ ? this : nullptr);
	if (const Refusal *why = std::get_if<Refusal>(&scaled))
		return refused(*why);
	const auto &counts = std::get<Supervisor::Scaled>(scaled);
	json answer = {{"from", counts.from}, {"to", counts.to}};
	if (!counts.pending)
		return reply(std::move(answer));
	// finished() sends it once the new instances are ready or the drained ones exited.
	finished_reply_ = std::move(answer);
	waiting_ = true;
}

void ControlServer::Connection::control_signal(control::Call &call)
{
	const json &params = call.params;
	Service *svc = service_param(params, {"signal"});
	if (!svc)
		return;
	auto s = params.find("signal");
	std::optional<int> sig = s != params.end() && s->is_string() ? config::operator_signal(s->get<std::string>())
	                                                             : std::nullopt;
	if (!sig)
		return error(vl::kInvalidParameter,
		             {{"parameter", "signal"},
		              {"message", std::string("expected a signal name (") + config::kOperatorSignals +
		                              ", with or without SIG) or a number from 1 to 31"}});
	reply({{"signalled", server_.supervisor_.signal_service(*svc, *sig)}});
}

} // namespace brokerd
