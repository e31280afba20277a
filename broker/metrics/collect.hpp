// The metric families brokerd exposes, gathered from its parts at the moment of a scrape.
#pragma once

#include "metrics/counters.hpp"
#include "metrics/exposition.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <list>
#include <vector>

namespace brokerd {

class Supervisor;
struct Listener;

namespace metrics {

// What the collection reads beside the supervisor: the control socket's connections by tier
// (worker, reader, admin, root: access::Tier's order), the sock_diag fd for unix listeners'
// queues (-1: none), and the messages a full journal made brokerd drop.
struct Sources {
	const Supervisor &supervisor;
	const Counters &counters;
	std::array<std::size_t, 4> connections{};
	int diag_fd = -1;
	std::uint64_t journal_dropped = 0;
};

// Every family, in a fixed order (docs/protocol.md's Metrics table): brokerd_*, then the
// standard process_* ones. Gauges of states list every state, 0 included, so a series never
// disappears while its service exists.
std::vector<Family> collect(const Sources &sources);

} // namespace metrics
} // namespace brokerd
