// brokerd.json: parsed, checked against the schema and turned into Config, with errors that name the key path.
#include "config/config.hpp"
#include "config/values.hpp"

#include "proto/limits.hpp"
#include "proto/unique_fd.hpp"
#include "broker_config.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <system_error>

#include <nlohmann/json.hpp>

namespace brokerd::config {

namespace {

using json = nlohmann::json;
using namespace values;

// A config file is a few KiB; the cap only stops a wrong path (a device, a huge log) from eating memory.
constexpr std::size_t kMaxConfigFile = 16u << 20;
// Longest sun_path, without the terminating NUL (paths) or the leading NUL (abstract names).
constexpr std::size_t kMaxSocketPath = sizeof(sockaddr_un::sun_path) - 1;
constexpr std::size_t kMaxName = 64;

// The problem with a unix socket address (a path or "@abstract"), or an empty string.
std::string socket_path_problem(std::string_view p)
{
	if (p.find('\0') != std::string_view::npos)
		return "must not contain a NUL byte";
	if (p.size() > 1 && p[0] == '@') {
		if (p.size() - 1 > kMaxSocketPath)
			return "abstract name longer than " + std::to_string(kMaxSocketPath) + " bytes";
		return {};
	}
	if (p.empty() || p[0] != '/')
		return "expected an absolute path or \"@name\"";
	if (p.size() > kMaxSocketPath)
		return "socket path longer than " + std::to_string(kMaxSocketPath) + " bytes";
	return {};
}

void check_name(const std::string &name, const std::string &path)
{
	if (name.empty() || name.size() > kMaxName || !is_plain(name))
		fail(path, "invalid name: use 1 to " + std::to_string(kMaxName) + " characters of A-Z a-z 0-9 _ . -");
}

void parse_control(const json &j, ControlConfig &c)
{
	const std::string path = "control";
	object_at(j, path);
	check_keys(j, path,
	           {"path", "mode", "admin_users", "admin_groups", "read_users", "read_groups", "max_connections",
	            "max_connections_per_user", "reserved_connections"});
	if (auto *v = member(j, "path")) {
		std::string p = child(path, "path");
		c.path = string_at(*v, p, "an absolute path or \"@name\"");
		if (auto problem = socket_path_problem(c.path); !problem.empty()) {
			if (problem.starts_with("expected "))
				expected(p, problem.substr(9), *v);
			fail(p, problem);
		}
	}
	if (auto *v = member(j, "mode"))
		c.mode = mode_at(*v, child(path, "mode"));
	if (auto *v = member(j, "admin_users"))
		c.admin_users = account_names_at(*v, child(path, "admin_users"));
	if (auto *v = member(j, "admin_groups"))
		c.admin_groups = account_names_at(*v, child(path, "admin_groups"));
	if (auto *v = member(j, "read_users"))
		c.read_users = account_names_at(*v, child(path, "read_users"));
	if (auto *v = member(j, "read_groups"))
		c.read_groups = account_names_at(*v, child(path, "read_groups"));
	if (auto *v = member(j, "max_connections"))
		c.max_connections = static_cast<unsigned>(uint_at(*v, child(path, "max_connections"), 1, 65536));
	if (auto *v = member(j, "max_connections_per_user"))
		c.max_connections_per_user =
			static_cast<unsigned>(uint_at(*v, child(path, "max_connections_per_user"), 1, 65536));
	// Operators keep a few slots, and the others keep most of them.
	c.reserved_connections = std::min(c.reserved_connections, c.max_connections / 4);
	if (auto *v = member(j, "reserved_connections"))
		c.reserved_connections =
			static_cast<unsigned>(uint_at(*v, child(path, "reserved_connections"), 0, c.max_connections - 1));
}

void parse_logging(const json &j, LoggingConfig &c)
{
	const std::string path = "logging";
	object_at(j, path);
	check_keys(j, path, {"journal"});
	if (auto *v = member(j, "journal"))
		c.journal = choice_at<JournalMode>(*v, child(path, "journal"),
		                                   {{"auto", JournalMode::Auto},
		                                    {"always", JournalMode::Always},
		                                    {"never", JournalMode::Never}});
}

void parse_shutdown(const json &j, ShutdownConfig &c)
{
	const std::string path = "shutdown";
	object_at(j, path);
	check_keys(j, path, {"timeout"});
	if (auto *v = member(j, "timeout")) {
		std::string p = child(path, "timeout");
		c.timeout = duration_at(*v, p);
		// 0 would kill every worker at once, with no drain at all: a mistake, like a 0 start_timeout.
		if (c.timeout.count() == 0)
			expected(p, "a duration above 0s, like \"90s\"", *v);
	}
}

// Fills kind, host, port and path from s.listen.
void parse_listen(SocketConfig &s, const json &j, const std::string &path)
{
	const std::string &l = s.listen;
	if (l.starts_with("unix:")) {
		s.kind = SocketKind::Unix;
		s.path = l.substr(5);
		if (auto problem = socket_path_problem(s.path); !problem.empty()) {
			if (problem.starts_with("expected "))
				fail(path, "unix socket path must be absolute or \"@name\", got " + quote(l));
			fail(path, problem);
		}
		return;
	}
	std::string_view rest = l;
	if (rest.starts_with("tcp://"))
		s.kind = SocketKind::Tcp;
	else if (rest.starts_with("udp://"))
		s.kind = SocketKind::Udp;
	else
		expected(path, "tcp://HOST:PORT, udp://HOST:PORT or unix:PATH", j);
	rest.remove_prefix(6);

	std::string_view host, port;
	bool v6 = false;
	if (rest.starts_with("[")) {
		auto close = rest.find(']');
		if (close == std::string_view::npos)
			fail(path, "missing \"]\" after the IPv6 address in " + quote(l));
		host = rest.substr(1, close - 1);
		rest.remove_prefix(close + 1);
		if (!rest.starts_with(":"))
			fail(path, "missing \":PORT\" in " + quote(l));
		port = rest.substr(1);
		v6 = true;
	} else {
		auto colon = rest.rfind(':');
		if (colon == std::string_view::npos)
			fail(path, "missing \":PORT\" in " + quote(l));
		host = rest.substr(0, colon);
		port = rest.substr(colon + 1);
	}

	unsigned char addr[sizeof(in6_addr)];
	std::string h(host);
	if (!v6 && h.find(':') != std::string::npos)
		fail(path, "an IPv6 address must be in brackets, like \"tcp://[::1]:8080\", got " + quote(l));
	if (h.find('\0') != std::string::npos || inet_pton(v6 ? AF_INET6 : AF_INET, h.c_str(), addr) != 1)
		fail(path, "HOST must be a numeric IPv4 address or a bracketed numeric IPv6 address, got " + quote(h));

	unsigned long p = 0;
	bool port_ok = !port.empty() && port.size() <= 5 &&
	               std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
	if (port_ok) {
		for (char c : port)
			p = p * 10 + static_cast<unsigned long>(c - '0');
		port_ok = p <= 65535;
	}
	if (!port_ok)
		fail(path, "PORT must be a number from 0 to 65535, got " + quote(port));
	s.host = std::move(h);
	s.port = static_cast<std::uint16_t>(p);
}

// systemd passes names in LISTEN_FDNAMES, colon-separated; it allows at most 255 printable ASCII bytes.
bool valid_fdname(std::string_view n)
{
	return !n.empty() && n.size() <= 255 &&
	       std::all_of(n.begin(), n.end(), [](char c) { return c > ' ' && c < 0x7f && c != ':'; });
}

SocketConfig parse_socket(const std::string &name, const json &j, const std::string &path)
{
	object_at(j, path);
	check_keys(j, path, {"listen", "systemd", "backlog", "reuseport", "ipv6_only", "mode"});
	SocketConfig s;
	s.name = name;
	const json *listen = member(j, "listen");
	const json *systemd = member(j, "systemd");
	if (listen && systemd)
		fail(path, "has both \"listen\" and \"systemd\"; give exactly one");
	if (!listen && !systemd)
		fail(path, "needs \"listen\" (an address to bind) or \"systemd\" (a socket name to adopt)");

	if (systemd) {
		std::string p = child(path, "systemd");
		s.kind = SocketKind::Systemd;
		s.systemd_name = string_at(*systemd, p, "a socket name from LISTEN_FDNAMES");
		if (!valid_fdname(s.systemd_name))
			expected(p, "a socket name from LISTEN_FDNAMES (1 to 255 printable characters, no \":\")", *systemd);
		if (s.systemd_name == "control")
			fail(p, "\"control\" is the name of brokerd's own control socket (brokerd.socket); give the socket unit another FileDescriptorName=");
		for (const char *opt : {"backlog", "reuseport", "ipv6_only", "mode"})
			if (member(j, opt))
				fail(child(path, opt), "does not apply to a socket adopted from systemd, which comes configured");
		return s;
	}

	std::string lp = child(path, "listen");
	s.listen = string_at(*listen, lp, "tcp://HOST:PORT, udp://HOST:PORT or unix:PATH");
	parse_listen(s, *listen, lp);
	bool ipv6 = s.host.find(':') != std::string::npos;
	bool abstract = s.kind == SocketKind::Unix && s.path.starts_with("@");

	if (auto *v = member(j, "backlog")) {
		std::string p = child(path, "backlog");
		if (s.kind == SocketKind::Udp)
			fail(p, "applies only to stream sockets (tcp and unix), not udp");
		s.backlog = static_cast<int>(uint_at(*v, p, 1, 1000000));
	}
	if (auto *v = member(j, "reuseport")) {
		std::string p = child(path, "reuseport");
		if (s.kind == SocketKind::Unix)
			fail(p, "applies only to tcp and udp sockets");
		s.reuseport = bool_at(*v, p);
	}
	if (auto *v = member(j, "ipv6_only")) {
		std::string p = child(path, "ipv6_only");
		if (!ipv6)
			fail(p, "applies only to IPv6 addresses, like \"tcp://[::]:8080\"");
		s.ipv6_only = bool_at(*v, p);
	}
	if (auto *v = member(j, "mode")) {
		std::string p = child(path, "mode");
		if (s.kind != SocketKind::Unix)
			fail(p, "applies only to unix sockets");
		if (abstract)
			fail(p, "applies only to unix sockets with a file path; abstract sockets have no file mode");
		s.mode = mode_at(*v, p);
	}
	return s;
}

void parse_metrics(const json &j, Config &cfg)
{
	const std::string path = "metrics";
	object_at(j, path);
	check_keys(j, path, {"listen", "mode", "max_connections"});
	const json *listen = member(j, "listen");
	if (!listen)
		fail(path, "needs \"listen\": tcp://HOST:PORT or unix:PATH");
	MetricsConfig m;
	m.socket.name = "metrics";
	m.socket.backlog = 64;
	std::string lp = child(path, "listen");
	m.socket.listen = string_at(*listen, lp, "tcp://HOST:PORT or unix:PATH");
	parse_listen(m.socket, *listen, lp);
	if (m.socket.kind == SocketKind::Udp)
		expected(lp, "tcp://HOST:PORT or unix:PATH (HTTP needs a stream socket)", *listen);
	if (auto *v = member(j, "mode")) {
		std::string p = child(path, "mode");
		if (m.socket.kind != SocketKind::Unix || m.socket.path.starts_with("@"))
			fail(p, "applies only to a unix socket with a file path");
		m.socket.mode = mode_at(*v, p);
	} else if (m.socket.kind == SocketKind::Unix && !m.socket.path.starts_with("@")) {
		m.socket.mode = 0666; // anyone may connect; the peer's tier is checked
	}
	if (auto *v = member(j, "max_connections"))
		m.max_connections = static_cast<unsigned>(uint_at(*v, child(path, "max_connections"), 1, 1024));
	cfg.metrics = std::move(m);
}

// One spelling per unix socket file ("/run//x" and "/run/./x" are "/run/x"); abstract names as they are.
std::string same_file_key(const std::string &path)
{
	if (path.empty() || path[0] == '@')
		return path;
	return std::filesystem::path(path).lexically_normal().string();
}

void parse_sockets(const json &j, Config &cfg)
{
	const std::string path = "sockets";
	object_at(j, path);
	for (const auto &item : j.items()) {
		std::string p = child(path, item.key());
		check_name(item.key(), p);
		// The fd store and LISTEN_FDNAMES know brokerd's own socket by that name.
		if (item.key() == "control")
			fail(p, "the name \"control\" is brokerd's control socket's; call this socket something else");
		cfg.sockets.push_back(parse_socket(item.key(), item.value(), p));
	}
	std::sort(cfg.sockets.begin(), cfg.sockets.end(),
	          [](const SocketConfig &a, const SocketConfig &b) { return a.name < b.name; });

	// Two sockets on one address: the second bind would fail at start-up, far from the cause.
	// (Or, for a unix socket, replace the first's file.)
	std::map<std::string, const SocketConfig *> seen;
	for (const SocketConfig &s : cfg.sockets) {
		std::string key;
		switch (s.kind) {
		case SocketKind::Systemd:
			key = "systemd " + s.systemd_name;
			break;
		case SocketKind::Unix:
			key = "unix " + same_file_key(s.path);
			if (key == "unix " + same_file_key(cfg.control.path))
				fail(child(child(path, s.name), "listen"), "the same path as control.path");
			break;
		case SocketKind::Tcp:
		case SocketKind::Udp:
			if (s.port == 0)
				continue;
			key = (s.kind == SocketKind::Tcp ? "tcp " : "udp ") + s.host + " " + std::to_string(s.port);
			break;
		}
		auto [it, fresh] = seen.emplace(key, &s);
		if (!fresh && !(s.reuseport && it->second->reuseport))
			fail(child(child(path, s.name), s.kind == SocketKind::Systemd ? "systemd" : "listen"),
			     (s.kind == SocketKind::Systemd ? "same systemd socket as sockets." : "same address as sockets.") +
			         it->second->name);
	}
}

// The service's sockets, by name, in fd order: each one configured, none twice.
std::vector<std::string> service_sockets(const json &v, const std::string &p, const Config &cfg)
{
	std::vector<std::string> sockets;
	if (!v.is_array())
		expected(p, "an array of socket names", v);
	if (v.size() > proto::limits::kMaxSocketsPerService)
		fail(p, "at most " + std::to_string(proto::limits::kMaxSocketsPerService) + " sockets per service");
	std::set<std::string> seen;
	for (std::size_t i = 0; i < v.size(); ++i) {
		std::string ep = element(p, i);
		const std::string &sock = string_at(v[i], ep, "a socket name");
		if (!cfg.find_socket(sock))
			fail(ep, "no socket named " + quote(sock));
		if (!seen.insert(sock).second)
			fail(ep, "socket " + quote(sock) + " is listed twice");
		sockets.push_back(sock);
	}
	return sockets;
}

void parse_drain(const json &v, const std::string &p, ServiceConfig &s)
{
	object_at(v, p);
	check_keys(v, p, {"timeout", "signal"});
	if (auto *t = member(v, "timeout"))
		s.drain_timeout = duration_at(*t, child(p, "timeout"));
	if (auto *sig = member(v, "signal")) {
		std::string sp = child(p, "signal");
		constexpr std::string_view what = "a signal name like \"SIGTERM\"";
		auto n = parse_signal(string_at(*sig, sp, what));
		if (!n)
			expected(sp, what, *sig);
		s.drain_signal = *n;
	}
}

// The options only a spawned worker has: its user, group, working directory and environment.
void parse_spawn_options(const json &j, const std::string &path, ServiceConfig &s)
{
	if (auto *v = member(j, "user")) {
		std::string p = child(path, "user");
		s.user = nonempty_text_at(*v, p, "a user name"); // resolve_accounts() looks it up
	}
	if (auto *v = member(j, "group")) {
		std::string p = child(path, "group");
		s.group = nonempty_text_at(*v, p, "a group name");
	}
	if (auto *v = member(j, "cwd")) {
		std::string p = child(path, "cwd");
		s.cwd = text_at(*v, p, "an absolute path");
		if (!s.cwd.starts_with("/"))
			expected(p, "an absolute path", *v);
	}
	if (auto *v = member(j, "env")) {
		std::string p = child(path, "env");
		if (!v->is_object())
			expected(p, "an object of strings, like {\"MODE\": \"prod\"}", *v);
		for (const auto &item : v->items()) {
			const std::string &key = item.key();
			std::string kp = child(p, key);
			if (!valid_env_name(key))
				fail(kp, "not a valid environment variable name (use A-Z a-z 0-9 _, not starting with a digit)");
			if (reserved_env_name(key))
				fail(kp, "is set by brokerd for every worker and cannot be configured");
			s.env.emplace(key, text_at(item.value(), kp));
		}
	}
}

ServiceConfig parse_service(const std::string &name, const json &j, const std::string &path, const Config &cfg)
{
	object_at(j, path);
	check_keys(j, path,
	           {"exec", "sockets", "instances", "version", "ready", "start_timeout", "drain", "upgrade", "restart",
	            "handoff", "user", "group", "cwd", "env", "register"});
	ServiceConfig s;
	s.name = name;

	const json *exec = member(j, "exec");
	if (exec) {
		std::string p = child(path, "exec");
		if (!exec->is_array() || exec->empty())
			expected(p, "a non-empty array of strings (the program and its arguments)", *exec);
		for (std::size_t i = 0; i < exec->size(); ++i)
			s.exec.push_back(nonempty_text_at((*exec)[i], element(p, i), "a non-empty string"));
	} else {
		// Only spawned workers have these: an external service's workers bring their own.
		for (const char *opt : {"user", "group", "cwd", "env", "restart"})
			if (member(j, opt))
				fail(child(path, opt), "applies only to services with \"exec\"; this one is external");
	}

	if (auto *v = member(j, "sockets"))
		s.sockets = service_sockets(*v, child(path, "sockets"), cfg);
	if (auto *v = member(j, "instances"))
		s.instances = static_cast<unsigned>(uint_at(*v, child(path, "instances"), 1, kMaxInstances));
	if (auto *v = member(j, "version"))
		s.version = text_at(*v, child(path, "version"));
	if (auto *v = member(j, "ready"))
		s.ready = choice_at<ReadyMode>(*v, child(path, "ready"),
		                               {{"broker", ReadyMode::Broker},
		                                {"notify", ReadyMode::Notify},
		                                {"exec", ReadyMode::Exec}});
	if (auto *v = member(j, "start_timeout")) {
		std::string p = child(path, "start_timeout");
		s.start_timeout = duration_at(*v, p);
		// No instance can be ready in no time; 0 is a mistake, not "no timeout".
		if (s.start_timeout.count() == 0)
			expected(p, "a duration above 0s, like \"30s\"", *v);
	}
	if (auto *v = member(j, "drain"))
		parse_drain(*v, child(path, "drain"), s);
	if (auto *v = member(j, "upgrade")) {
		std::string p = child(path, "upgrade");
		object_at(*v, p);
		check_keys(*v, p, {"batch"});
		if (auto *b = member(*v, "batch"))
			s.upgrade_batch = static_cast<unsigned>(uint_at(*b, child(p, "batch"), 1, proto::limits::kMaxBatch));
	}
	if (auto *v = member(j, "restart"))
		s.restart = choice_at<RestartPolicy>(*v, child(path, "restart"),
		                                     {{"no", RestartPolicy::No},
		                                      {"on-failure", RestartPolicy::OnFailure},
		                                      {"always", RestartPolicy::Always}});
	if (auto *v = member(j, "handoff"))
		s.handoff = choice_at<HandoffPath>(*v, child(path, "handoff"),
		                                   {{"direct", HandoffPath::Direct}, {"broker", HandoffPath::Broker}});
	parse_spawn_options(j, path, s);
	if (auto *v = member(j, "register")) {
		std::string p = child(path, "register");
		if (exec)
			fail(p, "applies only to external services (without \"exec\"); spawned workers need no registration");
		object_at(*v, p);
		check_keys(*v, p, {"users", "groups"});
		if (auto *u = member(*v, "users"))
			s.register_users = account_names_at(*u, child(p, "users"));
		if (auto *g = member(*v, "groups"))
			s.register_groups = account_names_at(*g, child(p, "groups"));
	}
	return s;
}

void parse_services(const json &j, Config &cfg)
{
	const std::string path = "services";
	object_at(j, path);
	for (const auto &item : j.items()) {
		std::string p = child(path, item.key());
		check_name(item.key(), p);
		cfg.services.push_back(parse_service(item.key(), item.value(), p, cfg));
	}
	std::sort(cfg.services.begin(), cfg.services.end(),
	          [](const ServiceConfig &a, const ServiceConfig &b) { return a.name < b.name; });
}

} // namespace

const SocketConfig *Config::find_socket(std::string_view name) const
{
	auto it = std::lower_bound(sockets.begin(), sockets.end(), name,
	                           [](const SocketConfig &s, std::string_view n) { return s.name < n; });
	return it != sockets.end() && it->name == name ? &*it : nullptr;
}

const ServiceConfig *Config::find_service(std::string_view name) const
{
	auto it = std::lower_bound(services.begin(), services.end(), name,
	                           [](const ServiceConfig &s, std::string_view n) { return s.name < n; });
	return it != services.end() && it->name == name ? &*it : nullptr;
}

Config parse(std::string_view text, const Resolver &resolver)
{
	json root = parse_json(text);
	object_at(root, "");
	check_keys(root, "", {"control", "shutdown", "logging", "sockets", "services", "metrics"});
	Config cfg;
	cfg.control.path = BROKER_DEFAULT_CONTROL;
	if (auto *v = member(root, "control"))
		parse_control(*v, cfg.control);
	if (auto *v = member(root, "shutdown"))
		parse_shutdown(*v, cfg.shutdown);
	if (auto *v = member(root, "logging"))
		parse_logging(*v, cfg.logging);
	// Sockets before services: services refer to sockets by name.
	if (auto *v = member(root, "sockets"))
		parse_sockets(*v, cfg);
	if (auto *v = member(root, "services"))
		parse_services(*v, cfg);
	if (auto *v = member(root, "metrics"))
		parse_metrics(*v, cfg);
	resolve_accounts(cfg, resolver);
	return cfg;
}

const char *ready_name(ReadyMode mode)
{
	return mode == ReadyMode::Broker ? "broker" : mode == ReadyMode::Notify ? "notify" : "exec";
}

const char *restart_name(RestartPolicy policy)
{
	return policy == RestartPolicy::No ? "no" : policy == RestartPolicy::Always ? "always" : "on-failure";
}

const char *handoff_name(HandoffPath path)
{
	return path == HandoffPath::Broker ? "broker" : "direct";
}

std::optional<HandoffPath> parse_handoff(std::string_view name)
{
	for (HandoffPath p : {HandoffPath::Direct, HandoffPath::Broker})
		if (name == handoff_name(p))
			return p;
	return std::nullopt;
}

std::optional<ReadyMode> parse_ready(std::string_view name)
{
	for (ReadyMode m : {ReadyMode::Broker, ReadyMode::Notify, ReadyMode::Exec})
		if (name == ready_name(m))
			return m;
	return std::nullopt;
}

std::optional<RestartPolicy> parse_restart(std::string_view name)
{
	for (RestartPolicy p : {RestartPolicy::No, RestartPolicy::OnFailure, RestartPolicy::Always})
		if (name == restart_name(p))
			return p;
	return std::nullopt;
}

Config load(const std::string &path, const Resolver &resolver)
{
	std::string text;
	return load(path, text, resolver);
}

Config load(const std::string &path, std::string &text, const Resolver &resolver)
{
	text.clear();
	{
		proto::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
		if (!fd)
			throw ConfigError("cannot read " + path + ": " + std::generic_category().message(errno));
		char buf[65536];
		for (;;) {
			ssize_t n = ::read(fd.get(), buf, sizeof buf);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				throw ConfigError("cannot read " + path + ": " + std::generic_category().message(errno));
			if (n == 0)
				break;
			if (text.size() + static_cast<std::size_t>(n) > kMaxConfigFile)
				throw ConfigError(path + ": larger than " + std::to_string(kMaxConfigFile >> 20) + " MiB");
			text.append(buf, static_cast<std::size_t>(n));
		}
	}
	try {
		return parse(text, resolver);
	} catch (const ConfigError &e) {
		throw ConfigError(path + ": " + e.what());
	}
}

bool valid_env_name(std::string_view k)
{
	if (k.empty() || (k[0] >= '0' && k[0] <= '9'))
		return false;
	return std::all_of(k.begin(), k.end(), [](char c) {
		return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
	});
}

bool reserved_env_name(std::string_view name)
{
	// Every LISTEN_*, not only the three sd_listen_fds reads: systemd has grown more of them
	// (LISTEN_FDNAMES came later), and a worker may read one brokerd does not set.
	return name.starts_with("LISTEN_") || name == "NOTIFY_SOCKET" || name.starts_with("BROKER_");
}

} // namespace brokerd::config
