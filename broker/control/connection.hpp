// ControlServer::Connection: one client of the control socket: its transport (connection.cpp), the
// calls it makes (methods.cpp's table, and their handlers), and its state across a re-exec
// (serialize.cpp).
#pragma once

#include "control/access.hpp"
#include "control/methods.hpp"
#include "control/server.hpp"
#include "proto/limits.hpp"
#include "proto/varlink.hpp"
#include "supervisor/supervisor.hpp"

#include <sys/socket.h>
#include <sys/types.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd {

// strerror(e) as a string.
std::string errno_text(int e);
// The supplementary groups of a socket's peer (SO_PEERGROUPS), or none when they cannot be read.
std::vector<gid_t> peer_groups(int fd);

// One client: its stream, its credentials, and its tier.
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
	access::Tier tier() const { return tier_; }
	std::size_t buffer_bytes() const { return stream_.buffer_bytes(); }
	bool is_operator() const { return tier_ >= access::Tier::Admin; }
	// The connection the Events stream of an instance brokerd spawned runs on: the config
	// bounds those, so they are not counted against their user's connections. (Registered
	// instances are, as every Hello of an allowed user makes one.)
	bool uncounted() const { return instance_conn_ && spawned_instance_; }
	// The largest message it may send.
	std::size_t max_input() const
	{
		return is_operator() || instance_conn_ ? proto::limits::kMaxMessageSize : proto::limits::kMaxSmallMessage;
	}
	// EventSink: the instance's Events stream, when this connection carries it.
	bool send_drain(usec_t timeout) override;
	bool send_connections(std::uint64_t batch, std::vector<HandoffItem> items, const HandoffOrigin &origin) override;
	bool send_handoff_result(const HandoffResult &result) override;
	bool send_peers(std::vector<HandoffPeer> ends) override;
	bool send_peer(HandoffPeer end) override;
	void read_rest() override;
	void watch_event(const Event &event);

	// Observer: the upgrade, start or stop this connection waits for.
	void progress(const Event &event) override;
	void finished(const Event *last) override;
	void failed(const Refusal &why) override;
	// An error reply that a refusal is.
	void refused(const Refusal &why);

private:
	static int io_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int idle_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	void on_io(std::uint32_t revents);
	void dispatch();
	void handle(proto::varlink::Message &m);
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

	// The handlers of methods.cpp's table, reached only through it (it checks the caller's tier
	// first): org.varlink.service (introspection.cpp), io.brokerd.Worker (worker_methods.cpp) and
	// io.brokerd.Control (control_methods.cpp).
	friend std::span<const control::Method> control::methods();
	void get_info(control::Call &call);
	void get_interface_description(control::Call &call);
	void worker_hello(control::Call &call);
	void worker_ready(control::Call &call);
	void worker_status(control::Call &call);
	void worker_events(control::Call &call);
	void worker_handoff(control::Call &call);
	void worker_received(control::Call &call);
	void worker_peers(control::Call &call);
	void worker_handed(control::Call &call);
	void worker_resume(control::Call &call);
	void control_status(control::Call &call);
	void control_sockets(control::Call &call);
	void control_watch(control::Call &call);
	void control_upgrade(control::Call &call);
	void control_rollback(control::Call &call);
	void control_history(control::Call &call);
	void control_restart(control::Call &call);
	void control_abort(control::Call &call);
	void control_start(control::Call &call);
	void control_stop(control::Call &call);
	void control_reload(control::Call &call);
	void control_reexec(control::Call &call);
	void control_metrics(control::Call &call); // metrics_methods.cpp
	void control_scale(control::Call &call);   // scale_methods.cpp
	void control_signal(control::Call &call);  // scale_methods.cpp

	// What the handlers share.
	Instance *hello_token(const std::string &token);
	Instance *hello_register(const std::string &service, const std::string &version);
	void hello_reply(const Instance &inst, bool want_fds);
	std::optional<std::string> foreign_to(const Instance &inst);
	void status(const nlohmann::json &params, bool only_sockets);
	void upgrade(const nlohmann::json &params, const std::string &kind);
	bool new_generation(const Service &svc, const nlohmann::json &params, UpgradeRequest &req);
	void start_stop(const nlohmann::json &params, bool start);

public:
	// Re-exec: what the next brokerd needs to carry this connection on (null: it is closing).
	// Throws std::runtime_error when it cannot be carried (fds in flight).
	nlohmann::json save(int caller, std::vector<int> &keep_fds) const;
	void restore(const nlohmann::json &j);

private:
	Service *service_param(const nlohmann::json &params, const std::vector<std::string> &allowed);

	Instance *worker();
	Instance *peer_sender(const char *method);
	void reply(nlohmann::json parameters, bool continues = false);
	void error(std::string_view name, nlohmann::json parameters = nlohmann::json::object());
	bool send_event(const nlohmann::json &parameters, std::vector<proto::UniqueFd> fds = {});
	bool sent(int r, const char *what);

	ControlServer &server_;
	proto::varlink::Stream stream_;
	EventSource io_;
	EventSource idle_;
	ucred peer_{};
	// CLOCK_BOOTTIME when accepted: a process that started later did not connect (see peer::process).
	usec_t connected_ = now_usec(CLOCK_BOOTTIME);
	access::Tier tier_ = access::Tier::Worker; // by its SO_PEERCRED when accepted
	std::string token_;     // set by a successful Hello
	bool oneway_ = false;   // the call being handled wants no reply
	bool more_ = false;
	bool dead_ = false;
	bool peer_gone_ = false; // writing failed: reading on until the end of its input
	bool waiting_ = false;  // an upgrade, start or stop will reply; later calls wait their turn
	bool watching_ = false;
	bool reexec_pending_ = false; // its Reexec is being checked: closing drops it
	bool instance_conn_ = false;   // it carries its instance's Events stream
	bool spawned_instance_ = false; // and that instance is one brokerd spawned
	std::string watch_service_;
	// What finished() replies to a call that waited without progress events (Scale's counts);
	// null: an empty reply (Start, Stop).
	nlohmann::json finished_reply_;
	EventSource resume_;
};

} // namespace brokerd
