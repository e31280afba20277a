// brokerctl metrics (see metrics.hpp).
#include "metrics.hpp"

#include "connection.hpp"
#include "errors.hpp"

#include "proto/names.hpp"

#include <nlohmann/json.hpp>

#include <iostream>

namespace brokerctl {

using json = nlohmann::json;

int run_metrics(const Options &opts, const Arguments &, Connection &broker, std::ostream &out)
{
	json reply = broker.call(proto::names::control::kMetrics);
	if (opts.json)
		out << reply.dump(2, ' ', false, json::error_handler_t::replace) << '\n';
	else
		out << reply.value("text", "");
	if (reply.value("truncated", false))
		std::cerr << "brokerctl: the metrics were cut to fit one reply: some families are left out "
		             "(metrics.listen serves them all)\n";
	if (!out.flush())
		throw Failure(kExitFailure, "cannot write to standard output");
	return kExitOk;
}

} // namespace brokerctl
