// brokerd's own events as journal records, with their MESSAGE_IDs (os/journal_ids.hpp) and
// BROKER_* fields: free of I/O, so that the table can be tested as one.
#pragma once

#include "os/log.hpp"
#include "supervisor/events.hpp"

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd {

// Feeds on every Event and gives the records of those the journal keeps: an upgrade's start,
// its failure, its end (done or rolled back, with its duration), the handoff summary of an upgrade
// that handed connections, and a crash loop. It remembers, per service, what the upgrade's start
// and its handoff events said, for the records of its end.
class EventJournal {
public:
	// For an Upgrade event: `from`, the generation the upgrade leaves (none when the service had
	// none), and `by`, the uid that asked for it (none when brokerd began it: a takeover).
	std::vector<log::EventRecord> records(const Event &e, std::optional<std::uint64_t> from = std::nullopt,
	                                      std::optional<uid_t> by = std::nullopt);

private:
	struct Open {
		std::optional<std::uint64_t> from, to;
		std::string kind;
		HandoffCounts handoff;
		std::optional<uid_t> by;
	};
	std::map<std::string, Open, std::less<>> open_;
};

// The events that are no Event: brokerd's own.
log::EventRecord reload_record(std::string_view config_path);
log::EventRecord reexec_record(std::string_view version, std::size_t services, std::size_t connections);
log::EventRecord shutdown_record(std::string_view signal, usec_t budget);

} // namespace brokerd
