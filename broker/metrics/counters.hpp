// Counters: what brokerd counts from its events for the metrics (restarts, crash loops, upgrades
// and their durations, rollbacks), free of processes and the clock so that it can be tested as a
// table.
#pragma once

#include "metrics/exposition.hpp"
#include "supervisor/events.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>

namespace brokerd::metrics {

class Counters {
public:
	// One service's counts, since brokerd started (or since the brokerd it re-executed from did).
	struct Service {
		std::uint64_t restarts = 0;    // an instance slot started again after its process ended
		std::uint64_t crash_loops = 0; // a slot stopped restarting
		std::uint64_t rollbacks = 0;   // an upgrade failed (or was aborted) and turned back
		// By (kind, result): kind "upgrade", "rollback", "restart" or "takeover"; result "done"
		// or "rolled-back".
		std::map<std::pair<std::string, std::string>, std::uint64_t> upgrades;
		std::map<std::string, Histogram> durations; // by result
	};

	// Counts what `e` tells. Every event passes here once, as Watch sees it.
	void observe(const Event &e);
	const std::map<std::string, Service> &services() const { return services_; }

	// Across a re-exec (the state's "metrics"); restore throws std::runtime_error on a value
	// of the wrong shape.
	nlohmann::json save() const;
	static Counters restore(const nlohmann::json &j);

	// Slots whose process ended and that may be restarted, remembered to tell a restart from a
	// first start. One that is never restarted (retired, not restarted by its policy) stays until
	// the oldest are forgotten past this many.
	static constexpr std::size_t kMaxEnded = 4096;

private:
	std::map<std::string, Service> services_;
	// Instance id -> the order it ended in; a draining one's exit is no candidate.
	std::map<std::string, std::uint64_t> ended_;
	std::set<std::string> draining_;
	std::uint64_t ended_seq_ = 0;
};

} // namespace brokerd::metrics
