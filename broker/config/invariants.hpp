// A running service's invariants: what its settings may not change, one rule for reload and the
// Upgrade call.
#pragma once

#include <string>
#include <vector>

namespace brokerd {

// What the rule needs to know of a running service.
struct RunningService {
	std::string name;
	bool removing = false;            // draining since a reload removed it
	std::vector<std::string> sockets; // its workers hold them at fd 3 and up, in this order
	bool registered = false;          // its workers register (no exec), rather than being spawned
};

// Which invariant a service's next settings would break, the first in this order.
enum class RunningChange {
	None,
	Draining, // it comes back only once it has drained
	Sockets,  // its workers' fds cannot change under them
	ExecKind, // spawned or registered stays as it was added
};

inline RunningChange running_change(const RunningService &running, const std::vector<std::string> &next_sockets,
                                    bool next_registered)
{
	if (running.removing)
		return RunningChange::Draining;
	if (running.sockets != next_sockets)
		return RunningChange::Sockets;
	if (running.registered != next_registered)
		return RunningChange::ExecKind;
	return RunningChange::None;
}

} // namespace brokerd
