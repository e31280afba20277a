// ControlServer: accepts Varlink connections, authorizes each call, and dispatches it.
#include "control/server.hpp"

#include "control/access.hpp"
#include "proto/handoff.hpp"
#include "proto/limits.hpp"
#include "proto/varlink.hpp"
#include "broker_config.h"
#include "os/closer.hpp"
#include "control/interfaces.hpp"
#include "os/listener.hpp"
#include "proto/errors.hpp"
#include "os/log.hpp"
#include "os/peer.hpp"
#include "daemon/state.hpp"
#include "supervisor/supervisor.hpp"

#include <fcntl.h>
#include <grp.h>
#include <malloc.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

namespace {

constexpr int kAcceptPerWakeup = 64;
constexpr int kMessagesPerWakeup = 64;

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

void make_parent_directory(const std::string &path)
{
	std::size_t slash = path.rfind('/');
	if (slash == std::string::npos || slash == 0)
		return;
	std::string dir = path.substr(0, slash);
	if (::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST)
		return;
	if (errno == ENOENT) {
		make_parent_directory(dir);
		if (::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST)
			return;
	}
	throw std::runtime_error("control socket: mkdir " + dir + ": " + errno_text(errno));
}

} // namespace

AccessRules AccessRules::resolve(const config::ControlConfig &cfg)
{
	AccessRules r;
	auto users = [](const std::vector<std::string> &names, std::vector<uid_t> &out, const char *key) {
		for (const auto &n : names) {
			passwd *pw = ::getpwnam(n.c_str());
			if (!pw)
				throw std::runtime_error(std::string("control.") + key + ": no such user \"" + n + "\"");
			out.push_back(pw->pw_uid);
		}
	};
	auto groups = [](const std::vector<std::string> &names, std::vector<gid_t> &out, const char *key) {
		for (const auto &n : names) {
			group *gr = ::getgrnam(n.c_str());
			if (!gr)
				throw std::runtime_error(std::string("control.") + key + ": no such group \"" + n + "\"");
			out.push_back(gr->gr_gid);
		}
	};
	users(cfg.admin_users, r.admin_uids, "admin_users");
	groups(cfg.admin_groups, r.admin_gids, "admin_groups");
	users(cfg.read_users, r.read_uids, "read_users");
	groups(cfg.read_groups, r.read_gids, "read_groups");
	return r;
}

// One client: its stream, its credentials, and whether it is an operator, a reader or a worker.
class ControlServer::Connection final : public EventSink, public Observer {
public:
	// Only an authenticated worker may send fds (Handoff): anyone else sending any is cut off
	// at once.
	Connection(ControlServer &server, proto::UniqueFd fd)
		: server_(server), stream_(std::move(fd), proto::limits::kMaxMessageSize, 0)
	{
	}
	~Connection()
	{
		server_.supervisor_.detach_events(this);
		server_.supervisor_.detach_observer(this);
	}

	bool start();
	// Tells a peer past a connection limit why it is closed (and the log, rate-limited).
	void refuse(const std::string &why);
	bool dead() const { return dead_; }
	uid_t uid() const { return peer_.uid; }
	std::size_t buffer_bytes() const { return stream_.buffer_bytes(); }
	bool is_operator() const { return operator_; }
	// The connection the Events stream of an instance brokerd spawned runs on: the config
	// bounds those, so they are not counted against their user's connections. (Registered
	// instances are, as every Hello of an allowed user makes one.)
	bool uncounted() const { return instance_conn_ && spawned_instance_; }
	// The largest message it may send.
	std::size_t max_input() const
	{
		return operator_ || instance_conn_ ? proto::limits::kMaxMessageSize : proto::limits::kMaxSmallMessage;
	}
	using EventSink::send_event;
	bool send_event(const json &parameters, std::vector<proto::UniqueFd> fds) override;
	void watch_event(const json &event);

	// Observer: the upgrade, start or stop this connection waits for.
	void progress(const json &parameters) override;
	void finished(const json &parameters) override;
	void failed(std::string_view error, const json &parameters) override;

private:
	static int io_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int idle_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	void on_io(std::uint32_t revents);
	void dispatch();
	void handle(vl::Message &m);
	void done_waiting();
	void schedule_resume();
	void update_events();
	void apply_limits();
	void claim_instance();
	void rearm_idle(std::chrono::microseconds after);
	// Its replies wait to be read: it sends no more calls until they drain. Not an instance's
	// Events connection: its output is events, which the HandoffRouter holds back by itself, and
	// what it sends (Received, Handoff) is what lets them drain; held back, a receiver's
	// acknowledgements were read only once it had read nearly every event.
	bool output_backlog() const
	{
		return !peer_gone_ && !instance_conn_ && stream_.queued_bytes() > proto::limits::kMaxUnreadOutput;
	}
	void close(const std::string &why);
	std::string who() const;
	access::Tier tier() const;

	// Method implementations; each replies or errors exactly once (unless oneway).
	void get_info();
	void get_interface_description(const json &params);
	void control_status(const json &params, bool only_sockets);
	void worker_hello(const json &params);
	std::optional<std::string> foreign_to(const Instance &inst);
	void worker_ready();
	void worker_status(const json &params);
	void worker_events();
	void worker_handoff(const json &params, std::vector<proto::UniqueFd> fds);
	void worker_received(const json &params);
	void control_upgrade(const json &params, const std::string &kind);
	void control_abort(const json &params);
	void control_start_stop(const json &params, bool start);
	void control_reload(const json &params);
	void control_watch(const json &params);
	void control_reexec(const json &params);

public:
	// Re-exec: what the next brokerd needs to carry this connection on (null: it is closing).
	// Throws std::runtime_error when it cannot be carried (fds in flight).
	json save(int caller, std::vector<int> &keep_fds) const;
	void restore(const json &j);

private:
	Service *service_param(const json &params, const std::vector<std::string> &allowed);

	Instance *worker();
	void reply(json parameters, bool continues = false);
	void error(std::string_view name, json parameters = json::object());
	bool sent(int r, const char *what);

	ControlServer &server_;
	vl::Stream stream_;
	EventSource io_;
	EventSource idle_;
	ucred peer_{};
	// CLOCK_BOOTTIME when accepted: a process that started later did not connect (see peer::process).
	std::uint64_t connected_ = now_usec(CLOCK_BOOTTIME);
	bool operator_ = false;
	bool reader_ = false;
	std::string token_;     // set by a successful Hello
	bool oneway_ = false;   // the call being handled wants no reply
	bool more_ = false;
	bool dead_ = false;
	bool peer_gone_ = false; // writing failed: reading on until the end of its input
	bool waiting_ = false;  // an upgrade, start or stop will reply; later calls wait their turn
	bool watching_ = false;
	bool instance_conn_ = false;   // it carries its instance's Events stream
	bool spawned_instance_ = false; // and that instance is one brokerd spawned
	std::string watch_service_;
	EventSource resume_;
};

bool ControlServer::Connection::start()
{
	socklen_t len = sizeof(peer_);
	if (::getsockopt(stream_.fd(), SOL_SOCKET, SO_PEERCRED, &peer_, &len) < 0) {
		log::warning("control: SO_PEERCRED: " + errno_text(errno) + ", closing connection");
		return false;
	}
	const AccessRules &r = server_.rules_;
	auto has = [](const auto &v, auto x) { return std::find(v.begin(), v.end(), x) != v.end(); };
	std::vector<gid_t> groups = peer_groups(stream_.fd());
	groups.push_back(peer_.gid);
	auto in_groups = [&](const std::vector<gid_t> &allowed) {
		return std::any_of(groups.begin(), groups.end(), [&](gid_t g) { return has(allowed, g); });
	};
	operator_ = peer_.uid == 0 || peer_.uid == ::geteuid() || has(r.admin_uids, peer_.uid) || in_groups(r.admin_gids);
	reader_ = operator_ || has(r.read_uids, peer_.uid) || in_groups(r.read_gids);

	sd_event_source *s = nullptr;
	if (sd_event_add_io(server_.event_, &s, stream_.fd(), EPOLLIN, io_handler, this) < 0)
		return false;
	io_.reset(s);
	// Until a worker says Hello, an unprivileged peer holds a slot on borrowed time; a reader
	// between calls too.
	if (!reader_)
		rearm_idle(proto::limits::kUnauthenticatedIdle);
	else if (!operator_)
		rearm_idle(proto::limits::kReaderIdle);
	apply_limits();
	return true;
}

void ControlServer::Connection::rearm_idle(std::chrono::microseconds after)
{
	std::uint64_t when = now_usec(CLOCK_MONOTONIC) + after.count();
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
	spawned_instance_ = !inst->external;
}

std::string ControlServer::Connection::who() const
{
	return "pid " + std::to_string(peer_.pid) + " uid " + std::to_string(peer_.uid);
}

access::Tier ControlServer::Connection::tier() const
{
	if (peer_.uid == 0 || peer_.uid == ::geteuid())
		return access::Tier::Root;
	return operator_ ? access::Tier::Admin : reader_ ? access::Tier::Reader : access::Tier::Worker;
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
	server_.supervisor_.detach_events(this);
	server_.supervisor_.detach_observer(this);
	server_.schedule_sweep();
}

int ControlServer::Connection::idle_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("idle_handler", [&]() -> int {
		auto *c = static_cast<Connection *>(userdata);
		if (c->reader_ && !c->watching_ && c->token_.empty())
			c->close("no call for " + std::to_string(proto::limits::kReaderIdle.count()) + "s");
		else if (!c->reader_ && c->token_.empty())
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
		auto method = m.body.find("method");
		bool events = method != m.body.end() && *method == "io.brokerd.Worker.Events";
		handle(m);
		if (events)
			claim_instance();
		if (!dead_ && reader_ && !operator_ && token_.empty())
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

void ControlServer::Connection::progress(const json &parameters)
{
	if (more_)
		reply({{"progress", parameters}}, true);
	update_events();
}

void ControlServer::Connection::finished(const json &parameters)
{
	if (parameters.empty())
		reply(json::object());
	else
		reply({{"progress", parameters}});
	update_events();
	done_waiting();
}

void ControlServer::Connection::failed(std::string_view name, const json &parameters)
{
	error(name, parameters);
	update_events();
	done_waiting();
}

void ControlServer::Connection::watch_event(const json &event)
{
	if (!watching_ || dead_)
		return;
	if (!watch_service_.empty() && event.value("service", "") != watch_service_)
		return;
	reply(event, true);
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

void ControlServer::Connection::handle(vl::Message &m)
{
	json &body = m.body;
	auto method_it = body.find("method");
	if (method_it == body.end() || !method_it->is_string())
		return close("message without a method");
	std::string method = method_it->get<std::string>();
	auto flag = [&](const char *key) {
		auto it = body.find(key);
		return it != body.end() && it->is_boolean() && it->get<bool>();
	};
	oneway_ = flag("oneway");
	more_ = flag("more");
	json params = json::object();
	// Missing or null parameters are no parameters, as in systemd's sd-varlink (varlink-go
	// sends null).
	if (auto p = body.find("parameters"); p != body.end() && !p->is_null()) {
		if (!p->is_object())
			return error(vl::kInvalidParameter, {{"parameter", "parameters"}});
		params = std::move(*p); // a Handoff batch is large: no copy
	}
	if (!m.fds.empty() && method != "io.brokerd.Worker.Handoff") {
		// No other method takes fds; they close with the message.
		return error(vl::kInvalidParameter, {{"parameter", "fd"}});
	}

	std::size_t dot = method.rfind('.');
	std::string iface = dot == std::string::npos ? std::string{} : method.substr(0, dot);
	std::string name = dot == std::string::npos ? method : method.substr(dot + 1);

	try {
		if (iface == "org.varlink.service") {
			if (name == "GetInfo")
				return get_info();
			if (name == "GetInterfaceDescription")
				return get_interface_description(params);
		} else if (iface == "io.brokerd.Control") {
			std::optional<access::Tier> needed = access::required(name);
			if (!needed)
				return error(vl::kMethodNotFound, {{"method", method}});
			if (tier() < *needed) {
				log::client(log::Level::Warning, "control: " + method + " from " + who() + " denied");
				return error(vl::kPermissionDenied);
			}
			if (name == "Status" || name == "Sockets")
				return control_status(params, name == "Sockets");
			if (name == "Watch")
				return control_watch(params);
			if (name == "Upgrade" || name == "Rollback" || name == "Restart") {
				std::string kind = name == "Upgrade" ? "upgrade" : name == "Rollback" ? "rollback" : "restart";
				return control_upgrade(params, kind);
			}
			if (name == "Abort")
				return control_abort(params);
			if (name == "Start" || name == "Stop")
				return control_start_stop(params, name == "Start");
			if (name == "Reexec")
				return control_reexec(params);
			return control_reload(params);
		} else if (iface == "io.brokerd.Worker") {
			if (name == "Hello")
				return worker_hello(params);
			if (name == "Ready")
				return worker_ready();
			if (name == "Status")
				return worker_status(params);
			if (name == "Events")
				return worker_events();
			if (name == "Handoff")
				return worker_handoff(params, std::move(m.fds));
			if (name == "Received")
				return worker_received(params);
		} else {
			return error(vl::kInterfaceNotFound, {{"interface", iface}});
		}
		return error(vl::kMethodNotFound, {{"method", method}});
	} catch (const json::exception &) {
		// A parameter of the wrong type surfaced while reading it.
		return error(vl::kInvalidParameter, {{"parameter", "parameters"}});
	}
}

void ControlServer::Connection::get_info()
{
	json ifaces = json::array();
	for (const auto &t : interface_texts())
		ifaces.push_back(t.name);
	reply({{"vendor", "brokerd"},
	       {"product", "brokerd"},
	       {"version", BROKER_VERSION},
	       {"url", "https://github.com/brokerd/brokerd"},
	       {"interfaces", ifaces}});
}

void ControlServer::Connection::get_interface_description(const json &params)
{
	auto it = params.find("interface");
	if (it == params.end() || !it->is_string())
		return error(vl::kInvalidParameter, {{"parameter", "interface"}});
	for (const auto &t : interface_texts())
		if (t.name == it->get<std::string>())
			return reply({{"description", t.description}});
	error(vl::kInterfaceNotFound, {{"interface", *it}});
}

void ControlServer::Connection::control_status(const json &params, bool only_sockets)
{
	std::string service;
	bool narrowed = false;
	for (auto it = params.begin(); it != params.end(); ++it) {
		if (!only_sockets && it.key() == "service" && it->is_string()) {
			service = it->get<std::string>();
			narrowed = true;
		} else if (!(it.key() == "service" && it->is_null())) {
			return error(vl::kInvalidParameter, {{"parameter", it.key()}});
		}
	}
	json sockets = json::array();
	for (const auto &l : server_.supervisor_.listeners())
		sockets.push_back({{"name", l.name}, {"address", l.address}, {"kind", l.kind}, {"origin", l.origin}});
	if (only_sockets)
		return reply({{"sockets", std::move(sockets)}});

	json services = server_.supervisor_.services_json(narrowed ? &service : nullptr);
	if (services.is_null())
		return error(proto::errors::kNoSuchService, {{"service", service}});
	reply({{"version", BROKER_VERSION},
	       {"pid", ::getpid()},
	       {"uptime_usec", now_usec(CLOCK_MONOTONIC) - server_.start_usec_},
	       {"sockets", std::move(sockets)},
	       {"services", std::move(services)}});
}

Instance *ControlServer::Connection::worker()
{
	if (token_.empty()) {
		error(proto::errors::kNotAuthenticated);
		return nullptr;
	}
	Instance *inst = server_.supervisor_.find_by_token(token_);
	if (!inst)
		error(proto::errors::kInvalidToken);
	return inst;
}

void ControlServer::Connection::worker_hello(const json &params)
{
	std::string token, service, version;
	bool want_fds = false, accept_handoff = false;
	for (auto it = params.begin(); it != params.end(); ++it) {
		const std::string &k = it.key();
		if (it->is_null())
			continue;
		if (k == "token" && it->is_string())
			token = it->get<std::string>();
		else if (k == "want_fds" && it->is_boolean())
			want_fds = it->get<bool>();
		else if (k == "accept_handoff" && it->is_boolean())
			accept_handoff = it->get<bool>();
		else if (k == "service" && it->is_string())
			service = it->get<std::string>();
		else if (k == "version" && it->is_string())
			version = it->get<std::string>();
		else
			return error(vl::kInvalidParameter, {{"parameter", k}});
	}
	if (!token_.empty())
		return error(vl::kInvalidParameter, {{"parameter", "token"}}); // one Hello per connection

	Instance *inst = nullptr;
	if (!token.empty()) {
		inst = server_.supervisor_.find_by_token(token);
		if (!inst) {
			log::client(log::Level::Warning, "control: Hello with an unknown token from " + who() + " denied");
			return error(proto::errors::kInvalidToken);
		}
		if (auto why = foreign_to(*inst)) {
			log::client(log::Level::Warning, "control: Hello with the token of instance " + inst->id + " from " + who() +
			                                     " denied: " + *why);
			return error(vl::kPermissionDenied, {{"message", *why}});
		}
	} else {
		// A worker started elsewhere registers for an external service, by its credentials.
		if (service.empty())
			return error(vl::kInvalidParameter, {{"parameter", "service"}});
		Service *svc = server_.supervisor_.find_service(service);
		if (!svc)
			return error(proto::errors::kWorkerNoSuchService, {{"service", service}});
		// The process is taken from the connection, never by its pid alone: signals brokerd sends
		// it later must not reach another process that got the pid since.
		std::string gone;
		proto::UniqueFd pidfd = peer::process(stream_.fd(), peer_.pid, connected_, gone);
		if (!pidfd) {
			log::client(log::Level::Warning, "service " + service + ": registration from " + who() + " refused: " + gone);
			return error(proto::errors::kPeerExited, {{"message", gone + ": a worker registers on a connection it opened itself"}});
		}
		std::vector<gid_t> groups = peer_groups(stream_.fd());
		groups.push_back(peer_.gid);
		ControlError refusal;
		inst = server_.supervisor_.register_external(*svc, version, std::move(pidfd), peer_.pid, peer_.uid, groups,
		                                             refusal);
		if (!inst)
			return error(refusal.name, refusal.parameters);
		token = inst->token;
	}
	token_ = token;
	idle_.reset();
	inst->accepts_handoff = accept_handoff;
	// A worker may hand off connections from now on: two messages' worth may be in flight.
	stream_.set_max_queued_fds(proto::limits::kMaxQueuedFds);
	try {
		closer::pass_rights(stream_.fd(), true);
		stream_.fd_from_peer(); // fds in flight on it close with it
	} catch (const std::exception &e) {
		close(std::string("cannot take handoffs: ") + e.what());
		return;
	}

	json sockets = json::array();
	std::vector<proto::UniqueFd> fds;
	for (const Listener *l : inst->service->sockets) {
		json s = {{"name", l->name}, {"address", l->address}, {"kind", l->kind}};
		if (want_fds) {
			proto::UniqueFd dup(::fcntl(l->fd.get(), F_DUPFD_CLOEXEC, 3));
			if (!dup) {
				log::error("instance " + inst->id + ": cannot duplicate socket " + l->name + ": " + errno_text(errno));
				return error(vl::kInvalidParameter, {{"parameter", "want_fds"}});
			}
			s["fd"] = fds.size();
			fds.push_back(std::move(dup));
		}
		sockets.push_back(std::move(s));
	}
	json params_out = {{"service", inst->service->name},
	                   {"instance", inst->id},
	                   {"generation", inst->generation->number},
	                   {"sockets", std::move(sockets)}};
	if (oneway_)
		return;
	int r = stream_.enqueue(vl::make_reply(std::move(params_out)), std::move(fds));
	if (r == 0)
		r = stream_.flush();
	if (r < 0 && r != -EAGAIN)
		close("send: " + errno_text(-r));
}

// A token is its instance's alone: the Hello must come from the instance's process, one it
// started (its descendants, or the processes of the session brokerd made for it, which a
// double-forked daemon stays in), with the instance's uid unless the instance runs as root
// (whose children may drop privileges). Returns why the peer is not, or nullopt.
std::optional<std::string> ControlServer::Connection::foreign_to(const Instance &inst)
{
	std::string why;
	proto::UniqueFd pidfd = peer::process(stream_.fd(), peer_.pid, connected_, why);
	if (!pidfd)
		return why;
	std::vector<pid_t> roots = {inst.pid};
	if (inst.main_pid)
		roots.push_back(inst.main_pid);
	bool related = peer::descends_from(peer_.pid, roots) || (inst.session > 0 && ::getsid(peer_.pid) == inst.session);
	if (!related)
		return "the token belongs to instance " + inst.id + ", and pid " + std::to_string(peer_.pid) +
		       " is neither its process, nor started by it, nor in its session";
	std::optional<uid_t> uid = peer::process_uid(inst.pid);
	if (!uid || (*uid != 0 && *uid != peer_.uid))
		return "the token belongs to instance " + inst.id + ", which runs as another user";
	// The checks above read /proc by pid: they were about the peer only if it still runs.
	if (!peer::alive(pidfd.get()))
		return "pid " + std::to_string(peer_.pid) + ", which connected, has exited";
	return std::nullopt;
}

void ControlServer::Connection::worker_ready()
{
	if (Instance *inst = worker()) {
		server_.supervisor_.instance_ready(*inst, "Ready");
		reply(json::object());
	}
}

void ControlServer::Connection::worker_status(const json &params)
{
	auto it = params.find("text");
	if (it == params.end() || !it->is_string())
		return error(vl::kInvalidParameter, {{"parameter", "text"}});
	if (Instance *inst = worker()) {
		if (auto why = server_.supervisor_.instance_status(*inst, it->get<std::string>())) {
			log::client(log::Level::Warning, "instance " + inst->id + ": status text refused: " + *why);
			return error(vl::kInvalidParameter, {{"parameter", "text"}});
		}
		reply(json::object());
	}
}

void ControlServer::Connection::worker_events()
{
	if (!more_)
		return error(vl::kExpectedMore);
	Instance *inst = worker();
	if (!inst)
		return;
	// One stream per instance: its drain requests and handed-off connections have one recipient.
	if (!server_.supervisor_.attach_events(*inst, this)) {
		log::client(log::Level::Warning, "control: instance " + inst->id + ": a second Events stream from " + who() +
		                                     " refused, the first one stays");
		return error(proto::errors::kEventsInUse, {{"instance", inst->id}});
	}
}

// Handoff is oneway: its outcome comes back as a "handoff" event on this connection's Events
// stream, so one connection carries everything. A call that cannot be understood returns every
// connection it carried: the sender still holds them all.
void ControlServer::Connection::worker_handoff(const json &params, std::vector<proto::UniqueFd> fds)
{
	// By its Events stream, not its token: a sender may exit right after writing its batches,
	// and its exit be handled first. What reached brokerd still goes to the successor, as the
	// sender's own copies are gone.
	Instance *inst = server_.supervisor_.find_by_sink(this);
	if (!inst) {
		if (worker())
			close("Handoff without an Events stream on the same connection");
		return;
	}
	auto batch = params.find("batch");
	if (batch == params.end() || !batch->is_number_unsigned())
		return close("Handoff without a batch id");
	std::uint64_t id = batch->get<std::uint64_t>();
	auto refuse = [&](const std::string &why) {
		log::warning("instance " + inst->id + ": Handoff batch " + std::to_string(id) + ": " + why);
		send_event(all_returned(id, fds.size(), why));
	};
	auto conns = params.find("connections");
	if (conns == params.end() || !conns->is_array() || conns->size() != fds.size())
		return refuse("\"connections\" must list one entry per fd");
	std::uint64_t remaining = 0;
	if (auto r = params.find("remaining"); r != params.end() && !r->is_null()) {
		if (!r->is_number_unsigned())
			return refuse("\"remaining\" must be a count");
		remaining = r->get<std::uint64_t>();
	}
	for (auto it = params.begin(); it != params.end(); ++it)
		if (it.key() != "batch" && it.key() != "connections" && it.key() != "remaining")
			return refuse("unknown parameter \"" + it.key() + "\"");

	std::vector<HandoffItem> items(fds.size());
	for (std::size_t i = 0; i < conns->size(); i++) {
		const json &c = (*conns)[i];
		if (!c.is_object())
			return refuse("connection " + std::to_string(i) + " is not an object");
		// count_fd_refs() proved the indices are exactly 0..n-1.
		items[c.at("fd").get<std::size_t>()].fd = std::move(fds[c.at("fd").get<std::size_t>()]);
		if (auto st = c.find("state"); st != c.end() && !st->is_null()) {
			if (!st->is_string() || !proto::handoff::base64_valid(st->get_ref<const std::string &>(), proto::handoff::kMaxState))
				return refuse("connection " + std::to_string(i) + ": state must be base64 of at most " +
				              std::to_string(proto::handoff::kMaxState) + " bytes");
			items[c.at("fd").get<std::size_t>()].state = st->get<std::string>();
		}
		for (auto m = c.begin(); m != c.end(); ++m)
			if (m.key() != "fd" && m.key() != "state")
				return refuse("connection " + std::to_string(i) + ": unknown member \"" + m.key() + "\"");
	}
	server_.supervisor_.handoff(*inst, *this, id, std::move(items), remaining);
}

void ControlServer::Connection::worker_received(const json &params)
{
	// Not worker(): a receiver may die right after acknowledging, and its exit may be handled
	// before its last words are read. What it acknowledged it had, and closed as it died; given
	// back, those connections would be served twice. The router checks that this connection was
	// sent the batch.
	if (token_.empty())
		return error(proto::errors::kNotAuthenticated);
	auto batch = params.find("batch");
	if (batch == params.end() || !batch->is_number_unsigned())
		return close("Received without a batch id");
	std::vector<std::uint64_t> refused;
	if (auto r = params.find("refused"); r != params.end() && !r->is_null()) {
		if (!r->is_array())
			return close("Received: \"refused\" must be a list of indices");
		for (const json &i : *r) {
			if (!i.is_number_unsigned())
				return close("Received: \"refused\" must be a list of indices");
			refused.push_back(i.get<std::uint64_t>());
		}
	}
	if (auto why = server_.supervisor_.handoff_received(*this, batch->get<std::uint64_t>(), refused))
		return close("Received: " + *why);
	reply(json::object());
}

Service *ControlServer::Connection::service_param(const json &params, const std::vector<std::string> &allowed)
{
	for (auto it = params.begin(); it != params.end(); ++it)
		if (it.key() != "service" && std::find(allowed.begin(), allowed.end(), it.key()) == allowed.end()) {
			error(vl::kInvalidParameter, {{"parameter", it.key()}});
			return nullptr;
		}
	auto it = params.find("service");
	if (it == params.end() || !it->is_string()) {
		error(vl::kInvalidParameter, {{"parameter", "service"}});
		return nullptr;
	}
	Service *svc = server_.supervisor_.find_service(it->get<std::string>());
	if (!svc)
		error(proto::errors::kNoSuchService, {{"service", *it}});
	return svc;
}

void ControlServer::Connection::control_upgrade(const json &params, const std::string &kind)
{
	std::vector<std::string> allowed = {"wait"};
	if (kind == "upgrade")
		allowed = {"wait", "exec", "env", "version", "batch", "all_at_once", "start_timeout_ms", "drain_timeout_ms"};
	Service *svc = service_param(params, allowed);
	if (!svc)
		return;
	// Varlink's InvalidParameter names the parameter; "message" says what is wrong with it.
	auto bad = [&](const char *p, const std::string &why = {}) {
		json e = {{"parameter", p}};
		if (!why.empty())
			e["message"] = why;
		error(vl::kInvalidParameter, e);
	};
	bool wait = true;
	if (auto it = params.find("wait"); it != params.end() && !it->is_null()) {
		if (!it->is_boolean())
			return bad("wait");
		wait = it->get<bool>();
	}

	UpgradeRequest req;
	req.kind = kind;
	if (kind == "rollback") {
		if (!svc->previous)
			return error(proto::errors::kNoPreviousGeneration, {{"service", svc->name}});
		req.cfg = *svc->previous;
	} else if (kind == "restart") {
		req.cfg = svc->current ? svc->current->cfg : svc->cfg;
	} else {
		// A new generation starts from the config file as it is now.
		try {
			config::Config cfg = server_.hooks_.read_config();
			const config::ServiceConfig *sc = cfg.find_service(svc->name);
			if (!sc)
				return error(proto::errors::kInvalidConfig,
				             {{"message", "services." + svc->name + ": not in the config file any more (reload removes it)"}});
			req.cfg = *sc;
		} catch (const std::exception &e) {
			return error(proto::errors::kInvalidConfig, {{"message", e.what()}});
		}
		if (auto it = params.find("exec"); it != params.end() && !it->is_null()) {
			if (!it->is_array() || it->empty())
				return bad("exec", "expected a list of strings, the program first");
			req.cfg.exec.clear();
			for (const auto &a : *it) {
				if (!a.is_string() || a.get<std::string>().empty() || a.get<std::string>().find('\0') != std::string::npos)
					return bad("exec", "each argument must be a non-empty string without NUL");
				req.cfg.exec.push_back(a.get<std::string>());
			}
		}
		if (auto it = params.find("env"); it != params.end() && !it->is_null()) {
			if (!it->is_object())
				return bad("env");
			for (auto e = it->begin(); e != it->end(); ++e) {
				const std::string &k = e.key();
				bool valid = !k.empty() && !std::isdigit(static_cast<unsigned char>(k[0])) &&
				             std::all_of(k.begin(), k.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
				if (!valid)
					return bad("env", "\"" + k + "\" is not a variable name (letters, digits and _, not first a digit)");
				if (k.starts_with("BROKER_") || k.starts_with("LISTEN_") || k == "NOTIFY_SOCKET")
					return bad("env", k + ": BROKER_*, LISTEN_* and NOTIFY_SOCKET are set by brokerd");
				if (!e->is_string() || e->get<std::string>().find('\0') != std::string::npos)
					return bad("env", k + ": the value must be a string without NUL");
				req.cfg.env[k] = e->get<std::string>();
			}
		}
		if (auto it = params.find("version"); it != params.end() && !it->is_null()) {
			if (!it->is_string() || it->get<std::string>().find('\0') != std::string::npos)
				return bad("version", "expected a string without NUL");
			req.cfg.version = it->get<std::string>();
		}
		if (auto it = params.find("batch"); it != params.end() && !it->is_null()) {
			if (!it->is_number_unsigned() || it->get<std::uint64_t>() < 1 || it->get<std::uint64_t>() > 1024)
				return bad("batch", "expected a number of instances from 1 to 1024");
			req.cfg.upgrade_batch = it->get<unsigned>();
		}
		if (auto it = params.find("all_at_once"); it != params.end() && !it->is_null()) {
			if (!it->is_boolean())
				return bad("all_at_once");
			req.all_at_once = it->get<bool>();
		}
		for (const char *key : {"start_timeout_ms", "drain_timeout_ms"}) {
			auto it = params.find(key);
			if (it == params.end() || it->is_null())
				continue;
			if (!it->is_number_unsigned() || it->get<std::uint64_t>() > 365ull * 24 * 3600 * 1000)
				return bad(key, "expected milliseconds, at most 365 days");
			auto ms = std::chrono::milliseconds(it->get<std::uint64_t>());
			if (key[0] == 's') {
				if (ms.count() == 0)
					return bad(key, "a start timeout must be above 0");
				req.cfg.start_timeout = ms;
			} else {
				req.cfg.drain_timeout = ms;
				req.drain_timeout = ms;
			}
		}
		// exec and env choose what runs; version is a label (BROKER_VERSION) the program was
		// configured to read, like the timeouts and batch: those stay open to admins.
		bool chooses_program = false;
		for (const char *key : {"exec", "env"})
			if (auto it = params.find(key); it != params.end() && !it->is_null())
				chooses_program = true;
		if (auto why = chooses_program ? access::program_choice(tier(), req.cfg, ::geteuid(), ::getegid()) : std::nullopt) {
			log::client(log::Level::Warning, "control: Upgrade of " + svc->name + " with exec or env from " + who() +
			                                     " denied: " + *why);
			return error(vl::kPermissionDenied, {{"message", *why}});
		}
	}

	if (auto refusal = server_.supervisor_.begin_upgrade(*svc, std::move(req), wait && !oneway_ ? this : nullptr))
		return error(refusal->name, refusal->parameters);
	if (!wait) {
		json p = {{"event", "accepted"}, {"service", svc->name}};
		if (svc->upgrade)
			p["generation"] = svc->upgrade->to->number;
		return reply({{"progress", p}});
	}
	if (svc->upgrade && !oneway_)
		waiting_ = true; // the supervisor answers when the rollout ends
}

void ControlServer::Connection::control_abort(const json &params)
{
	Service *svc = service_param(params, {});
	if (!svc)
		return;
	if (auto refusal = server_.supervisor_.abort_upgrade(*svc))
		return error(refusal->name, refusal->parameters);
	reply(json::object());
}

void ControlServer::Connection::control_start_stop(const json &params, bool start)
{
	Service *svc = service_param(params, {});
	if (!svc)
		return;
	Observer *me = oneway_ ? nullptr : this;
	waiting_ = me != nullptr;
	auto refusal = start ? server_.supervisor_.start_service(*svc, me) : server_.supervisor_.stop_service(*svc, me);
	if (refusal) {
		waiting_ = false;
		error(refusal->name, refusal->parameters);
	}
}

void ControlServer::Connection::control_reload(const json &params)
{
	if (!params.empty())
		return error(vl::kInvalidParameter, {{"parameter", params.begin().key()}});
	// Sockets bound and services started now would only be torn down again, or outlive the rest.
	if (server_.supervisor_.shutting_down())
		return error(proto::errors::kShuttingDown);
	try {
		reply(server_.hooks_.reload());
	} catch (const std::exception &e) {
		error(proto::errors::kInvalidConfig, {{"message", e.what()}});
	}
}

void ControlServer::Connection::control_watch(const json &params)
{
	for (auto it = params.begin(); it != params.end(); ++it) {
		if (it.key() == "service" && it->is_string())
			watch_service_ = it->get<std::string>();
		else if (!(it.key() == "service" && it->is_null()))
			return error(vl::kInvalidParameter, {{"parameter", it.key()}});
	}
	if (!more_)
		return error(vl::kExpectedMore);
	if (!watch_service_.empty() && !server_.supervisor_.find_service(watch_service_))
		return error(proto::errors::kNoSuchService, {{"service", watch_service_}});
	watching_ = true;
	// The stream stays open; every event is one reply. Later calls on this connection wait.
	waiting_ = true;
}

void ControlServer::Connection::control_reexec(const json &params)
{
	std::string binary;
	for (auto it = params.begin(); it != params.end(); ++it) {
		if (it.key() == "binary" && it->is_string() && !it->get<std::string>().empty())
			binary = it->get<std::string>();
		else if (!(it.key() == "binary" && it->is_null()))
			return error(vl::kInvalidParameter, {{"parameter", it.key()}});
	}
	if (oneway_)
		return error(vl::kInvalidParameter, {{"parameter", "oneway"}});
	// Another binary runs as brokerd's user (root): only that user may name one. Configured
	// admins may re-execute the installed brokerd.
	if (!binary.empty() && tier() < access::kReexecBinary) {
		log::client(log::Level::Warning, "control: Reexec of " + binary + " from " + who() + " denied: only root names a binary");
		return error(vl::kPermissionDenied, {{"message", "only root names a binary: it runs as brokerd's user"}});
	}
	try {
		// Returns only when brokerd could not re-execute: it goes on serving as it was.
		server_.hooks_.reexec(binary, stream_.fd());
		error(proto::errors::kReexecFailed, {{"message", "re-exec returned without an error"}});
	} catch (const std::exception &e) {
		log::error(std::string("reexec: ") + e.what() + "; carrying on");
		error(proto::errors::kReexecFailed, {{"message", e.what()}});
	}
}

json ControlServer::Connection::save(int caller, std::vector<int> &keep_fds) const
{
	if (dead_)
		return nullptr;
	std::string in, out;
	if (!stream_.save(in, out))
		throw std::runtime_error("the control connection of " + who() + " has fds in flight");
	keep_fds.push_back(stream_.fd());
	Instance *inst = token_.empty() ? nullptr : server_.supervisor_.find_by_token(token_);
	json j = {{"fd", stream_.fd()},
	          {"token", token_},
	          {"events", inst && inst->events == this},
	          {"in", proto::handoff::base64_encode(in)},
	          {"out", proto::handoff::base64_encode(out)},
	          {"caller", stream_.fd() == caller},
	          {"connected", connected_}};
	if (watching_)
		j["watch"] = watch_service_;
	return j;
}

void ControlServer::Connection::restore(const json &j)
{
	auto in = proto::handoff::base64_decode(j.at("in").get<std::string>());
	auto out = proto::handoff::base64_decode(j.at("out").get<std::string>());
	stream_.restore(in ? std::move(*in) : std::string(), out ? std::move(*out) : std::string());
	token_ = j.at("token").get<std::string>();
	connected_ = j.value("connected", connected_); // a Hello still to come checks against it
	if (!token_.empty()) {
		idle_.reset();
		stream_.set_max_queued_fds(proto::limits::kMaxQueuedFds);
		Instance *inst = server_.supervisor_.find_by_token(token_);
		if (inst && j.at("events").get<bool>()) {
			server_.supervisor_.attach_events(*inst, this);
			instance_conn_ = true;
			spawned_instance_ = !inst->external;
		}
	}
	if (j.at("caller").get<bool>()) {
		// The answer to the Reexec call, from the brokerd it asked for.
		reply({{"version", BROKER_VERSION}, {"pid", ::getpid()}});
	}
	if (j.contains("watch")) {
		// A Watch stream goes on: later calls on it keep waiting their turn.
		watching_ = true;
		waiting_ = true;
		watch_service_ = j.at("watch").get<std::string>();
	}
	apply_limits();
	update_events();
	schedule_resume();
}

json ControlServer::save_state(int caller, std::vector<int> &keep_fds)
{
	json conns = json::array();
	for (const auto &c : connections_) {
		json j = c->save(caller, keep_fds);
		if (!j.is_null())
			conns.push_back(std::move(j));
	}
	keep_fds.push_back(fd_.get());
	return {{"fd", fd_.get()}, {"adopted", adopted_}, {"unlink_path", unlink_path_}, {"connections", std::move(conns)}};
}

void ControlServer::restore_state(const json &state)
{
	adopted_ = state.at("adopted").get<bool>();
	unlink_path_ = state.at("unlink_path").get<std::string>();
	for (const json &j : state.at("connections")) {
		proto::UniqueFd fd = proto::UniqueFd::from_peer(j.at("fd").get<int>());
		state::set_cloexec(fd.get(), true);
		auto conn = std::make_unique<Connection>(*this, std::move(fd));
		if (!conn->start()) {
			// Lost like any connection that closes: a registered worker counts as gone.
			if (std::string token = j.at("token").get<std::string>(); !token.empty())
				supervisor_.connection_closed(token);
			continue;
		}
		conn->restore(j);
		connections_.push_back(std::move(conn));
	}
}

void ControlServer::broadcast(const json &event)
{
	for (auto &c : connections_)
		c->watch_event(event);
}

void ControlServer::bind_socket()
{
	const std::string &path = cfg_.path;
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	if (path.empty() || path.size() >= sizeof(sa.sun_path))
		throw std::runtime_error("control socket: invalid path \"" + path + "\"");
	std::memcpy(sa.sun_path, path.data(), path.size());
	socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
	bool abstract = path[0] == '@';
	if (abstract) {
		sa.sun_path[0] = '\0';
	} else {
		len += 1;
		make_parent_directory(path);
		struct stat st{};
		if (::lstat(path.c_str(), &st) == 0) {
			if (!S_ISSOCK(st.st_mode))
				throw std::runtime_error("control socket: " + path + " exists and is not a socket, refusing to replace it");
			if (unix_socket_in_use(path))
				throw std::runtime_error("control socket: " + path +
				                         ": another brokerd (or something else) listens on it, refusing to replace it");
			::unlink(path.c_str());
		}
	}

	fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd_)
		throw std::runtime_error("control socket: " + errno_text(errno));
	if (::bind(fd_.get(), reinterpret_cast<sockaddr *>(&sa), len) < 0)
		throw std::runtime_error("control socket: bind " + path + ": " + errno_text(errno));
	if (!abstract) {
		unlink_path_ = path;
		if (::chmod(path.c_str(), cfg_.mode) < 0)
			throw std::runtime_error("control socket: chmod " + path + ": " + errno_text(errno));
	}
	if (::listen(fd_.get(), 128) < 0)
		throw std::runtime_error("control socket: listen: " + errno_text(errno));
}

ControlServer::ControlServer(sd_event *event, const config::ControlConfig &cfg, Supervisor &supervisor,
                             DaemonHooks hooks, std::uint64_t start_usec, proto::UniqueFd adopted)
	: event_(event), cfg_(cfg), rules_(AccessRules::resolve(cfg)), supervisor_(supervisor), hooks_(std::move(hooks)),
	  start_usec_(start_usec)
{
	if (adopted) {
		// systemd's socket (brokerd.socket, or our own kept in the fd store): its file and mode
		// are systemd's business, and it stays when we stop. We accept without blocking.
		int flags = ::fcntl(adopted.get(), F_GETFL);
		if (flags < 0 || ::fcntl(adopted.get(), F_SETFL, flags | O_NONBLOCK) < 0)
			throw std::runtime_error("control socket: " + errno_text(errno));
		fd_ = std::move(adopted);
		adopted_ = true;
	} else {
		bind_socket();
	}

	// Only a worker's Handoff carries fds: the connections it accepts refuse them until Hello.
	refuses_fds_ = closer::pass_rights(fd_.get(), false);
	if (!refuses_fds_)
		log::info("control socket: the kernel cannot refuse fds (no SO_PASSRIGHTS), they are closed off the loop");

	sd_event_source *s = nullptr;
	int r = sd_event_add_io(event_, &s, fd_.get(), EPOLLIN, accept_handler, this);
	if (r < 0)
		throw std::runtime_error("control socket: " + errno_text(-r));
	source_.reset(s);
}

ControlServer::~ControlServer()
{
	connections_.clear();
	remove_socket_file();
}

void ControlServer::remove_socket_file()
{
	if (unlink_path_.empty())
		return;
	struct stat st{};
	if (::lstat(unlink_path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode))
		::unlink(unlink_path_.c_str());
	unlink_path_.clear();
}

int ControlServer::accept_handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("accept_handler", [&]() -> int {
		static_cast<ControlServer *>(userdata)->accept_some();
		return 0;
	});
}

void ControlServer::accept_some()
{
	for (int i = 0; i < kAcceptPerWakeup; i++) {
		// Where fds can reach its queue, its close may drop the last copy of one.
		int accepted = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
		proto::UniqueFd fd = refuses_fds_ ? proto::UniqueFd(accepted) : proto::UniqueFd::from_peer(accepted);
		if (!fd) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				// Out of fds: stop accepting for a moment instead of spinning on a readable socket.
				log::warning("control: accept: " + errno_text(errno) + ", pausing new connections for 1s");
				sd_event_source_set_enabled(source_.get(), SD_EVENT_OFF);
				sd_event_source *s = nullptr;
				auto resume = [](sd_event_source *, std::uint64_t, void *userdata) -> int {
					auto *server = static_cast<ControlServer *>(userdata);
					server->pause_.reset();
					sd_event_source_set_enabled(server->source_.get(), SD_EVENT_ON);
					return 0;
				};
				if (sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC, 1000000, 100000, resume, this) >= 0)
					pause_.reset(s);
				else
					sd_event_source_set_enabled(source_.get(), SD_EVENT_ON);
				return;
			}
			if (errno != EAGAIN)
				log::warning("control: accept: " + errno_text(errno) + ", ignoring");
			return;
		}
		auto conn = std::make_unique<Connection>(*this, std::move(fd));
		if (!conn->start())
			continue;
		if (auto why = refusal(*conn)) {
			conn->refuse(*why);
			continue;
		}
		connections_.push_back(std::move(conn));
	}
}

// Why a new connection may not have a slot: one user cannot take them all (workers of other
// users still say Hello), and none but root and the operators take the last few (root's
// `brokerctl status` always gets in).
std::optional<std::string> ControlServer::refusal(const Connection &conn) const
{
	std::size_t live = 0, mine = 0;
	for (const auto &c : connections_) {
		if (c->dead())
			continue;
		live++;
		mine += c->uid() == conn.uid() && !c->uncounted();
	}
	if (live >= cfg_.max_connections)
		return "brokerd has " + std::to_string(live) + " connections, its most (control.max_connections)";
	if (!conn.is_operator() && live + std::min(cfg_.reserved_connections, cfg_.max_connections) >= cfg_.max_connections)
		return "brokerd has " + std::to_string(live) + " connections; the other " +
		       std::to_string(cfg_.reserved_connections) + " are kept for operators (control.reserved_connections)";
	bool owner = conn.uid() == 0 || conn.uid() == ::geteuid();
	if (!owner && mine >= cfg_.max_connections_per_user)
		return "uid " + std::to_string(conn.uid()) + " has " + std::to_string(mine) +
		       " connections, the most for one user (control.max_connections_per_user)";
	return std::nullopt;
}

void ControlServer::schedule_sweep()
{
	if (sweep_)
		return;
	sd_event_source *s = nullptr;
	if (sd_event_add_defer(event_, &s, sweep_handler, this) >= 0) {
		sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
		sweep_.reset(s);
	}
}

int ControlServer::sweep_handler(sd_event_source *, void *userdata)
{
	return guarded("sweep_handler", [&]() -> int {
		auto *server = static_cast<ControlServer *>(userdata);
		std::size_t freed = 0;
		server->connections_.remove_if([&](const auto &c) {
			if (c->dead())
				freed += c->buffer_bytes();
			return c->dead();
		});
		server->sweep_.reset();
		// glibc keeps what is freed in its arenas: a flood of large buffers would stay brokerd's
		// for good.
		server->freed_since_trim_ += freed;
		if (server->freed_since_trim_ >= proto::limits::kTrimAfterFreeing) {
			server->freed_since_trim_ = 0;
			::malloc_trim(0);
		}
		return 0;
	});
}

} // namespace brokerd
