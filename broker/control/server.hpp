// ControlServer: the Varlink control socket, serving io.brokerd.Control and io.brokerd.Worker.
#pragma once

#include "proto/unique_fd.hpp"
#include "config/config.hpp"
#include "control/access.hpp"
#include "metrics/exposition.hpp"
#include "os/event.hpp"
#include "supervisor/events.hpp"

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace brokerd {

class Supervisor;

// What only the daemon can do: read its config file, and apply it.
struct DaemonHooks {
	std::function<config::Config()> read_config; // throws config::ConfigError
	std::function<nlohmann::json()> reload;      // throws config::ConfigError or std::runtime_error
	// Starts re-executing brokerd (binary, the caller's socket fd): throws std::runtime_error
	// when it is refused at once. Else the binary is checked off the loop, and then either
	// `failed` is called with the reason, or brokerd execs it and the new brokerd answers the
	// caller. One at a time: another is refused while one is being checked.
	std::function<void(const std::string &binary, int caller, std::function<void(const std::string &why)> failed)>
		reexec;
	// The caller of the reexec being checked went away: it is dropped, and `failed` not called.
	std::function<void()> drop_reexec;
	// Every metric family at this moment (metrics/collect.hpp), for Metrics.
	std::function<std::vector<metrics::Family>()> metrics;
	// The daemon's sock_diag socket (open_sock_diag()), for unix listeners' accept queues in
	// Status and Sockets; -1 when there is none.
	int sock_diag = -1;
};

class ControlServer {
public:
	// Serves `adopted` (a listening socket at cfg.path, from systemd) when given, or binds
	// cfg.path (replacing a stale socket file, never anything else).
	ControlServer(sd_event *event, const config::ControlConfig &cfg, Supervisor &supervisor, DaemonHooks hooks,
	              usec_t start_usec, proto::UniqueFd adopted = {});
	// The listening socket, for the fd store.
	int fd() const { return fd_.get(); }
	bool adopted() const { return adopted_; }
	// Whether brokerd removes the socket's file when it stops: it bound it, or took it back
	// from the fd store after a crash of the brokerd that bound it (own_file()).
	bool owns_file() const { return !unlink_path_.empty(); }
	void own_file();
	~ControlServer();

	const std::string &path() const { return cfg_.path; }
	std::size_t connections() const { return connections_.size(); }
	// Open connections by their caller's tier, indexed by access::Tier (worker, reader, admin,
	// root), for the metrics.
	std::array<std::size_t, 4> connections_by_tier() const;
	// Removes the socket file, at shutdown.
	void remove_socket_file();
	// New access rules after a reload.
	void set_rules(AccessRules rules) { rules_ = std::move(rules); }
	const AccessRules &rules() const { return rules_; }
	// Sends an event to every Watch stream that wants it.
	void broadcast(const Event &event);

	// Re-exec: the listening socket and every connection (their fds go to keep_fds): workers'
	// with their Events streams, Watch streams, and the caller's, which the next brokerd
	// answers. Throws std::runtime_error when a connection cannot be carried (fds in flight).
	nlohmann::json save_state(int caller, std::vector<int> &keep_fds);
	// In the next brokerd, once the supervisor has its instances back.
	void restore_state(const nlohmann::json &state);

	class Connection;

private:
	friend class Connection;
	static int accept_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int sweep_handler(sd_event_source *s, void *userdata);
	void accept_some();
	std::optional<std::string> refusal(const Connection &conn) const;
	void bind_socket();
	void schedule_sweep();

	sd_event *event_;
	config::ControlConfig cfg_;
	AccessRules rules_;
	Supervisor &supervisor_;
	DaemonHooks hooks_;
	usec_t start_usec_;
	proto::UniqueFd fd_;
	EventSource source_;
	EventSource sweep_;
	EventSource pause_; // re-enables accepting after running out of fds
	std::string unlink_path_;
	bool adopted_ = false;
	bool refuses_fds_ = false; // SO_PASSRIGHTS off on the listener, so on what it accepts
	std::list<std::unique_ptr<Connection>> connections_;
	std::size_t freed_since_trim_ = 0; // buffer bytes of closed connections since the last malloc_trim
};

} // namespace brokerd
