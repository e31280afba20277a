// The supervisor's side of a connection handoff: which instances receive, and the counters.
#include "supervisor/supervisor.hpp"

namespace brokerd {

// The ready instances of the generation that succeeds the sender's and said accept_handoff:
// during an upgrade the one being rolled out, otherwise the current one, if newer.
std::vector<EventSink *> Supervisor::handoff_targets(const Instance &sender) const
{
	const Service &svc = *sender.service;
	const Generation *next = svc.upgrade ? svc.upgrade->to : svc.current;
	std::vector<EventSink *> out;
	if (!next || next->number <= sender.generation->number || svc.removing)
		return out;
	for (const auto &inst : next->instances)
		if (inst->state == InstanceState::Ready && inst->accepts_handoff && inst->events && !inst->retired())
			out.push_back(inst->events);
	return out;
}

void Supervisor::handoff(Instance &sender, EventSink &sink, std::uint64_t batch, std::vector<HandoffItem> items,
                         std::uint64_t remaining)
{
	Service &svc = *sender.service;
	std::uint64_t n = items.size();
	sender.handoff.handed += n;
	sender.handoff_remaining = remaining;
	svc.handoff.handed += n;
	if (svc.upgrade)
		svc.upgrade->handoff.handed += n;
	std::vector<EventSink *> targets = handoff_targets(sender);
	router_.submit(svc.name, sink, batch, std::move(items), targets);
	// The router may have closed connections on the way: look the service up again.
	if (Service *s = find_service(svc.name))
		handoff_progress(*s);
}

std::optional<std::string> Supervisor::handoff_received(EventSink &sink, std::uint64_t batch,
                                                        const std::vector<std::uint64_t> &refused)
{
	return router_.received(sink, batch, refused);
}

void Supervisor::handoff_report(const HandoffRouter::Report &r)
{
	Service *svc = find_service(r.service);
	if (!svc)
		return;
	svc->handoff.received += r.landed;
	svc->handoff.returned += r.returned;
	if (svc->upgrade) {
		svc->upgrade->handoff.received += r.landed;
		svc->upgrade->handoff.returned += r.returned;
	}
	if (Instance *to = find_by_sink(r.receiver))
		to->handoff.received += r.landed;
	if (Instance *from = find_by_sink(r.sender))
		from->handoff.returned += r.returned;
	if (r.receiver)
		handoff_progress(*svc);
}

// At most ten progress events a second while connections move, and always the one that shows
// them all settled.
void Supervisor::handoff_progress(Service &svc)
{
	const HandoffCounts &c = svc.upgrade ? svc.upgrade->handoff : svc.handoff;
	HandoffTotals totals = handoff_totals(svc, c);
	bool settled = c.handed == c.received + c.returned && totals.expected == c.handed;
	usec_t now = now_usec(CLOCK_MONOTONIC);
	if (!settled && now - svc.handoff_reported < 100000)
		return;
	svc.handoff_reported = now;
	std::string message = "migrating connections " + std::to_string(c.received) + "/" + std::to_string(totals.expected);
	if (c.returned)
		message += ", " + std::to_string(c.returned) + " returned";
	if (Upgrade *up = svc.upgrade.get())
		notify_observers(*up, progress(svc, EventKind::Handoff, nullptr, message));
	emit_service(svc, EventKind::Handoff, message, totals);
}

} // namespace brokerd
