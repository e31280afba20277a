// The supervisor's side of a connection handoff: which instances receive, and the counters.
#include "supervisor/supervisor.hpp"

#include "os/log.hpp"
#include "proto/handoff_channel.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace brokerd {

// The ready instances of the generation that succeeds the sender's and said accept_handoff:
// during an upgrade the one being rolled out, otherwise the current one, if newer.
std::vector<Instance *> Supervisor::handoff_receivers(const Instance &sender) const
{
	const Service &svc = *sender.service;
	const Generation *next = svc.upgrade ? svc.upgrade->to : svc.current;
	std::vector<Instance *> out;
	if (!next || next->number <= sender.generation->number || svc.removing)
		return out;
	for (const auto &inst : next->instances)
		if (inst->state == InstanceState::Ready && inst->accepts_handoff && inst->events && !inst->retired())
			out.push_back(inst.get());
	return out;
}

std::vector<EventSink *> Supervisor::handoff_targets(const Instance &sender) const
{
	std::vector<EventSink *> out;
	for (Instance *inst : handoff_receivers(sender))
		out.push_back(inst->events);
	return out;
}

// Introduces sender to each receiver it has not met (this process, that process): a socket pair
// each, one end to either. The path stays brokerd's (an empty list) unless every receiver speaks
// the channel, so that a batch is never split between the two paths; and a sender introduced to
// all of them already gets none, so that a worker asking again and again makes no more sockets.
void Supervisor::handoff_peers(Instance &sender, EventSink &sink)
{
	std::vector<Instance *> receivers = handoff_receivers(sender);
	// Read after its process exited (its connection outlives it): nobody to introduce.
	bool direct = sender.generation->cfg.handoff == config::HandoffPath::Direct && !receivers.empty() &&
	              sender.pid > 0 && sender.events == &sink;
	for (Instance *r : receivers)
		direct = direct && r->peer_handoff;
	if (sender.peers_of != sender.pid) {
		sender.peers.clear(); // another process in the slot
		sender.peers_of = sender.pid;
	}
	std::vector<HandoffPeer> ends;
	std::vector<std::string> names;
	for (Instance *r : direct ? receivers : std::vector<Instance *>()) {
		auto met = std::find_if(sender.peers.begin(), sender.peers.end(),
		                        [&](const Instance::PeerLink &l) { return l.instance == r->id && l.pid == r->pid; });
		if (met != sender.peers.end() || sender.peers.size() >= proto::handoff::channel::kMaxPeers)
			continue;
		int sv[2];
		if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
			log::warning("instance " + sender.id + ": no direct handoff channel to " + r->id + ": socketpair: " +
			             std::strerror(errno));
			continue;
		}
		proto::UniqueFd mine(sv[0]), theirs(sv[1]);
		// Room for the frames in flight on the sender's end (proto/handoff_channel.hpp), forced
		// past wmem_max when brokerd may (CAP_NET_ADMIN); what wmem_max allows otherwise. The
		// receiver's end writes only acknowledgements.
		int size = proto::handoff::channel::kChannelBuffer;
		if (::setsockopt(mine.get(), SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
			::setsockopt(mine.get(), SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
		if (!r->events->send_peer(HandoffPeer{sender.id, sender.pid, std::move(theirs)}))
			continue;
		sender.peers.push_back(Instance::PeerLink{r->id, r->pid});
		sender.service->handoff_channels++;
		names.push_back(r->id);
		ends.push_back(HandoffPeer{r->id, r->pid, std::move(mine)});
	}
	if (!ends.empty()) {
		std::string list;
		for (const std::string &n : names)
			list += (list.empty() ? "" : ", ") + n;
		log::info("instance " + sender.id + ": direct handoff channel(s) to " + list);
	}
	sink.send_peers(std::move(ends));
}

// Counts as the router counts its own: handed when sent, then received or returned, on a channel
// brokerd made, never more back than went. A receiver that has gone since counts for the service
// and the upgrade only.
std::optional<std::string> Supervisor::handoff_handed(Instance &sender, const Handed &h)
{
	Service &svc = *sender.service;
	auto link = std::find_if(sender.peers.rbegin(), sender.peers.rend(),
	                         [&](const Instance::PeerLink &l) { return l.instance == h.peer; });
	if (link == sender.peers.rend())
		return "no channel to " + h.peer + " was made for this process";
	if (link->landed + link->returned + h.landed + h.returned > link->sent + h.sent)
		return "more landed and returned than sent to " + h.peer;
	if (!h.sent && !h.landed && !h.returned && h.remaining == sender.handoff_remaining)
		return std::nullopt; // nothing moved
	link->sent += h.sent;
	link->landed += h.landed;
	link->returned += h.returned;
	sender.handoff.handed += h.sent;
	sender.handoff.returned += h.returned;
	sender.handoff_remaining = h.remaining;
	for (HandoffCounts *c : {&svc.handoff, svc.upgrade ? &svc.upgrade->handoff : nullptr}) {
		if (!c)
			continue;
		c->handed += h.sent;
		c->received += h.landed;
		c->returned += h.returned;
	}
	for (const auto &gen : svc.generations)
		for (const auto &inst : gen->instances)
			if (inst->id == h.peer)
				inst->handoff.received += h.landed;
	handoff_progress(svc);
	return std::nullopt;
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
	router_.submit(svc.name, sink, batch, std::move(items), targets, HandoffOrigin{sender.id, sender.pid, 0, 0});
	// The router may have closed connections on the way: look the service up again.
	if (Service *s = find_service(svc.name))
		handoff_progress(*s);
}

std::optional<std::string> Supervisor::handoff_received(EventSink &sink, std::uint64_t batch,
                                                        const std::vector<std::uint64_t> &refused)
{
	return router_.received(sink, batch, refused);
}

std::optional<std::string> Supervisor::handoff_resume(Instance &inst, EventSink &sink,
                                                      std::vector<HandoffDoubts::Receipt> received,
                                                      const std::vector<HandoffDoubts::InDoubt> &in_doubt)
{
	Service &svc = *inst.service;
	// A receiver vouches only for connections of its own service: what it says makes their
	// senders close their copies. It may name instances that are gone by now (it remembers its
	// last chunks, whenever they came): those match no batch in doubt.
	for (const auto &r : received)
		if (!r.instance.starts_with(svc.name + "/"))
			return "a receipt names instance \"" + r.instance + "\", which is not of service " + svc.name;
	if (!in_doubt.empty() || !received.empty())
		log::notice("instance " + inst.id + ": after the restart, " + std::to_string(in_doubt.size()) +
		            " handoff batch(es) in doubt, " + std::to_string(received.size()) + " chunk(s) received before");
	for (const auto &d : in_doubt) {
		recovery_.doubt_batches++;
		recovery_.doubt_connections += d.count;
	}
	doubts_.resume(svc.name, inst.id, inst.pid, sink, std::move(received), in_doubt);
	settle_doubts(doubts_.take_resolved());
	return std::nullopt;
}

// Tells senders how their batches in doubt ended, and counts them as the router counts its own.
// Once nobody is left to speak, the books close: only once the crash restore opened them (the
// timer runs), never while it still finds processes, one gone before another is expected.
void Supervisor::settle_doubts(std::vector<HandoffDoubts::Resolved> resolved)
{
	if (doubts_timer_ && !doubts_.closed() && doubts_.silent() == 0 && doubts_.pending() == 0) {
		doubts_.expire();
		doubts_timer_.reset();
	}
	for (auto &r : resolved) {
		log::notice("service " + r.service + ": handoff batch " + std::to_string(r.result.batch) +
		            " in doubt since the restart: " + std::to_string(r.result.landed) + " landed, " +
		            std::to_string(r.result.returned.size()) + " returned, " +
		            std::to_string(r.result.abandoned.size()) + " abandoned");
		recovery_.doubt_landed += r.result.landed;
		recovery_.doubt_returned += r.result.returned.size();
		recovery_.doubt_abandoned += r.result.abandoned.size();
		handoff_report(HandoffRouter::Report{r.service, r.sender, nullptr, r.result.landed,
		                                     r.result.returned.size() + r.result.abandoned.size()});
		r.sender->send_handoff_result(r.result);
		if (Service *svc = find_service(r.service))
			handoff_progress(*svc);
	}
}

int Supervisor::doubts_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	auto *self = static_cast<Supervisor *>(userdata);
	if (self->doubts_.silent() > 0)
		log::warning(std::to_string(self->doubts_.silent()) + " instance(s) did not say what they received within " +
		             std::to_string(msec(kResumeTimeout) / 1000) + " s of the restart");
	self->doubts_timer_.reset();
	self->settle_doubts(self->doubts_.expire());
	return 0;
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
