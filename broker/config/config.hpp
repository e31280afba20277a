// brokerd's configuration: the schema of brokerd.json, loaded and validated in one place.
#pragma once

#include "config/accounts.hpp"
#include "proto/duration.hpp"
#include "proto/limits.hpp"

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd::config {

using Duration = std::chrono::milliseconds;

// Thrown for any invalid configuration. what() names the key path and the problem, e.g.
// `services.web.drain.timeout: expected a duration like "30s"`, prefixed by the file name
// when loaded from a file.
class ConfigError : public std::runtime_error {
public:
	using std::runtime_error::runtime_error;
};

struct ControlConfig {
	std::string path;                    // default: BROKER_DEFAULT_CONTROL
	mode_t mode = 0666;                  // workers of any user connect; methods check SO_PEERCRED
	std::vector<std::string> admin_users;
	std::vector<std::string> admin_groups;
	std::vector<std::string> read_users; // may also call Status and Sockets
	std::vector<std::string> read_groups;
	unsigned max_connections = proto::limits::kDefaultMaxConnections;
	unsigned max_connections_per_user = proto::limits::kDefaultMaxConnectionsPerUser; // not root's, not brokerd's
	unsigned reserved_connections = proto::limits::kDefaultReservedConnections; // of max_connections, for operators
};

// brokerd's own stop (SIGTERM or SIGINT): every instance drains, each within its drain timeout
// or what is left of this budget, whichever ends first, and is then killed. The default is
// systemd's DefaultTimeoutStopSec; the packaged unit's TimeoutStopSec leaves room above it.
struct ShutdownConfig {
	Duration timeout = std::chrono::seconds(90);
};

// Where workers' output and brokerd's own events go: the journal's native protocol, with fields
// naming the service and instance, or brokerd's stderr. auto: when stderr is the journal stream
// systemd gave brokerd (JOURNAL_STREAM names it); always: whenever the journal's socket exists.
enum class JournalMode { Auto, Always, Never };
struct LoggingConfig {
	JournalMode journal = JournalMode::Auto;
};

enum class SocketKind { Tcp, Udp, Unix, Systemd };

struct SocketConfig {
	std::string name;
	SocketKind kind = SocketKind::Tcp;
	// For tcp/udp: host ("0.0.0.0", "::", "127.0.0.1"; brackets removed) and port (0 = any).
	// For unix: path, or "@name" for the abstract namespace.
	std::string listen;                  // the configured string, e.g. "tcp://[::1]:8080"
	std::string host;
	std::uint16_t port = 0;
	std::string path;
	std::string systemd_name;            // kind == Systemd: the name in LISTEN_FDNAMES
	int backlog = 4096;
	bool reuseport = false;
	std::optional<bool> ipv6_only;
	std::optional<mode_t> mode;          // unix sockets only
};

// metrics.listen: GET /metrics over HTTP from brokerd's loop. Absent: no endpoint.
struct MetricsConfig {
	SocketConfig socket; // named "metrics"; tcp or unix, with mode for a unix file
	unsigned max_connections = proto::limits::kDefaultMetricsConnections;
};

enum class ReadyMode { Broker, Notify, Exec };
enum class RestartPolicy { No, OnFailure, Always };
// How a draining instance's connections reach its successor: on a channel brokerd makes between
// the two workers (when both speak it), or through brokerd's own connections.
enum class HandoffPath { Direct, Broker };

// The most instances a service may run: its config's "instances", and a Scale call's.
constexpr unsigned kMaxInstances = 1024;

struct ServiceConfig {
	std::string name;
	std::vector<std::string> exec;       // empty: an external service, whose workers register
	std::vector<std::string> sockets;    // names from Config::sockets, in fd order
	unsigned instances = 1;
	std::string version;                 // free-form label shown in Status
	ReadyMode ready = ReadyMode::Exec;
	Duration start_timeout = std::chrono::seconds(30);
	Duration drain_timeout = std::chrono::seconds(30);
	int drain_signal = 15;               // SIGTERM
	unsigned upgrade_batch = 1;
	RestartPolicy restart = RestartPolicy::OnFailure;
	HandoffPath handoff = HandoffPath::Direct;
	std::string user;                    // empty: the broker's own
	std::string group;
	std::string cwd;                     // empty: "/"
	std::map<std::string, std::string> env;
	std::vector<std::string> register_users; // external services: who may Hello
	std::vector<std::string> register_groups;
	Accounts accounts;                   // the names above, resolved when the config was loaded
};

struct Config {
	ControlConfig control;
	ShutdownConfig shutdown;
	LoggingConfig logging;
	std::vector<SocketConfig> sockets;   // sorted by name
	std::vector<ServiceConfig> services; // sorted by name
	std::optional<MetricsConfig> metrics;

	const SocketConfig *find_socket(std::string_view name) const;
	const ServiceConfig *find_service(std::string_view name) const;
};

// Parses JSON with comments, and resolves its user and group names (resolve_accounts). Throws
// ConfigError naming the key path.
Config parse(std::string_view text, const Resolver &resolver = Resolver::system());
// Reads and parses a file; errors are prefixed with the file name.
Config load(const std::string &path, const Resolver &resolver = Resolver::system());
// The same, keeping the file's text (a re-exec passes it on, to parse the very same config).
Config load(const std::string &path, std::string &text, const Resolver &resolver = Resolver::system());

// Resolves every service's user, group and register names, each distinct name once, into its
// `accounts`: once per load (at start, at a reload, at an Upgrade call), never per spawn or
// Hello. Throws ConfigError naming a service's user or group that does not resolve; a register
// name that does not matches nobody.
void resolve_accounts(Config &cfg, const Resolver &resolver = Resolver::system());
// The same for one service's config that a re-exec restores, which was valid when loaded: a user
// or group gone since is kept in accounts.unknown, and its instances fail at spawn with it.
void resolve_accounts(ServiceConfig &cfg, const Resolver &resolver = Resolver::system());
// At a reload: a running generation's config (`running`) with the same user and group as the
// one loaded takes its credentials, so that its next spawn sees an account created since.
void refresh_accounts(ServiceConfig &running, const ServiceConfig &loaded);

// The config's names of the ready modes and restart policies ("broker", "on-failure"), both ways.
const char *ready_name(ReadyMode mode);
const char *restart_name(RestartPolicy policy);
std::optional<ReadyMode> parse_ready(std::string_view name);
std::optional<RestartPolicy> parse_restart(std::string_view name);
const char *handoff_name(HandoffPath path);
std::optional<HandoffPath> parse_handoff(std::string_view name);

// Letters, digits and _, not first a digit: what the config and the Upgrade call take as a name.
bool valid_env_name(std::string_view name);

// The protocol's duration grammar (proto/duration.hpp): "250ms", "30s", "5m", "1h", "2d", "1m30s".
using proto::parse_duration;
// A variable brokerd sets for its workers, which neither the config nor an Upgrade call's env may
// set: every LISTEN_*, NOTIFY_SOCKET and every BROKER_*.
bool reserved_env_name(std::string_view name);
// "SIGTERM", "TERM", "15". Returns nullopt for unknown names.
std::optional<int> parse_signal(std::string_view text);
// What an operator may send a service's instances (Signal): one of kOperatorSignals, with or
// without "SIG", in any case, or a number from 1 to 31. nullopt for anything else.
std::optional<int> operator_signal(std::string_view text);
// Those names, for the message that refuses any other: "HUP, INT, ...".
extern const char *const kOperatorSignals;

} // namespace brokerd::config
