// ControlServer::Connection: one client's transport: reading, framing, limits, timers, replies, closing.
#include "control/connection.hpp"

#include "control/encode.hpp"
#include "os/log.hpp"
#include "proto/errors.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

namespace {

constexpr int kMessagesPerWakeup = 64;

} // namespace

std::string errno_text(int e)
{
	return std::strerror(e);
}

std::vector<gid_t> peer_groups(int fd)
{
	std::vector<gid_t> groups(64);
	for (int attempt = 0; attempt < 2; attempt++) {
		socklen_t len = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
		if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &len) == 0) {
			groups.resize(len / sizeof(gid_t));
			return groups;
		}
		if (errno != ERANGE)
			break;
		groups.resize(len / sizeof(gid_t));
	}
	return {};
}

bool ControlServer::Connection::start()
{
	socklen_t len = sizeof(peer_);
	if (::getsockopt(stream_.fd(), SOL_SOCKET, SO_PEERCRED, &peer_, &len) < 0) {
		log::warning("control: SO_PEERCRED: " + errno_text(errno) + ", closing connection");
		return false;
	}
	std::vector<gid_t> groups = peer_groups(stream_.fd());
	groups.push_back(peer_.gid);
	tier_ = access::tier_of(server_.rules_, peer_.uid, groups, ::geteuid());

	sd_event_source *s = nullptr;
	if (sd_event_add_io(server_.event_, &s, stream_.fd(), EPOLLIN, io_handler, this) < 0)
		return false;
	io_.reset(s);
	// Until a worker says Hello, an unprivileged peer holds a slot on borrowed time; a reader
	// between calls too.
	if (tier_ < access::Tier::Reader)
		rearm_idle(proto::limits::kUnauthenticatedIdle);
	else if (tier_ == access::Tier::Reader)
		rearm_idle(proto::limits::kReaderIdle);
	apply_limits();
	return true;
}

void ControlServer::Connection::rearm_idle(std::chrono::microseconds after)
{
	usec_t when = now_usec(CLOCK_MONOTONIC) + usec(after);
	if (idle_) {
		sd_event_source_set_time(idle_.get(), when);
		sd_event_source_set_enabled(idle_.get(), SD_EVENT_ONESHOT);
		return;
	}
	sd_event_source *s = nullptr;
	if (sd_event_add_time(server_.event_, &s, CLOCK_MONOTONIC, when, 100000, idle_handler, this) >= 0)
		idle_.reset(s);
}

void ControlServer::Connection::refuse(const std::string &why)
{
	log::client(log::Level::Warning, "control: " + who() + ": " + why + ", refusing the connection");
	// Written once, without waiting: a client that called first reads it as its reply.
	if (stream_.enqueue(vl::make_error(proto::errors::kTooManyConnections, {{"message", why}})) == 0)
		(void)stream_.flush();
}

// What a peer may send and be sent, by what it is.
void ControlServer::Connection::apply_limits()
{
	// Large messages are for operators, and for a worker's Handoff batches on its Events
	// connection; everyone else is read no further ahead than a small one.
	stream_.set_max_input(max_input());
	// An event stream cannot wait for its reader: a Watch that falls this far behind is closed.
	// (A worker's Events carry handoff batches, which the HandoffRouter already holds back.)
	stream_.set_max_write_queue(watching_ ? proto::limits::kMaxWatchQueue : proto::limits::kMaxWriteQueue);
}

// Just opened an Events stream: this is its instance's connection, and no other one is.
void ControlServer::Connection::claim_instance()
{
	Instance *inst = dead_ || token_.empty() ? nullptr : server_.supervisor_.find_by_sink(this);
	if (!inst)
		return;
	for (auto &c : server_.connections_)
		if (c.get() != this && c->instance_conn_ && c->token_ == token_) {
			c->instance_conn_ = false;
			c->apply_limits();
		}
	instance_conn_ = true;
	spawned_instance_ = !inst->registered();
}

std::string ControlServer::Connection::who() const
{
	return "pid " + std::to_string(peer_.pid) + " uid " + std::to_string(peer_.uid);
}

void ControlServer::Connection::close(const std::string &why)
{
	if (dead_)
		return;
	if (!why.empty())
		log::client(log::Level::Info, "control: " + who() + ": " + why + ", closing connection");
	dead_ = true;
	// The peer sees the end now, though the socket itself may close later, off the loop.
	::shutdown(stream_.fd(), SHUT_RDWR);
	io_.reset();
	idle_.reset();
	resume_.reset();
	if (!token_.empty())
		server_.supervisor_.connection_closed(token_);
	if (reexec_pending_) {
		reexec_pending_ = false;
		server_.hooks_.drop_reexec();
	}
	server_.supervisor_.detach_events(this);
	server_.supervisor_.detach_observer(this);
	server_.schedule_sweep();
}

int ControlServer::Connection::idle_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("idle_handler", [&]() -> int {
		auto *c = static_cast<Connection *>(userdata);
		if (c->tier_ >= access::Tier::Reader && !c->watching_ && c->token_.empty())
			c->close("no call for " + std::to_string(proto::limits::kReaderIdle.count()) + "s");
		else if (c->tier_ < access::Tier::Reader && c->token_.empty())
			c->close("no Hello within " + std::to_string(proto::limits::kUnauthenticatedIdle.count()) + "s");
		return 0;
	});
}

int ControlServer::Connection::io_handler(sd_event_source *, int, std::uint32_t revents, void *userdata)
{
	return guarded("io_handler", [&]() -> int {
		static_cast<Connection *>(userdata)->on_io(revents);
		return 0;
	});
}

void ControlServer::Connection::on_io(std::uint32_t revents)
{
	if ((revents & EPOLLOUT) && !peer_gone_) {
		int r = stream_.flush();
		if (r == -EPIPE || r == -ECONNRESET)
			peer_gone_ = true; // what it sent before it went is still read below
		else if (r < 0 && r != -EAGAIN)
			return close("");
	}
	// Nothing more is read while whole calls wait in the buffer, nor while its replies wait to
	// be read: a client pipelining thousands of calls is slowed to the pace of its replies,
	// never cut off for buffering too much, and holds little of brokerd's memory. (A hang-up
	// is read at once.)
	bool backlog = (stream_.message_ready() || output_backlog()) && !(revents & (EPOLLHUP | EPOLLERR));
	if ((revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) && backlog) {
		dispatch();
	} else if (!(revents & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
		// Its replies drained: the calls that waited for that go on.
		if (stream_.message_ready())
			dispatch();
	} else {
		int r = stream_.receive();
		if (r == 0)
			return close("");
		if (r < 0 && r != -EAGAIN) {
			if (r == -ECONNRESET)
				return close("");
			return close("receive: " + errno_text(-r));
		}
		dispatch();
	}
	if (!dead_)
		update_events();
}

// The instance's process has exited, so what waits in the socket is all it will ever say: read to
// its end before the exit is handled (a direct channel's last counts, an acknowledgement). Bounded
// by what the socket holds; whole calls left waiting behind a busy one stay for the loop.
void ControlServer::Connection::read_rest()
{
	for (int i = 0; i < kMessagesPerWakeup && !dead_; i++) {
		int r = stream_.receive();
		if (r < 0 && r != -EAGAIN)
			break; // the loop sees the end, or the error, as before
		dispatch();
		if (r <= 0 || waiting_)
			break;
	}
	if (!dead_)
		update_events();
}

void ControlServer::Connection::dispatch()
{
	// Calls are answered in order: while one waits for the supervisor, the rest stay queued.
	for (int i = 0; i < kMessagesPerWakeup && !dead_ && !waiting_ && !output_backlog(); i++) {
		vl::Message m;
		int r = stream_.next(m);
		if (r == 0)
			return;
		if (r < 0)
			return close(r == -EMSGSIZE ? "protocol error: a message over " + std::to_string(max_input()) + " bytes"
			                            : "protocol error: " + errno_text(-r));
		handle(m);
		if (!dead_ && tier_ == access::Tier::Reader && token_.empty())
			rearm_idle(proto::limits::kReaderIdle);
		apply_limits();
	}
	// More may be buffered, with no new EPOLLIN to announce them: come back next turn (or once
	// its replies drained, see on_io).
	if (!dead_ && !waiting_ && !output_backlog() && stream_.partial_input())
		schedule_resume();
}

void ControlServer::Connection::done_waiting()
{
	waiting_ = false;
	schedule_resume();
}

void ControlServer::Connection::schedule_resume()
{
	if (dead_ || resume_)
		return;
	// Resume queued calls from the event loop, not from inside the supervisor's callback.
	sd_event_source *s = nullptr;
	auto cb = [](sd_event_source *, void *userdata) -> int {
		auto *c = static_cast<Connection *>(userdata);
		c->resume_.reset();
		c->dispatch();
		if (!c->dead_)
			c->update_events();
		return 0;
	};
	if (sd_event_add_defer(server_.event_, &s, cb, this) >= 0) {
		sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
		resume_.reset(s);
	}
}

void ControlServer::Connection::progress(const Event &event)
{
	if (more_)
		reply({{"progress", encode::progress(event)}}, true);
	update_events();
}

void ControlServer::Connection::finished(const Event *last)
{
	if (last)
		reply({{"progress", encode::progress(*last)}});
	else if (!finished_reply_.is_null())
		reply(std::exchange(finished_reply_, nullptr));
	else
		reply(json::object());
	update_events();
	done_waiting();
}

void ControlServer::Connection::failed(const Refusal &why)
{
	finished_reply_ = nullptr;
	refused(why);
	update_events();
	done_waiting();
}

void ControlServer::Connection::refused(const Refusal &why)
{
	auto [name, parameters] = encode::refusal(why);
	error(name, std::move(parameters));
}

void ControlServer::Connection::watch_event(const Event &event)
{
	if (!watching_ || dead_)
		return;
	// brokerd's own events (no service) go to every stream, narrowed or not.
	if (!watch_service_.empty() && !event.service.empty() && event.service != watch_service_)
		return;
	reply(encode::watch_event(event), true);
	if (!dead_)
		update_events();
}

void ControlServer::Connection::update_events()
{
	bool out = stream_.want_write() && !peer_gone_;
	// Whole calls still buffered are taken first (see on_io), and the replies not yet read
	// drain first: the next read waits for them.
	bool in = !stream_.message_ready() && !output_backlog();
	if (io_)
		sd_event_source_set_io_events(io_.get(), (in ? static_cast<std::uint32_t>(EPOLLIN) : 0u) |
		                                             (out ? static_cast<std::uint32_t>(EPOLLOUT) : 0u));
}

void ControlServer::Connection::reply(json parameters, bool continues)
{
	if (oneway_ || dead_ || peer_gone_)
		return;
	sent(stream_.enqueue(vl::make_reply(std::move(parameters), continues)), "send");
}

void ControlServer::Connection::error(std::string_view name, json parameters)
{
	if (oneway_ || dead_ || peer_gone_)
		return;
	sent(stream_.enqueue(vl::make_error(name, std::move(parameters))), "send");
}

bool ControlServer::Connection::send_event(const json &parameters, std::vector<proto::UniqueFd> fds)
{
	if (dead_ || peer_gone_)
		return false;
	return sent(stream_.enqueue_reply(parameters, true, std::move(fds)), "cannot send event");
}

bool ControlServer::Connection::send_drain(usec_t timeout)
{
	return send_event(encode::drain(msec(timeout)));
}

bool ControlServer::Connection::send_connections(std::uint64_t batch, std::vector<HandoffItem> items,
                                                 const HandoffOrigin &origin)
{
	std::vector<proto::UniqueFd> fds;
	json event = encode::connections(batch, std::move(items), fds, origin);
	return send_event(event, std::move(fds));
}

bool ControlServer::Connection::send_handoff_result(const HandoffResult &result)
{
	return send_event(encode::handoff_result(result));
}

bool ControlServer::Connection::send_peers(std::vector<HandoffPeer> ends)
{
	std::vector<proto::UniqueFd> fds;
	json event = encode::peers(std::move(ends), fds);
	return send_event(event, std::move(fds));
}

bool ControlServer::Connection::send_peer(HandoffPeer end)
{
	std::vector<proto::UniqueFd> fds;
	json event = encode::peer(std::move(end), fds);
	return send_event(event, std::move(fds));
}

// After enqueueing: writes what the socket takes. A peer that has gone may still have sent
// something first (a worker acknowledging connections just before it died): the connection
// stays until its input is read to the end, and closes then.
bool ControlServer::Connection::sent(int r, const char *what)
{
	if (r == 0)
		r = stream_.flush();
	if (r == -EPIPE || r == -ECONNRESET) {
		peer_gone_ = true;
		update_events();
		return false;
	}
	if (r < 0 && r != -EAGAIN) {
		close(r == -ENOBUFS ? std::string(watching_ ? "too slow reading Watch events" : "too slow reading replies")
		                    : std::string(what) + ": " + errno_text(-r));
		return false;
	}
	update_events();
	return true;
}

} // namespace brokerd
