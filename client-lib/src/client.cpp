// broker::Client: the worker's side of io.brokerd.Worker, with a plain systemd fallback.
#include "client_impl.hpp"

#include "proto/handoff_channel.hpp"
#include "proto/limits.hpp"
#include "proto/names.hpp"
#include "proto/status_text.hpp"
#include "proto/sync_client.hpp"
#include "proto/unique_fd.hpp"
#include "proto/varlink.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <time.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <span>

namespace broker {

using proto::varlink::json;

namespace {

// The methods a worker calls, as docs/io.brokerd.Worker.varlink declares them.
using namespace proto::names::worker;

static_assert(Client::kMaxHandoffState == proto::handoff::kMaxState);

// An unset and an empty variable mean the same: nothing configured.
const char *env(const char *name)
{
	const char *v = std::getenv(name);
	return v && *v ? v : nullptr;
}

// True when LISTEN_FDS is set and LISTEN_PID names this process, as sd_listen_fds() checks.
bool listen_fds_are_ours()
{
	const char *fds = env("LISTEN_FDS");
	const char *pid = env("LISTEN_PID");
	if (!fds || !pid)
		return false;
	long long value = 0;
	auto end = pid + std::strlen(pid);
	auto [p, ec] = std::from_chars(pid, end, value);
	return ec == std::errc() && p == end && value == static_cast<long long>(::getpid());
}

// The sockets at fd 3 and up. They belong to the process, so the Client neither duplicates
// nor closes them. sd_listen_fds() marks them CLOEXEC, so the worker's own children do not
// inherit them by accident.
std::vector<Listener> inherited_listeners()
{
	char **names = nullptr;
	int n = sd_listen_fds_with_names(0, &names);
	if (n < 0)
		throw Error(-n, std::string("invalid LISTEN_FDS/LISTEN_FDNAMES: ") + std::strerror(-n));
	std::vector<Listener> out;
	std::exception_ptr failure;
	try {
		out.reserve(static_cast<std::size_t>(n));
		for (int i = 0; i < n; i++)
			out.push_back(Listener{names && names[i] ? names[i] : "unknown", SD_LISTEN_FDS_START + i});
	} catch (...) {
		failure = std::current_exception();
	}
	if (names) {
		for (int i = 0; i < n; i++)
			std::free(names[i]);
		std::free(names);
	}
	if (failure)
		std::rethrow_exception(failure);
	return out;
}

Error bad_reply(const std::string &what)
{
	return Error(EBADMSG, "invalid Hello reply from brokerd: " + what);
}

// A set of fd numbers, a bit each.
class FdSet {
public:
	void add(int fd)
	{
		if (fd < 0)
			return;
		auto word = static_cast<std::size_t>(fd) / 64;
		if (word >= bits_.size())
			bits_.resize(word + 1);
		bits_[word] |= std::uint64_t{1} << (fd % 64);
	}
	bool has(int fd) const
	{
		auto word = static_cast<std::size_t>(fd) / 64;
		return fd >= 0 && word < bits_.size() && (bits_[word] >> (fd % 64) & 1);
	}

private:
	std::vector<std::uint64_t> bits_;
};

// An fd of a handoff() list that cannot go, and why: EBADF, not open; EINVAL, the kernel will not
// pass it to another process (an io_uring fd).
struct Unpassable {
	int fd;
	int code;
};

// The first of `fds` (none negative; `listed` holds them) that cannot be passed, or nullopt. The
// kernel checks them as it would pass them: one sendmsg() of up to 253 to a socket pair of our
// own, read back without room for them so that it drops the references and installs none. That
// costs half of an fcntl() per fd (a system call each), on the path of every handoff(), and sees
// what an fcntl() cannot (an io_uring fd). A refused chunk is looked at fd by fd to name the
// culprit; a refusal for another reason (ETOOMANYREFS, with fds of ours in flight) says nothing
// of these fds. Without a pair (at the fd limit, say), an fcntl() each.
std::optional<Unpassable> first_unpassable(std::span<const int> fds, const FdSet &listed)
{
	auto closed = [](std::span<const int> some) -> std::optional<Unpassable> {
		for (int fd : some)
			if (::fcntl(fd, F_GETFD) < 0)
				return Unpassable{fd, EBADF};
		return std::nullopt;
	};
	int pair[2];
	if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
		return closed(fds);
	proto::UniqueFd in(pair[0]), out(pair[1]);
	// The pair has the lowest free numbers: a listed fd among them was not open.
	for (int fd : pair)
		if (listed.has(fd))
			return Unpassable{fd, EBADF};
	auto pass = [&](std::span<const int> some) {
		char byte = 0;
		int r = proto::handoff::channel::send_frame(in.get(), std::string_view(&byte, 1), some);
		if (r == 0) // no control buffer: the kernel drops the references (MSG_CTRUNC)
			while (::recv(out.get(), &byte, 1, MSG_DONTWAIT) < 0 && errno == EINTR) {
			}
		return r;
	};
	for (std::size_t at = 0; at < fds.size(); at += proto::limits::kMaxFdsPerMessage) {
		auto chunk = fds.subspan(at, std::min(proto::limits::kMaxFdsPerMessage, fds.size() - at));
		int r = pass(chunk);
		if (r == 0)
			continue;
		if (auto bad = closed(chunk))
			return bad;
		if (r == -EINVAL)
			for (const int &fd : chunk)
				if (pass(std::span<const int>(&fd, 1)) == -EINVAL)
					return Unpassable{fd, EINVAL};
	}
	return std::nullopt;
}

} // namespace

namespace detail {

const json &member(const json &object, const char *key, json::value_t type)
{
	auto it = object.find(key);
	if (it == object.end())
		throw bad_reply(std::string("missing \"") + key + "\"");
	bool ok = type == json::value_t::number_unsigned ? it->is_number_unsigned() : it->type() == type;
	if (!ok)
		throw bad_reply(std::string("\"") + key + "\" has the wrong type");
	return *it;
}

void throw_closed()
{
	throw Error(ECONNRESET, "brokerd closed the connection");
}

bool is_disconnect(int r)
{
	return r == -EPIPE || r == -ECONNRESET;
}

std::uint64_t now_usec()
{
	timespec ts{};
	::clock_gettime(CLOCK_MONOTONIC, &ts);
	return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000 + static_cast<std::uint64_t>(ts.tv_nsec) / 1000;
}

} // namespace detail

using detail::is_disconnect;
using detail::member;
using detail::now_usec;
using detail::throw_closed;

namespace {

// What a moved-from Client reports, so that its const accessors stay well defined.
const std::string kEmpty;
const std::vector<Listener> kNoListeners;

std::chrono::steady_clock::time_point deadline_after(const json &timeout_ms)
{
	using namespace std::chrono;
	auto now = steady_clock::now();
	if (!timeout_ms.is_number_integer())
		return steady_clock::time_point::max(); // no timeout given: none known
	if (timeout_ms.is_number_unsigned() && timeout_ms.get<std::uint64_t>() > std::numeric_limits<long long>::max())
		return steady_clock::time_point::max();
	long long ms = timeout_ms.get<long long>();
	if (ms <= 0)
		return now;
	auto room = duration_cast<milliseconds>(steady_clock::time_point::max() - now).count();
	if (ms >= room)
		return steady_clock::time_point::max();
	return now + milliseconds(ms);
}

} // namespace

// Queues a oneway call and writes what the socket takes now; process() writes the rest.
void Client::Impl::send(std::string_view method, json parameters)
{
	if (!stream)
		throw_closed();
	int r = stream->enqueue(proto::varlink::make_call(method, std::move(parameters), false, true));
	if (r < 0)
		throw Error(-r, std::string("cannot queue ") + std::string(method) + ": " + std::strerror(-r));
	flush_now();
}

void Client::Impl::flush_now()
{
	if (!stream)
		throw_closed();
	int r = flush_or_defer();
	watch();
	if (is_disconnect(r)) {
		// Inside process(), what brokerd sent before it went is still to be read and handled;
		// with reconnect on, the next process() finds the loss (timeout() asks for it at once).
		if (in_process || options.reconnect)
			return;
		throw_closed();
	}
	if (r < 0 && r != -EAGAIN)
		throw Error(-r, std::string("send to brokerd: ") + std::strerror(-r));
}

// Writes what can be written. ETOOMANYREFS, the per-user limit on fds in flight that sibling
// workers share, is a wait, not an error: the next try comes from timeout(), not POLLOUT.
int Client::Impl::flush_or_defer()
{
	if (retry_at && now_usec() < retry_at)
		return -EAGAIN;
	retry_at = 0;
	int r = stream->flush();
	if (r == -ETOOMANYREFS) {
		retry_at = now_usec() + detail::kFdPressureRetry;
		return -EAGAIN;
	}
	if (is_disconnect(r))
		peer_gone = true;
	return r;
}

void Client::Impl::dispatch(proto::varlink::Message &m)
{
	auto err = m.body.find("error");
	if (err != m.body.end()) {
		std::string name = err->is_string() ? err->get<std::string>() : "invalid error reply";
		throw Error(proto::varlink::errno_for_error(name), "brokerd: " + name, name);
	}
	auto params = m.body.find("parameters");
	if (params == m.body.end() || !params->is_object())
		return;
	auto event = params->find("event");
	if (event == params->end() || !event->is_string())
		return;
	// Events this version does not know are skipped, so a newer broker can add them.
	namespace events = proto::names::worker::events_event;
	const std::string &name = event->get_ref<const std::string &>();
	if (name == events::kDrain) {
		DrainRequest req{deadline_after(params->value("timeout_ms", json()))};
		if (on_drain)
			on_drain(req);
	} else if (name == events::kConnections) {
		connections_event(*params, m.fds);
	} else if (name == events::kHandoff) {
		handoff_event(*params);
	} else if (name == events::kPeers) {
		peers_event(*params, m.fds);
	} else if (name == events::kPeer) {
		peer_event(*params, m.fds);
	}
}

// Sends what is queued: on the direct channels (channel.cpp), once brokerd has made them;
// otherwise as Handoff batches while the window has room, each oneway, its outcome coming as a
// "handoff" event.
void Client::Impl::pump()
{
	if (path == Path::Direct) {
		pump_direct();
		report_handed();
		if (path == Path::Direct)
			return;
	}
	if (path == Path::Unasked && peer_handoff && sender.queued() > 0) {
		if (phase != Phase::Connected) {
			// Every channel ended while brokerd was gone: nobody can take these now, as on its
			// own path when it goes.
			give_back(sender.take_unsent());
			return;
		}
		send(kPeers, json::object());
		path = Path::Asked;
		return;
	}
	if (path == Path::Asked)
		return;
	if (!stream)
		throw_closed();
	while (auto b = sender.next()) {
		int r = stream->enqueue_borrowed(proto::varlink::make_call(kHandoff, std::move(b->parameters), false, true),
		                                 std::move(b->fds));
		if (r < 0) {
			// Not sent: it waits in the queue for the next try, still ours.
			sender.requeue(b->id);
			if (r == -ENOBUFS)
				break;
			throw Error(-r, std::string("cannot queue Handoff: ") + std::strerror(-r));
		}
	}
	flush_now();
}

// Connections handed to this instance. Each is the handler's from the moment it is called; any
// the instance cannot take are closed and reported, and their sender still holds them.
void Client::Impl::connections_event(const json &params, std::vector<proto::UniqueFd> &fds)
{
	auto batch = params.find("batch");
	auto conns = params.find("connections");
	if (batch == params.end() || !batch->is_number_unsigned() || conns == params.end() || !conns->is_array())
		throw Error(EBADMSG, "invalid connections event from brokerd");
	if (!fds.empty() && fds[0])
		grow_fd_table(fds[0].get()); // for the batches after this one
	json refused = json::array();
	std::exception_ptr failure;
	for (std::size_t i = 0; i < conns->size(); i++) {
		const json &c = (*conns)[i];
		auto fd = c.is_object() ? c.find("fd") : c.end();
		if (!c.is_object() || fd == c.end() || !fd->is_number_unsigned() || fd->get<std::size_t>() >= fds.size()) {
			refused.push_back(i);
			continue;
		}
		proto::UniqueFd conn = std::move(fds[fd->get<std::size_t>()]);
		std::optional<std::string> state = std::string();
		if (auto st = c.find("state"); st != c.end() && st->is_string())
			state = proto::handoff::base64_decode(st->get<std::string>());
		if (!conn || !state || !on_connection || failure) {
			refused.push_back(i);
			continue;
		}
		try {
			on_connection(conn.release(), std::move(*state));
		} catch (...) {
			// The handler owns that one; the rest go back, and the error surfaces after the ack.
			failure = std::current_exception();
		}
	}
	// Remembered before the acknowledgement, which may never reach brokerd: a brokerd that
	// restarts learns from this what landed here (Resume).
	if (auto origin = params.find("origin"); origin != params.end())
		receipts.add(*origin, conns->size(), refused);
	json ack = {{"batch", *batch}};
	if (!refused.empty())
		ack["refused"] = std::move(refused);
	send(kReceived, std::move(ack));
	if (failure)
		std::rethrow_exception(failure);
}

void Client::Impl::handoff_event(const json &params)
{
	auto batch = params.find("batch");
	auto landed = params.find("landed");
	bool ok = batch != params.end() && batch->is_number_unsigned() && landed != params.end() &&
	          landed->is_number_unsigned();
	// The indices listed under key, if any.
	auto indices = [&](const char *key) {
		std::vector<std::uint64_t> out;
		auto list = params.find(key);
		if (!ok || list == params.end() || list->is_null())
			return out;
		ok = list->is_array();
		for (const json &i : ok ? *list : json::array()) {
			if (!i.is_number_unsigned()) {
				ok = false;
				break;
			}
			out.push_back(i.get<std::uint64_t>());
		}
		return out;
	};
	std::vector<std::uint64_t> back = indices("returned");
	std::vector<std::uint64_t> abandoned = indices("abandoned");
	proto::handoff::Sender::Completion done;
	std::size_t before = pending();
	if (!ok || !sender.complete(batch->get<std::uint64_t>(), landed->get<std::uint64_t>(), back, abandoned, done))
		throw Error(EBADMSG, "invalid handoff event from brokerd");
	summary.landed += done.landed;
	summary.abandoned += done.abandoned;
	// A handler that throws stops nothing here: the rest is given back, and the queue moves on,
	// as no other event would come to move it.
	std::exception_ptr failure;
	try {
		give_back(std::move(done.returned));
	} catch (...) {
		failure = std::current_exception();
	}
	try {
		pump();
	} catch (...) {
		if (!failure)
			failure = std::current_exception();
	}
	// Last: the done handler may destroy the Client.
	check_done(before);
	if (failure)
		std::rethrow_exception(failure);
}

// Every item reaches on_returned (or is closed without one), even when a call throws: the first
// exception is rethrown once all are given.
void Client::Impl::give_back(std::vector<proto::handoff::Item> items)
{
	summary.returned += items.size();
	std::exception_ptr failure;
	for (auto &item : items) {
		if (!on_returned)
			continue;
		try {
			on_returned(item.fd.release(), std::move(item.state));
		} catch (...) {
			if (!failure)
				failure = std::current_exception();
		}
	}
	if (failure)
		std::rethrow_exception(failure);
}

// Everything handed has landed or come back: the next handoff asks for channels again (to the
// receivers there are then), and ours to the receivers of this one close.
void Client::Impl::check_done(std::size_t pending_before)
{
	if (pending_before == 0 || pending() != 0)
		return;
	path = Path::Unasked;
	for (auto &p : peers)
		if (p->sending)
			p->ended = true;
	prune_peers();
	if (on_handoff_done)
		on_handoff_done(summary);
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::Client(Client &&) noexcept = default;
Client &Client::operator=(Client &&) noexcept = default;
Client::~Client() = default;

Client Client::from_env()
{
	return from_env(ClientOptions{});
}

namespace detail {

// ClientOptions as programs built before reconnect know it; they call the symbol below, which
// the abi_tag on today's ClientOptions keeps apart from the new one. They get the new default.
struct OptionsV0 {
	bool accept_handoff;
};

} // namespace detail

// Not declared in the header: only old binaries call it.
BROKER_EXPORT Client from_env_v0(const detail::OptionsV0 &old) __asm__("_ZN6broker6Client8from_envERKNS_13ClientOptionsE");
Client from_env_v0(const detail::OptionsV0 &old)
{
	ClientOptions options;
	options.accept_handoff = old.accept_handoff;
	return Client::from_env(options);
}

Client Client::from_env(const ClientOptions &options)
{
	auto impl = std::make_unique<Impl>();
	const char *socket = env("BROKER_SOCKET");
	bool inherited = listen_fds_are_ours();

	if (!socket) {
		if (!inherited)
			throw Error(ENXIO, "no BROKER_SOCKET or LISTEN_FDS in the environment");
		impl->listeners = inherited_listeners();
		return Client(std::move(impl));
	}

	json hello = json::object();
	if (const char *token = env("BROKER_TOKEN")) {
		hello["token"] = token;
	} else {
		// An externally started worker registers itself by service; the broker checks its
		// peer credentials against the service's register rule.
		const char *service = env("BROKER_SERVICE");
		if (!service)
			throw Error(EINVAL, "BROKER_SOCKET is set, but neither BROKER_TOKEN nor BROKER_SERVICE");
		hello["service"] = service;
		if (const char *version = env("BROKER_VERSION"))
			hello["version"] = version;
		// Only brokerd's own children got the service's sockets at fd 3 and up. A registered
		// worker's LISTEN_FDS, if any, are its own (a systemd unit's): it asks for the service's.
		inherited = false;
	}
	hello["want_fds"] = !inherited;
	if (options.accept_handoff)
		hello["accept_handoff"] = true;
	// A reconnect says the same, but holds its sockets already.
	impl->options = options;
	impl->socket_path = socket;
	impl->hello = hello;
	impl->hello["want_fds"] = false;
	impl->jitter.seed(static_cast<std::uint_fast32_t>(::getpid()) ^ static_cast<std::uint_fast32_t>(now_usec()));

	// The protocol core throws its own error type; the library's callers get broker::Error.
	std::optional<proto::varlink::SyncClient> sync;
	proto::varlink::Message reply;
	try {
		sync.emplace(socket);
		reply = sync->call(kHello, std::move(hello));
	} catch (const proto::varlink::Error &e) {
		throw Error(e.code(), e.what(), e.varlink_error());
	}

	const json &params = member(reply.body, "parameters", json::value_t::object);
	impl->brokered = true;
	impl->service = member(params, "service", json::value_t::string).get<std::string>();
	impl->instance = member(params, "instance", json::value_t::string).get<std::string>();
	impl->generation = member(params, "generation", json::value_t::number_unsigned).get<std::uint64_t>();
	impl->remember_token(params);
	const json &sockets = member(params, "sockets", json::value_t::array);
	if (sockets.size() > proto::limits::kMaxSocketsPerService)
		throw bad_reply("too many sockets");

	if (inherited) {
		// Spawned by brokerd: the sockets are already ours at fd 3 and up, in the service's
		// order; any fds the reply carried anyway are closed with it.
		impl->listeners = inherited_listeners();
	} else {
		// count_fd_refs() already checked that the indices are exactly 0..n-1 with n fds.
		impl->owned = std::move(reply.fds);
		impl->listeners.reserve(sockets.size());
		for (const json &s : sockets) {
			if (!s.is_object())
				throw bad_reply("a socket is not an object");
			std::string name = member(s, "name", json::value_t::string).get<std::string>();
			auto fd = s.find("fd");
			if (fd == s.end() || !fd->is_number_unsigned())
				throw bad_reply("socket \"" + name + "\" came without its fd");
			impl->listeners.push_back(Listener{std::move(name), impl->owned.at(fd->get<std::size_t>()).get()});
		}
	}

	impl->stream.emplace(std::move(sync->stream()));
	// Connections handed to this instance beyond its fd limit are refused, not the stream's end.
	impl->stream->allow_lost_fds();
	int r = impl->stream->enqueue(proto::varlink::make_call(kEvents, impl->events_parameters(params), true));
	if (r < 0)
		throw Error(-r, std::string("cannot queue Events: ") + std::strerror(-r));
	impl->flush_now();
	return Client(std::move(impl));
}

bool Client::brokered() const noexcept
{
	return impl_ && impl_->brokered;
}

const std::string &Client::service() const noexcept
{
	return impl_ ? impl_->service : kEmpty;
}

const std::string &Client::instance() const noexcept
{
	return impl_ ? impl_->instance : kEmpty;
}

std::uint64_t Client::generation() const noexcept
{
	return impl_ ? impl_->generation : 0;
}

int Client::listener(std::string_view name) const
{
	for (const Listener &l : listeners())
		if (l.name == name)
			return l.fd;
	throw Error(ENOENT, "no socket named '" + std::string(name) + "'");
}

const std::vector<Listener> &Client::listeners() const noexcept
{
	return impl_ ? impl_->listeners : kNoListeners;
}

void Client::ready()
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	if (impl_->brokered) {
		impl_->said_ready = true;
		impl_->tell(kReady, json::object());
		return;
	}
	int r = sd_notify(0, "READY=1");
	if (r < 0)
		throw Error(-r, std::string("sd_notify: ") + std::strerror(-r));
}

void Client::status(std::string_view text)
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	// One line: a newline would start another assignment in the notify protocol.
	if (text.find_first_of(std::string_view("\n\0", 2)) != std::string_view::npos)
		throw Error(EINVAL, "status text must be one line");
	if (text.size() > proto::limits::kMaxStatusText)
		throw Error(EMSGSIZE, "status text is longer than " + std::to_string(proto::limits::kMaxStatusText) + " bytes");
	// brokerd's rule (a oneway call would be refused unseen).
	std::string checked(text);
	if (auto why = proto::check_status_text(checked))
		throw Error(EINVAL, "status text: " + *why);
	if (impl_->brokered) {
		impl_->last_status = checked;
		impl_->tell(kStatus, json{{"text", text}});
		return;
	}
	std::string msg = "STATUS=" + std::string(text);
	int r = sd_notify(0, msg.c_str());
	if (r < 0)
		throw Error(-r, std::string("sd_notify: ") + std::strerror(-r));
}

int Client::fd() const noexcept
{
	if (impl_ && impl_->epoll)
		return impl_->epoll.get();
	return impl_ && impl_->stream ? impl_->stream->fd() : -1;
}

short Client::events() const noexcept
{
	if (impl_ && impl_->epoll) {
		impl_->watch();
		return POLLIN;
	}
	if (!impl_ || !impl_->stream)
		return 0;
	// Under the kernel's fds-in-flight limit the socket is writable, but writing fails: timeout()
	// says when to try again.
	bool write = impl_->stream->want_write() && !impl_->retry_at;
	return static_cast<short>(POLLIN | (write ? POLLOUT : 0));
}

std::uint64_t Client::timeout() const noexcept
{
	constexpr std::uint64_t none = std::numeric_limits<std::uint64_t>::max();
	if (!impl_)
		return none;
	// Frames that wait out the kernel's fds-in-flight limit go on whatever the link does.
	std::uint64_t direct = impl_->path == Impl::Path::Direct && impl_->retry_at ? impl_->retry_at : none;
	if (impl_->phase == Impl::Phase::Waiting)
		return std::min(impl_->attempt_at, direct);
	if (!impl_->stream)
		return direct;
	// A message already read (left when a handler threw) has no poll event to announce it, nor
	// has a loss seen while writing.
	if (impl_->stream->message_ready() || impl_->peer_gone)
		return 0;
	std::uint64_t t = impl_->retry_at ? impl_->retry_at : none;
	if (impl_->phase == Impl::Phase::Hello)
		t = std::min(t, impl_->hello_deadline);
	return t;
}

bool Client::process()
{
	if (!impl_)
		return false;
	// A handler may destroy the Client: from then on nothing of it may be touched. One that
	// throws on a channel does not keep brokerd's messages waiting: the first error comes out
	// once both had their turn.
	std::shared_ptr<bool> alive = impl_->alive;
	bool did = false;
	std::exception_ptr failure;
	if (!impl_->peers.empty()) {
		try {
			did = impl_->serve_peers();
		} catch (...) {
			failure = std::current_exception();
			did = true;
		}
		if (!*alive) {
			if (failure)
				std::rethrow_exception(failure);
			return true;
		}
	}
	try {
		did = impl_->process_stream() || did;
	} catch (...) {
		if (!failure)
			failure = std::current_exception();
	}
	if (*alive)
		impl_->watch();
	if (failure)
		std::rethrow_exception(failure);
	return did;
}

bool Client::Impl::process_stream()
{
	Impl &impl = *this;
	if (impl.phase == Impl::Phase::Waiting)
		return impl.attempt();
	if (!impl.stream)
		return false;
	if (impl.phase == Impl::Phase::Hello && now_usec() >= impl.hello_deadline) {
		impl.retry_later(); // a brokerd that accepts but never answers is as good as none
		return true;
	}
	// A handler may destroy the Client: from then on nothing of it may be touched.
	std::shared_ptr<bool> alive = impl.alive;
	proto::varlink::Stream &s = *impl.stream;
	bool did = false;
	bool eof = false;
	impl.in_process = true;

	std::size_t before = s.queued_bytes();
	int r = impl.flush_or_defer();
	if (r < 0 && r != -EAGAIN && !is_disconnect(r)) {
		impl.in_process = false;
		impl.disconnected(Error(-r, std::string("send to brokerd: ") + std::strerror(-r)));
		return true;
	}
	did = s.queued_bytes() != before;

	// Reads once; once brokerd is found gone, to the end: what it sent before it left (connections
	// handed to this instance among them) is still handled.
	std::exception_ptr failure;
	for (bool more = true; more;) {
		r = s.receive();
		if (r > 0)
			did = true;
		else if (r == 0 || is_disconnect(r))
			eof = true;
		else if (r != -EAGAIN) {
			impl.in_process = false;
			impl.disconnected(Error(-r, std::string("receive from brokerd: ") + std::strerror(-r)));
			return true;
		}
		for (;;) {
			proto::varlink::Message m;
			int n = s.next(m);
			if (n == 0)
				break;
			if (n < 0) {
				impl.in_process = false;
				impl.disconnected(Error(-n, std::string("protocol error from brokerd: ") + std::strerror(-n)));
				return true;
			}
			did = true;
			try {
				// The first message on a new connection answers its Hello; a refusal ends the
				// link (and the stream) and comes out as failure.
				if (impl.phase == Impl::Phase::Hello)
					impl.hello_reply(m);
				else
					impl.dispatch(m);
			} catch (...) {
				failure = std::current_exception();
			}
			if (!*alive) {
				if (failure)
					std::rethrow_exception(failure);
				return true;
			}
			// The messages after it wait for the next call (timeout() says so at once).
			if (failure)
				break;
		}
		more = !failure && !eof && impl.peer_gone && r > 0 && impl.stream;
	}
	impl.in_process = false;

	if (failure) {
		// Whatever waits to be sent goes on: no other event may come to move it.
		try {
			impl.pump();
		} catch (...) {
			// Reported by the next call; the handler's exception comes first.
		}
		std::rethrow_exception(failure);
	}
	if (eof || impl.peer_gone) {
		impl.disconnected(Error(ECONNRESET, "brokerd closed the connection"));
		return true;
	}
	return did;
}

Link Client::link() const noexcept
{
	return impl_ ? impl_->link() : Link::Lost;
}

void Client::on_link(std::function<void(Link, const Error *)> handler)
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	impl_->on_link = std::move(handler);
}

void Client::on_drain(std::function<void(const DrainRequest &)> handler)
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	impl_->on_drain = std::move(handler);
}

void Client::handoff(const Connection *list, std::size_t count)
{
	std::span<const Connection> connections(list, count);
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	if (!impl_->brokered)
		throw Error(ENOTCONN, "not connected to brokerd: there is no successor to hand connections to");
	if (impl_->phase != Impl::Phase::Connected)
		throw Error(ENOTCONN, "the connection to brokerd is lost: there is no successor to hand connections to");
	// The channels are asked for first: brokerd makes them while the fds are checked. Should a
	// check fail, they wait for the next handoff().
	if (!connections.empty() && impl_->peer_handoff && impl_->path == Impl::Path::Unasked) {
		impl_->send(kPeers, json::object());
		impl_->path = Impl::Path::Asked;
	}
	// Nothing is taken from a list with an fd that cannot go: one not open or that the kernel will
	// not pass would make a whole frame's sendmsg fail; one listed twice, the library's own, or
	// handed off before and not settled yet would be closed twice.
	std::vector<int> fds;
	fds.reserve(connections.size());
	int highest = -1;
	for (const Connection &c : connections) {
		if (c.fd < 0)
			throw Error(EBADF, "handoff: fd " + std::to_string(c.fd) + " is not open");
		if (c.state.size() > kMaxHandoffState)
			throw Error(EMSGSIZE, "handoff: state of " + std::to_string(c.state.size()) + " bytes, over " +
			                          std::to_string(kMaxHandoffState));
		fds.push_back(c.fd);
		highest = std::max(highest, c.fd);
	}
	// Open, the highest is within the fd table, which bounds the sets below (a bit per slot).
	if (highest >= 0 && ::fcntl(highest, F_GETFD) < 0)
		throw Error(EBADF, "handoff: fd " + std::to_string(highest) + " is not open");
	FdSet own, handed, listed;
	impl_->own_fds([&](int fd) { own.add(fd); });
	impl_->sender.for_each_fd([&](int fd) { handed.add(fd); });
	for (const auto &p : impl_->peers)
		for (const auto &[id, items] : p->unacked)
			for (const auto &item : items)
				handed.add(item.fd.get());
	for (int fd : fds) {
		if (listed.has(fd))
			throw Error(EINVAL, "handoff: fd " + std::to_string(fd) + " is in the list twice");
		if (own.has(fd))
			throw Error(EINVAL, "handoff: fd " + std::to_string(fd) + " is the library's own");
		if (handed.has(fd))
			throw Error(EINVAL, "handoff: fd " + std::to_string(fd) + " is handed off already");
		listed.add(fd);
	}
	if (auto bad = first_unpassable(fds, listed))
		throw Error(bad->code, "handoff: fd " + std::to_string(bad->fd) +
		                           (bad->code == EBADF ? " is not open" : " cannot be passed to another process"));
	// The kernel refuses to pass more fds at once than the sender's fd limit allows (unless it
	// runs as root: ETOOMANYREFS), and fds in flight count against it: keep the window within
	// half of it.
	rlimit nofile{};
	if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY)
	{
		impl_->sender.set_window(nofile.rlim_cur / 2 / proto::limits::kMaxFdsPerMessage);
		impl_->window_fds = std::max<std::size_t>(nofile.rlim_cur / 2, 1);
	}
	// Everything that allocates first, with no fd owned yet; then every fd at once.
	std::size_t queued = 0;
	try {
		for (const Connection &c : connections) {
			impl_->sender.add(proto::handoff::Item{proto::UniqueFd(), std::string(c.state)});
			queued++;
		}
	} catch (...) {
		impl_->sender.drop_back(queued);
		throw;
	}
	impl_->sender.own_back(fds.data(), fds.size());
	impl_->summary.handed += connections.size();
	// The fds are the library's now, whatever happens: a broker that has gone shows in the next
	// process(), which gives back what was never sent.
	try {
		impl_->pump();
	} catch (...) {
		// The next process() reports what is wrong; the fds stay the library's either way.
	}
	impl_->watch();
}

std::size_t Client::handoff_pending() const noexcept
{
	return impl_ ? impl_->pending() : 0;
}

const HandoffSummary &Client::handoff_summary() const noexcept
{
	static const HandoffSummary none;
	return impl_ ? impl_->summary : none;
}

void Client::on_connection(std::function<void(int fd, std::string state)> handler)
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	impl_->on_connection = std::move(handler);
}

void Client::on_returned(std::function<void(int fd, std::string state)> handler)
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	impl_->on_returned = std::move(handler);
}

void Client::on_handoff_done(std::function<void(const HandoffSummary &)> handler)
{
	if (!impl_)
		throw Error(EBADF, "moved-from Client");
	impl_->on_handoff_done = std::move(handler);
}

} // namespace broker
