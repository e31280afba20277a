// JournalLink: workers' output lines to the journal, one native message each, or to stderr.
#include "daemon/journal_link.hpp"

#include "os/log.hpp"

#include <errno.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace brokerd {

void JournalLink::apply(config::JournalMode mode)
{
	bool want = mode == config::JournalMode::Always ||
	            (mode == config::JournalMode::Auto && log::stderr_is_journal());
	if (!want || journal_) {
		if (!want && journal_) {
			dropped_ += journal_->dropped();
			journal_.reset();
			log::set_event_sink(nullptr);
			log::info("journal: workers' output goes to stderr from now on");
			supervisor_.resume_output();
		}
		return;
	}
	proto::UniqueFd fd = journal::connect_socket();
	if (!fd) {
		// "always" on a host without journald, or a journald that went away: said once.
		log::warning(std::string("journal: cannot connect to ") + journal::kSocketPath + ": " + std::strerror(errno) +
		             "; workers' output goes to stderr, ignoring");
	} else {
		journal_ = std::make_unique<journal::Journal>(event_, std::move(fd));
		journal_->writable = [this] { supervisor_.resume_output(); };
		journal_->failed = [this](int err) { refused(err); };
		log::set_event_sink([this](const log::EventRecord &r) { send_event(r); });
		log::info("journal: workers' output goes to the journal, one message a line");
	}
	supervisor_.output_line = [this](const Instance &inst, int stream, std::string_view line, bool last) {
		return output_line(inst, stream, line, last);
	};
}

bool JournalLink::output_line(const Instance &inst, int stream, std::string_view line, bool last)
{
	if (!journal_) {
		log::worker_line(stream, inst.id, line);
		return true;
	}
	std::string message = journal::worker_message({.service = inst.service->name,
	                                               .instance = inst.id,
	                                               .generation = inst.generation->number,
	                                               .pid = inst.pid,
	                                               .stream = stream,
	                                               .line = line});
	if (last) {
		journal_->queue(std::move(message));
		return true;
	}
	switch (journal_->send(message)) {
	case journal::Sent::Ok:
		return true;
	case journal::Sent::Again:
		return false;
	case journal::Sent::Failed:
		refused(errno);
		log::worker_line(stream, inst.id, line);
		return true;
	}
	return true;
}

void JournalLink::event(const Event &e)
{
	std::optional<std::uint64_t> from;
	std::optional<uid_t> by;
	if (e.kind == EventKind::Upgrade)
		if (Service *svc = supervisor_.find_service(e.service)) {
			if (svc->upgrade && svc->upgrade->from)
				from = svc->upgrade->from->number;
			// Who asked for the generation it rolls out, as its history record keeps it.
			if (const HistoryRecord *rec = e.generation ? svc->history.find(*e.generation) : nullptr)
				by = rec->by;
		}
	for (const log::EventRecord &r : events_.records(e, from, by))
		log::event(r);
}

// One native message, behind whatever waits: a full journal queues it (the oldest dropped and counted).
void JournalLink::send_event(const log::EventRecord &r)
{
	const std::string level = std::to_string(static_cast<int>(r.level));
	std::vector<journal::Field> fields{{"MESSAGE", r.message},
	                                   {"MESSAGE_ID", r.message_id},
	                                   {"PRIORITY", level},
	                                   {"SYSLOG_IDENTIFIER", program_invocation_short_name}};
	for (const auto &[name, value] : r.fields)
		fields.push_back({name, value});
	journal_->queue(journal::encode(fields));
}

void JournalLink::refused(int err)
{
	if (refusal_said_)
		return;
	refusal_said_ = true;
	log::warning(std::string("journal: a message was refused: ") + std::strerror(err) +
	             "; such lines go to stderr, ignoring");
}

} // namespace brokerd
