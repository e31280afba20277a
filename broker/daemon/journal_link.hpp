// JournalLink: where workers' output lines go under logging.journal, the journal's native
// socket or brokerd's stderr, and the back-pressure a full journal puts on the workers' pipes.
#pragma once

#include "config/config.hpp"
#include "daemon/journal_events.hpp"
#include "os/journal.hpp"
#include "supervisor/supervisor.hpp"

#include <cstdint>
#include <memory>
#include <string_view>

namespace brokerd {

class JournalLink {
public:
	JournalLink(sd_event *event, Supervisor &supervisor) : event_(event), supervisor_(supervisor) {}

	// Opens the journal's socket when `mode` says so (config::JournalMode), or closes it; what
	// waited for a socket closed here goes to stderr.
	void apply(config::JournalMode mode);
	bool active() const { return journal_ != nullptr; }
	// One of the supervisor's events: the journal records of those it keeps (EventJournal),
	// logged once each (log::event), in the journal or on stderr.
	void event(const Event &e);
	// Messages a full journal made brokerd drop (its own events, the last lines of ended pipes).
	std::uint64_t dropped() const { return dropped_ + (journal_ ? journal_->dropped() : 0); }

private:
	bool output_line(const Instance &inst, int stream, std::string_view line, bool last);
	void refused(int err);
	void send_event(const log::EventRecord &r);

	sd_event *event_;
	Supervisor &supervisor_;
	std::unique_ptr<journal::Journal> journal_;
	std::uint64_t dropped_ = 0; // of journals closed since
	bool refusal_said_ = false;
	EventJournal events_;
};

} // namespace brokerd
