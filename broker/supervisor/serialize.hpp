// The supervisor's state as JSON, for the brokerd a reexec starts. The only part of the supervisor
// that knows a wire format; what it reads back, Supervisor::adopt() watches again.
#pragma once

#include <nlohmann/json.hpp>

#include <vector>

namespace brokerd {

class Supervisor;

struct Serializer {
	// Every service, generation and instance; the fds the next brokerd must inherit are added to
	// keep_fds. Call it only when Supervisor::busy() says nothing is.
	static nlohmann::json save(const Supervisor &supervisor, std::vector<int> &keep_fds);
	// In the next brokerd, before any service is added. Throws std::runtime_error (or
	// nlohmann::json's exceptions) on a state it cannot read.
	static void restore(Supervisor &supervisor, const nlohmann::json &services);
};

} // namespace brokerd
