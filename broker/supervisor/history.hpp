// A service's history: one record per generation, newest last, bounded; what `brokerctl history`
// shows and what `rollback --to` deploys. Free of processes and the clock so that it can be
// tested as a table.
#pragma once

#include "config/config.hpp"
#include "os/time.hpp"

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string_view>
#include <vector>

namespace brokerd {

// How a generation came: brokerd started it from the config or on Start, an operator's upgrade,
// rollback or restart, or a registered worker's version (the first one, or one taking over).
enum class GenerationOrigin { Start, Upgrade, Rollback, Restart, Takeover, Registration };

// How it ended, or Serving while it has not: replaced by the next one, rolled back (its rollout
// failed or was aborted), failed (it never got an instance ready), or stopped (Stop, or removed
// from the config).
enum class GenerationResult { Serving, Replaced, RolledBack, Failed, Stopped };

// The names History and the saved state give them ("rolled-back").
std::string_view origin_name(GenerationOrigin how);
std::string_view result_name(GenerationResult result);
std::optional<GenerationOrigin> origin_named(std::string_view name);
std::optional<GenerationResult> result_named(std::string_view name);

struct HistoryRecord {
	std::uint64_t generation = 0;
	config::ServiceConfig cfg; // kept whole, env included, for a rollback to it; env is never shown
	usec_t started = 0;        // CLOCK_REALTIME; 0 when not known (a state from before history)
	usec_t ended = 0;          // CLOCK_REALTIME; 0 while it serves
	GenerationOrigin how = GenerationOrigin::Start;
	GenerationResult result = GenerationResult::Serving;
	std::optional<uid_t> by; // the uid that asked for it; none when brokerd itself started it
};

class History {
public:
	// Records kept per service: the oldest goes first.
	static constexpr std::size_t kLength = 32;

	// A new generation, numbered above every one before it.
	void begin(HistoryRecord record);
	// The generation's record ends with `result` at `now`, unless it ended already.
	void end(std::uint64_t generation, GenerationResult result, usec_t now);
	// Every record that has not ended ends so (a service stopped or removed).
	void end_all(GenerationResult result, usec_t now);

	// Changes with every change of the records, and differs between any two histories: what a
	// saved copy of them is checked against (Serializer::save_text).
	std::uint64_t revision() const { return revision_; }

	const HistoryRecord *find(std::uint64_t generation) const;
	// The generation numbers still known, oldest first.
	std::vector<std::uint64_t> known() const;
	const std::deque<HistoryRecord> &records() const { return records_; }
	// Each record's configuration, to bring up to date what a load of the config resolves anew
	// (its accounts): what rollback --to deploys runs as the config in force says.
	template <typename F> void each_config(F &&f)
	{
		revision_ = fresh_revision();
		for (HistoryRecord &r : records_)
			f(r.cfg);
	}

private:
	// An ended record keeps how it ended.
	void end_if(const std::function<bool(const HistoryRecord &)> &which, GenerationResult result, usec_t now);

	static std::uint64_t fresh_revision();

	std::deque<HistoryRecord> records_;
	std::uint64_t revision_ = fresh_revision();
};

} // namespace brokerd
