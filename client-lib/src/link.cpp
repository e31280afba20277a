// broker::Client's link to brokerd: losing it, finding a brokerd again without ever blocking
// the caller's loop, and telling the new one what the old one knew.
#include "client_impl.hpp"

#include "proto/limits.hpp"
#include "proto/names.hpp"
#include "proto/sync_client.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>

namespace broker {

using detail::member;
using detail::now_usec;
using proto::varlink::json;
using namespace proto::names::worker;

Link Client::Impl::link() const noexcept
{
	switch (phase) {
	case Phase::Connected:
		return Link::Connected;
	case Phase::Rejected:
		return Link::Rejected;
	default:
		return Link::Lost;
	}
}

// Ready and Status: their callers remember them for a reconnect; they go out now only while
// brokerd knows this instance.
void Client::Impl::tell(std::string_view method, json parameters)
{
	switch (phase) {
	case Phase::Closed:
		detail::throw_closed();
	case Phase::Rejected:
		throw Error(ENOTCONN, "brokerd refused this instance: there is nobody to tell");
	case Phase::Waiting:
	case Phase::Hello:
		return;
	case Phase::Connected:
		break;
	}
	send(method, std::move(parameters));
}

// The connection to brokerd is unusable: what was never sent is ours again. What was in flight
// may be served already by a receiver: with reconnect it is in doubt, held until the brokerd we
// find again says where it went (Resume); without, it closes, so that nothing is served twice.
// Then the link is Lost: with reconnect, the first attempt is scheduled; without, the error goes
// to the caller, as it always did.
void Client::Impl::disconnected(const Error &error)
{
	if (phase == Phase::Hello) {
		retry_later(); // nothing was handed on this connection: it just failed to come up
		return;
	}
	std::shared_ptr<bool> still = alive;
	std::size_t before = pending();
	sender.requeue_newest(stream->unsent_borrowed());
	// The direct channels go on without brokerd; a Peers question dies with it.
	bool direct = path == Path::Direct;
	if (path == Path::Asked)
		path = Path::Unasked;
	// Nothing queued may go out after this: its borrowed fds are about to be closed or given
	// back, and their numbers reused.
	close_stream();
	peer_gone = false;
	retry_at = 0;
	bool again = options.reconnect;
	if (!again)
		summary.abandoned += sender.drop_in_flight();
	phase = again ? Phase::Waiting : Phase::Closed;
	failures = 0;
	attempt_at = now_usec() + backoff(0);
	Error copy = error; // the caller's may live in what on_handoff_done destroys
	std::exception_ptr failure;
	try {
		if (!direct)
			give_back(sender.take_unsent());
	} catch (...) {
		failure = std::current_exception(); // the handler's own error comes first; fd() says the rest
	}
	check_done(before);
	if (*still && on_link) {
		try {
			on_link(Link::Lost, &copy);
		} catch (...) {
			if (!failure)
				failure = std::current_exception();
		}
	}
	if (failure)
		std::rethrow_exception(failure);
	if (!again)
		throw copy;
}

// The wait before attempt n: min·2^n capped at max, then a random time between half and all
// of it.
std::uint64_t Client::Impl::backoff(unsigned n)
{
	using std::chrono::microseconds;
	auto lo = static_cast<std::uint64_t>(
	        std::max<std::int64_t>(1000, std::chrono::duration_cast<microseconds>(options.reconnect_min).count()));
	auto hi = std::max(lo, static_cast<std::uint64_t>(std::max<std::int64_t>(
	                               0, std::chrono::duration_cast<microseconds>(options.reconnect_max).count())));
	std::uint64_t d = lo;
	for (unsigned i = 0; i < n && d < hi; i++)
		d *= 2;
	d = std::min(d, hi);
	return d - d / 2 + std::uniform_int_distribution<std::uint64_t>(0, d / 2)(jitter);
}

void Client::Impl::close_stream()
{
	unwatch_stream();
	if (stream)
		last_fd = stream->fd();
	stream.reset();
}

void Client::Impl::retry_later()
{
	close_stream();
	peer_gone = false;
	retry_at = 0;
	phase = Phase::Waiting;
	attempt_at = now_usec() + backoff(++failures);
}

// One connect(), non-blocking: an AF_UNIX connect either completes at once or fails at once
// (EAGAIN when the listener's backlog is full, ECONNREFUSED or ENOENT while no brokerd listens),
// and any failure is a wait. On success the Hello goes out; process() reads its reply.
bool Client::Impl::attempt()
{
	if (now_usec() < attempt_at)
		return false;
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	if (socket_path.empty() || socket_path.size() >= sizeof(sa.sun_path)) {
		retry_later(); // from_env() connected to it, so it cannot be
		return true;
	}
	std::memcpy(sa.sun_path, socket_path.data(), socket_path.size());
	auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + socket_path.size());
	if (socket_path[0] == '@')
		sa.sun_path[0] = '\0';
	else
		len += 1;
	proto::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	// A caller that polls fd() re-registers when the number changes: never give it the number
	// of the connection before, which it may still take for the one it registered.
	if (fd && fd.get() == last_fd)
		fd = proto::UniqueFd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, last_fd + 1));
	if (!fd || (::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), len) < 0 && errno != EINPROGRESS)) {
		retry_later();
		return true;
	}
	stream.emplace(std::move(fd));
	stream->allow_lost_fds();
	phase = Phase::Hello;
	hello_deadline = now_usec() + std::chrono::duration_cast<std::chrono::microseconds>(
	                                      proto::limits::kDefaultCallTimeout).count();
	if (stream->enqueue(proto::varlink::make_call(kHello, hello)) < 0) {
		retry_later();
		return true;
	}
	int r = flush_or_defer(); // what is left goes from the next process(), on POLLOUT
	if (r < 0 && r != -EAGAIN && !detail::is_disconnect(r))
		retry_later();
	return true;
}

// The new brokerd's answer to Hello. Accepted as the same instance: subscribe, say again what the
// old brokerd had been told, and report Connected. Anything else ends the link.
void Client::Impl::hello_reply(const proto::varlink::Message &m)
{
	auto err = m.body.find("error");
	if (err != m.body.end()) {
		std::string name = err->is_string() ? err->get<std::string>() : "invalid error reply";
		reject(Error(proto::varlink::errno_for_error(name), "brokerd refused the new Hello: " + name, name));
	}
	std::string who;
	json events;
	try {
		const json &params = member(m.body, "parameters", json::value_t::object);
		events = events_parameters(params);
		who = member(params, "service", json::value_t::string).get<std::string>() + " instance " +
		      member(params, "instance", json::value_t::string).get<std::string>() + " generation " +
		      std::to_string(member(params, "generation", json::value_t::number_unsigned).get<std::uint64_t>());
		remember_token(params);
	} catch (const Error &e) {
		reject(e);
	}
	std::string was = service + " instance " + instance + " generation " + std::to_string(generation);
	if (who != was)
		reject(Error(ESTALE, "brokerd knows this worker as " + who + ", not " + was));

	phase = Phase::Connected;
	failures = 0;
	// After Events, on the same connection: the handoffs in doubt and what came here, so that the
	// new brokerd can settle what the old one had in flight. Said even when empty: brokerd waits
	// for every instance that spoke to its predecessor.
	json in_doubt = json::array();
	for (const auto &b : sender.in_flight())
		in_doubt.push_back({{"batch", b.batch}, {"count", b.count}});
	json resume = {{"in_doubt", std::move(in_doubt)}, {"received", receipts.list(proto::handoff::kBatchBytes / 2)}};
	json calls[] = {proto::varlink::make_call(kEvents, std::move(events), true),
	                proto::varlink::make_call(kResume, std::move(resume), false, true),
	                said_ready ? proto::varlink::make_call(kReady, json::object(), false, true) : json(),
	                last_status ? proto::varlink::make_call(kStatus, {{"text", *last_status}}, false, true) : json()};
	for (const json &call : calls) {
		if (call.is_null())
			continue;
		int r = stream->enqueue(call);
		if (r < 0)
			throw Error(-r, std::string("cannot queue a call after reconnecting: ") + std::strerror(-r));
	}
	// Connections queued while it was gone (a direct channel's receiver lost with it) go on.
	pump();
	if (on_link)
		on_link(Link::Connected, nullptr);
}

// A broker that names this instance's token (a registered worker has none of its own) is told
// it on reconnect.
void Client::Impl::remember_token(const json &params)
{
	auto token = params.find("token");
	if (token == params.end() || !token->is_string())
		return;
	hello = {{"token", *token}, {"want_fds", false}};
	if (options.accept_handoff)
		hello["accept_handoff"] = true;
}

void Client::Impl::reject(const Error &error)
{
	close_stream();
	peer_gone = false;
	retry_at = 0;
	phase = Phase::Rejected;
	// No brokerd will say where the handoffs in doubt went: closed, as without reconnect.
	std::size_t before = pending();
	summary.abandoned += sender.drop_in_flight();
	Error copy = error;
	std::shared_ptr<bool> still = alive;
	if (on_link)
		on_link(Link::Rejected, &copy);
	// Last: the done handler may destroy the Client.
	if (*still)
		check_done(before);
	throw copy;
}

} // namespace broker
