// broker::Client's direct handoff channels: a sender writes its connections straight to each
// receiver on a socket pair brokerd made for the two, and the receiver acknowledges each frame
// there (proto/handoff_channel.hpp). brokerd still counts: the sender tells it what moved
// (Handed). One kernel hop instead of two, and no JSON per connection.
//
// What holds whatever happens:
// - A sender keeps each connection until its frame is acknowledged. A channel that ends first
//   (the receiver died or broke the protocol) gives its unacknowledged connections back
//   (on_returned), as brokerd's path does with a receiver that goes; what was never sent goes to
//   the other receivers or, when none is left, brokerd's path.
// - A receiver acknowledges a frame once on_connection has each of its connections, so one that
//   dies in its handler (a broken new version) loses none: the sender serves them on, as with
//   brokerd's path. A frame it never acknowledges closes with the channel, or with it.
#include "client_impl.hpp"

#include "proto/handoff_channel.hpp"
#include "proto/names.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <utility>

namespace broker {

using detail::now_usec;
using proto::varlink::json;
using namespace proto::names::worker;
namespace channel = proto::handoff::channel;

namespace {

using channel::kMaxPeers;
// The fd table a receiver grows to when connections first come (see grow_fd_table()).
constexpr rlim_t kFdTableSlots = 65536;
// Frames read from one channel in a row before the others get a turn.
constexpr std::size_t kFramesPerWakeup = 64;

// A {instance, fd} entry of a "peers" or "peer" event: its end of the channel and who is at the
// other, or nullopt when malformed.
std::optional<std::pair<std::string, proto::UniqueFd>> peer_entry(const json &p, std::vector<proto::UniqueFd> &fds)
{
	if (!p.is_object())
		return std::nullopt;
	auto fd = p.find("fd");
	auto instance = p.find("instance");
	if (fd == p.end() || !fd->is_number_unsigned() || fd->get<std::size_t>() >= fds.size() || instance == p.end() ||
	    !instance->is_string())
		return std::nullopt;
	return std::pair{instance->get<std::string>(), std::move(fds[fd->get<std::size_t>()])};
}

} // namespace

// Events' parameters after a Hello whose reply is hello_reply: a brokerd that makes direct
// channels is told that this library speaks them. From then on fd() is an epoll set holding the
// stream and the channels, the same for the Client's life: made when fd() changes anyway (a new
// Client, or a reconnect).
json Client::Impl::events_parameters(const json &hello_reply)
{
	auto said = hello_reply.find("peer_handoff");
	peer_handoff = said != hello_reply.end() && said->is_boolean() && said->get<bool>();
	if (peer_handoff && !epoll) {
		epoll = proto::UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
		peer_handoff = epoll.valid();
	}
	watch();
	return peer_handoff ? json{{"peer_handoff", true}} : json::object();
}

std::size_t Client::Impl::pending() const
{
	return sender.pending() + unacked_out;
}

// The answer to our Peers call: a channel per receiver, or none, and brokerd's path is ours.
void Client::Impl::peers_event(const json &params, std::vector<proto::UniqueFd> &fds)
{
	// An answer nobody here waits for (a Peers of a connection lost since) just closes its ends.
	bool asked = path == Path::Asked;
	auto list = params.find("peers");
	bool ok = list != params.end() && list->is_array();
	for (const json &p : ok ? *list : json::array()) {
		auto entry = peer_entry(p, fds);
		ok = ok && entry;
		if (asked && entry && entry->second)
			add_peer(std::move(entry->second), std::move(entry->first), true);
	}
	if (asked) {
		bool any = std::any_of(peers.begin(), peers.end(),
		                       [](const auto &p) { return p->sending && !p->ended && !p->unwritable; });
		path = any ? Path::Direct : Path::Brokered;
		pump();
	}
	if (!ok)
		throw Error(EBADMSG, "invalid peers event from brokerd");
}

// A sender of our service will write connections on this channel.
void Client::Impl::peer_event(const json &params, std::vector<proto::UniqueFd> &fds)
{
	auto p = params.find("peer");
	auto entry = p == params.end() ? std::nullopt : peer_entry(*p, fds);
	if (!entry)
		throw Error(EBADMSG, "invalid peer event from brokerd");
	auto receiving = static_cast<std::size_t>(
	        std::count_if(peers.begin(), peers.end(), [](const auto &q) { return !q->sending; }));
	if (!entry->second || receiving >= kMaxPeers)
		return;
	if (Peer *added = add_peer(std::move(entry->second), std::move(entry->first), false))
		grow_fd_table(added->fd.get());
}

// Connections are coming, as many as a sender's window: the process's fd table grows to hold
// them now, in one step, instead of doubling again and again as they arrive. In a process with
// more than one thread each step waits for an RCU grace period (about 10 ms); here it costs
// one. Up to the fd limit, at most kFdTableSlots (512 KiB of kernel memory); tables never shrink,
// so once is enough.
void Client::Impl::grow_fd_table(int any_fd)
{
	if (std::exchange(fd_table_grown, true))
		return;
	rlimit nofile{};
	if (::getrlimit(RLIMIT_NOFILE, &nofile) < 0)
		return;
	rlim_t slots = std::min<rlim_t>(nofile.rlim_cur, kFdTableSlots);
	if (slots < 2)
		return;
	int top = ::fcntl(any_fd, F_DUPFD_CLOEXEC, static_cast<int>(slots - 1));
	if (top >= 0)
		::close(top);
}

// Into the epoll set that fd() is. Null, the end closed, when it cannot be watched: its sender
// takes back what it writes, or ours go brokerd's way.
Client::Impl::Peer *Client::Impl::add_peer(proto::UniqueFd fd, std::string instance, bool sending)
{
	auto sending_peers = std::count_if(peers.begin(), peers.end(), [](const auto &q) { return q->sending; });
	if (sending && static_cast<std::size_t>(sending_peers) >= kMaxPeers)
		return nullptr;
	if (!epoll)
		return nullptr; // brokerd sends channels only to those whose Events said peer_handoff
	epoll_event e{};
	e.events = EPOLLIN;
	e.data.fd = fd.get();
	if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd.get(), &e) < 0)
		return nullptr;
	auto p = std::make_unique<Peer>();
	p->fd = std::move(fd);
	p->instance = std::move(instance);
	p->sending = sending;
	p->watched = EPOLLIN;
	peers.push_back(std::move(p));
	return peers.back().get();
}

// Frames to the receivers in turn, while one has room; what they cannot take waits in the queue.
void Client::Impl::pump_direct()
{
	const auto &queue = sender.queue();
	std::vector<int> fds;
	while (!queue.empty()) {
		if (retry_at && now_usec() < retry_at)
			return;
		retry_at = 0;
		Peer *p = nullptr;
		for (std::size_t k = 0; k < peers.size() && !p; k++) {
			Peer &c = *peers[(rotation + k) % peers.size()];
			if (c.sending && !c.ended && !c.unwritable && !c.blocked && unacked_out < window_fds) {
				p = &c;
				rotation = (rotation + k + 1) % peers.size();
			}
		}
		if (!p)
			break;
		std::size_t n = channel::frame_fit(queue, window_fds - unacked_out);
		channel::encode_connections(frame_buffer, next_frame, queue, n);
		fds.clear();
		for (std::size_t i = 0; i < n; i++)
			fds.push_back(queue[i].fd.get());
		int r = channel::send_frame(p->fd.get(), frame_buffer, fds);
		if (r == -EAGAIN) {
			p->blocked = true;
			continue;
		}
		if (r == -ETOOMANYREFS) {
			retry_at = now_usec() + detail::kFdPressureRetry;
			return;
		}
		if (r < 0) {
			// Gone, most likely (EPIPE): its acknowledgements may still wait to be read, so the
			// channel ends only when read_acks() reaches its end.
			p->unwritable = true;
			continue;
		}
		p->unacked.emplace(next_frame++, sender.take_front(n));
		p->unacked_count += n;
		unacked_out += n;
		p->sent += n;
	}
	if (!queue.empty() &&
	    std::none_of(peers.begin(), peers.end(), [](const auto &q) { return q->sending && !q->ended && !q->unwritable; }))
		path = Path::Unasked; // no receiver left to write to: ask brokerd again
}

// The channel to a receiver has ended: what it never acknowledged comes back.
void Client::Impl::lose_peer(Peer &p, std::vector<proto::handoff::Item> &back)
{
	p.ended = true;
	for (auto &[id, items] : p.unacked) {
		p.returned += items.size();
		for (auto &item : items)
			back.push_back(std::move(item));
	}
	p.unacked.clear();
	unacked_out -= p.unacked_count;
	p.unacked_count = 0;
}

// A receiver's acknowledgements: the landed connections close here, the refused come back.
// Anything else from it (fds, a frame we never sent, bad indices) ends the channel.
bool Client::Impl::read_acks(Peer &p, std::vector<proto::handoff::Item> &back)
{
	bool did = false;
	channel::Received got;
	channel::Ack ack;
	// The landed ones close together on the way out, whatever way: the receiver holds them now.
	struct Closing {
		std::vector<int> fds;
		~Closing() { proto::close_all(fds); }
	} landed_fds;
	for (std::size_t n = 0; n < kFramesPerWakeup && !p.ended; n++) {
		int r = channel::receive_frame(p.fd.get(), frame_buffer, got);
		if (r == -EAGAIN)
			break;
		did = true;
		std::string_view bytes(frame_buffer.data(), r > 0 ? got.size : 0);
		auto frame = p.unacked.end();
		if (r > 0 && got.fds.empty() && !got.truncated && !channel::decode_ack(bytes, ack))
			frame = p.unacked.find(ack.id);
		if (frame == p.unacked.end() || channel::decode_ack(bytes, ack, frame->second.size())) {
			lose_peer(p, back);
			break;
		}
		std::vector<proto::handoff::Item> &items = frame->second;
		// Everything that allocates first: should it fail, the frame is still whole.
		landed_fds.fds.reserve(landed_fds.fds.size() + items.size());
		back.reserve(back.size() + ack.refused.size());
		for (std::uint32_t i : ack.refused)
			back.push_back(std::move(items[i]));
		for (auto &item : items)
			if (item.fd)
				landed_fds.fds.push_back(item.fd.release());
		std::size_t landed = items.size() - ack.refused.size();
		p.landed += landed;
		p.returned += ack.refused.size();
		summary.landed += landed;
		p.unacked_count -= items.size();
		unacked_out -= items.size();
		p.unacked.erase(frame);
	}
	return did;
}

// The next frame from a sender, checked, or false: none waits, the channel ended, or the frame
// broke the protocol (which ends the channel, its fds closed).
bool Client::Impl::read_frame(Peer &p, Frame &f)
{
	channel::Received got;
	channel::Connections decoded;
	int r = channel::receive_frame(p.fd.get(), frame_buffer, got);
	if (r == -EAGAIN)
		return false;
	if (r <= 0 || got.truncated || channel::decode_connections(std::string_view(frame_buffer.data(), got.size), decoded) ||
	    got.fds.size() > decoded.states.size() || (got.fds.size() < decoded.states.size() && !got.fds_cut)) {
		p.ended = true;
		return false;
	}
	f.id = decoded.id;
	f.fds = std::move(got.fds);
	f.fds.resize(decoded.states.size()); // those the fd limit cut off: refused
	f.states.assign(decoded.states.begin(), decoded.states.end());
	return true;
}

// A frame's connections to on_connection, then its acknowledgement: a receiver that dies inside
// the handler never acknowledged them, and its sender still serves them. Refused, and closed
// here, are those whose fd did not arrive, all of them without a handler, and the rest of them
// once a handler threw (as a brokered chunk's).
void Client::Impl::take_frame(Peer &p, Frame &frame, std::exception_ptr &failure)
{
	std::vector<std::uint32_t> refused;
	for (std::size_t i = 0; i < frame.fds.size(); i++) {
		if (!frame.fds[i] || !on_connection || failure) {
			refused.push_back(static_cast<std::uint32_t>(i));
			continue;
		}
		try {
			on_connection(frame.fds[i].release(), std::move(frame.states[i]));
		} catch (...) {
			failure = std::current_exception(); // the handler owns that one
		}
	}
	frame.fds.clear(); // the refused ones close before the sender hears of them
	std::string ack;
	channel::encode_ack(ack, frame.id, refused);
	p.acks.push_back(std::move(ack));
}

// Writes what acknowledgements the socket takes. With the sender gone (EPIPE) they have nobody
// to go to, and need none: its copies closed as it went.
void Client::Impl::write_acks(Peer &p)
{
	p.blocked = false;
	while (!p.acks.empty()) {
		int r = channel::send_frame(p.fd.get(), p.acks.front(), {});
		if (r == -EAGAIN) {
			p.blocked = true;
			return;
		}
		if (r < 0) {
			// The sender has gone (EPIPE): nobody to tell, nor any need, and what it wrote
			// before is still read to the end. Any other error ends the channel.
			p.acks.clear();
			if (!detail::is_disconnect(r))
				p.ended = true;
			return;
		}
		p.acks.pop_front();
	}
}

// Every channel's pending reads and writes, then what they brought: connections to
// on_connection, refused ones to on_returned, and the queue onward.
bool Client::Impl::serve_peers()
{
	std::size_t before = pending();
	bool did = false;
	std::exception_ptr failure;
	auto keep = [&] {
		if (!failure)
			failure = std::current_exception();
	};
	// Which channels are ready, from the set fd() is: a full channel is tried again only once it
	// has room (a refused sendmsg of 253 fds costs as much as a sent one), and one with nothing
	// to read is not read.
	epoll_event ready[2 * kMaxPeers + 1];
	int n_ready = ::epoll_wait(epoll.get(), ready, static_cast<int>(std::size(ready)), 0);
	auto events_of = [&](const Peer &p) {
		std::uint32_t e = 0;
		for (int k = 0; k < n_ready; k++)
			if (ready[k].data.fd == p.fd.get())
				e |= ready[k].events;
		return e;
	};
	constexpr std::uint32_t kIn = EPOLLIN | EPOLLHUP | EPOLLERR, kOut = EPOLLOUT | EPOLLHUP | EPOLLERR;
	std::vector<proto::handoff::Item> back;
	for (std::size_t i = 0; i < peers.size(); i++) {
		Peer &p = *peers[i];
		if (p.ended && p.acks.empty())
			continue;
		std::uint32_t e = events_of(p);
		if (p.sending) {
			if (e & kIn)
				did = read_acks(p, back) || did;
			if (e & kOut)
				p.blocked = false;
			continue;
		}
		if (!(e & kIn)) {
			if (e & kOut)
				write_acks(p);
			continue;
		}
		// Each frame acknowledged as soon as its handler calls are made, so that its sender can
		// close its copies while the next frames are read. Once a handler threw, no more frames
		// are read: the rest wait for the next call, as messages do.
		Frame f;
		bool was_ended = p.ended;
		for (std::size_t n = 0; n < kFramesPerWakeup && !p.ended && !failure && read_frame(p, f); n++) {
			did = true;
			take_frame(p, f, failure);
			write_acks(p);
		}
		did = did || p.ended != was_ended;
		write_acks(p);
	}
	try {
		give_back(std::move(back));
	} catch (...) {
		keep();
	}
	try {
		if (path == Path::Direct)
			pump();
		else
			report_handed();
	} catch (...) {
		keep();
	}
	prune_peers();
	// Last: the done handler may destroy the Client.
	check_done(before);
	if (failure)
		std::rethrow_exception(failure);
	return did;
}

// What moved on each channel since the last report, to brokerd, for its counters. Lost with a
// lost link: the connections never depend on it.
void Client::Impl::report_handed()
{
	if (phase != Phase::Connected || !stream)
		return;
	bool any = false;
	for (auto &p : peers) {
		if (!p->sending || (!p->sent && !p->landed && !p->returned))
			continue;
		json params = {{"peer", p->instance},
		               {"sent", p->sent},
		               {"landed", p->landed},
		               {"returned", p->returned},
		               {"remaining", sender.queued()}};
		if (stream->enqueue(proto::varlink::make_call(kHanded, std::move(params), false, true)) < 0)
			break;
		p->sent = p->landed = p->returned = 0;
		any = true;
	}
	if (any)
		flush_or_defer();
}

// Ended channels with nothing left to settle close.
void Client::Impl::prune_peers()
{
	std::erase_if(peers, [&](const std::unique_ptr<Peer> &p) {
		if (!p->ended || !p->acks.empty() || p->unacked_count)
			return false;
		::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, p->fd.get(), nullptr);
		return true;
	});
}

// The Client goes while acknowledgements wait for room: its handler has their connections (the
// process may serve on), so they are written if the sender makes room within 50 ms; otherwise
// the sender takes those connections back as the channel closes.
void Client::Impl::flush_acks() noexcept
{
	std::uint64_t until = now_usec() + 50'000;
	for (auto &p : peers) {
		while (!p->acks.empty()) {
			int r = channel::send_frame(p->fd.get(), p->acks.front(), {});
			std::uint64_t now = now_usec();
			if (r == -EAGAIN && now < until) {
				pollfd out{p->fd.get(), POLLOUT, 0};
				::poll(&out, 1, static_cast<int>((until - now + 999) / 1000));
				continue;
			}
			if (r < 0)
				break;
			p->acks.pop_front();
		}
	}
}

void Client::Impl::unwatch_stream()
{
	if (epoll && watched_stream >= 0)
		::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, watched_stream, nullptr);
	watched_stream = -1;
	watched_stream_events = 0;
}

// The epoll set as the next wait needs it: the stream (in and, with output queued, out) and each
// channel (out while it waits for room).
void Client::Impl::watch() const
{
	if (!epoll)
		return;
	auto set = [&](int fd, std::uint32_t want, int op) {
		epoll_event e{};
		e.events = want;
		e.data.fd = fd;
		return ::epoll_ctl(epoll.get(), op, fd, &e) == 0;
	};
	int fd = stream ? stream->fd() : -1;
	std::uint32_t want = EPOLLIN | (stream && stream->want_write() && !retry_at ? std::uint32_t{EPOLLOUT} : 0u);
	if (fd != watched_stream) {
		// close_stream() took the old one out before closing it.
		if (fd >= 0 && set(fd, want, EPOLL_CTL_ADD)) {
			watched_stream = fd;
			watched_stream_events = want;
		}
	} else if (fd >= 0 && want != watched_stream_events && set(fd, want, EPOLL_CTL_MOD)) {
		watched_stream_events = want;
	}
	for (const auto &p : peers) {
		// An ended channel is read no more: only the acknowledgements it still owes are waited
		// for, or its end (a sender's channel that cannot be written to).
		std::uint32_t out = p->blocked || !p->acks.empty() ? std::uint32_t{EPOLLOUT} : 0u;
		std::uint32_t w = p->ended ? out : EPOLLIN | out;
		if (w != p->watched && set(p->fd.get(), w, EPOLL_CTL_MOD))
			p->watched = w;
	}
}

} // namespace broker
