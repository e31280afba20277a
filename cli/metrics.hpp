// brokerctl metrics: brokerd's metrics in the Prometheus text format.
#pragma once

#include "commands.hpp"

#include <iosfwd>

namespace brokerctl {

// Prints the Metrics reply's text as it is (--json: the reply); a truncated reply gets a note
// on stderr, and still exit 0.
int run_metrics(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out);

} // namespace brokerctl
