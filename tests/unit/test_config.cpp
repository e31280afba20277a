// Unit tests for brokerd.json: every validation rule and its message, good configs field by field, signals.
#include "config/config.hpp"

#include "broker_config.h"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>

using namespace brokerd::config;
using namespace std::chrono_literals;

namespace {

// Two sockets that the service rows below can refer to.
std::string with_service(const std::string &service)
{
	return R"({"sockets": {"http": {"listen": "tcp://0.0.0.0:8080"}, "api": {"listen": "unix:/run/app/api.sock"}},
	           "services": {"web": )" +
	       service + "}}";
}

std::string with_socket(const std::string &socket)
{
	return R"({"sockets": {"http": )" + socket + "}}";
}

std::string error_of(const std::string &text)
{
	try {
		parse(text);
	} catch (const ConfigError &e) {
		return e.what();
	}
	return "(no error)";
}

enum class Match { Exact, Contains };

struct BadCase {
	std::string text;
	std::string message;
	Match match = Match::Exact;
};

// The config of `c` is refused with its message.
void check_refused(const BadCase &c)
{
	CAPTURE(c.text);
	std::string message = error_of(c.text);
	if (c.match == Match::Exact)
		CHECK(message == c.message);
	else
		CHECK_MESSAGE(message.find(c.message) != std::string::npos, message);
}

} // namespace

TEST_CASE("bad configs name the key path and the problem")
{
	const BadCase cases[] = {
		// JSON syntax and structure.
		{"{\n  \"control\": ,\n}", "invalid JSON at line 2, column 14: ", Match::Contains},
		{"", "invalid JSON at line 1, column 1: ", Match::Contains},
		{"{\"sockets\": {} /* unterminated", "invalid JSON at line 1, column ", Match::Contains},
		{"[]", "top level: expected an object, got []"},
		{R"({"servics": {}})", "servics: unknown key (did you mean \"services\"?)"},
		{R"({"sockets": {}, "sockets": {}})", "sockets: duplicate key"},
		{R"({"services": {"web": {"instances": 1, "instances": 2}}})", "services.web.instances: duplicate key"},
		{R"({"services": {"web": {"exec": ["/bin/a"], "env": {"A": "1", "A": "2"}}}})",
		 "services.web.env.A: duplicate key"},
		// control
		{R"({"control": []})", "control: expected an object, got []"},
		{R"({"sockets": {"control": {"listen": "tcp://127.0.0.1:80"}}})",
		 "sockets.control: the name \"control\" is brokerd's control socket's; call this socket something else"},
		{R"({"sockets": {"ctl": {"systemd": "control"}}})",
		 "sockets.ctl.systemd: \"control\" is the name of brokerd's own control socket (brokerd.socket); give the "
		 "socket unit another FileDescriptorName="},
		{R"({"control": {"path": "run/control.sock"}})",
		 "control.path: expected an absolute path or \"@name\", got \"run/control.sock\""},
		{R"({"control": {"path": "/)" + std::string(120, 'x') + R"("}})",
		 "control.path: socket path longer than 107 bytes"},
		{R"({"control": {"mode": 432}})",
		 "control.mode: expected an octal mode from \"0000\" to \"0777\", like \"0660\", got 432"},
		{R"({"control": {"mode": "0866"}})", "control.mode: expected an octal mode", Match::Contains},
		{R"({"control": {"mode": "1777"}})", "control.mode: expected an octal mode", Match::Contains},
		{R"({"control": {"admin_users": "root"}})", "control.admin_users: expected an array of names, got \"root\""},
		{R"({"control": {"admin_groups": ["wheel", ""]}})",
		 "control.admin_groups[1]: expected a user or group name, got \"\""},
		{R"({"control": {"read_users": ["a b"]}})", "control.read_users[0]: expected a user or group name, got \"a b\""},
		{R"({"control": {"read_groups": [1]}})", "control.read_groups[0]: expected a user or group name, got 1"},
		{R"({"control": {"max_connections": 0}})",
		 "control.max_connections: expected an integer from 1 to 65536, got 0"},
		{R"({"control": {"max_connections": 65537}})",
		 "control.max_connections: expected an integer from 1 to 65536, got 65537"},
		{R"({"control": {"max_connections_per_user": 0}})",
		 "control.max_connections_per_user: expected an integer from 1 to 65536, got 0"},
		{R"({"control": {"max_connections": 40, "reserved_connections": 40}})",
		 "control.reserved_connections: expected an integer from 0 to 39, got 40"},
		{R"({"control": {"reserved_connections": -1}})",
		 "control.reserved_connections: expected an integer from 0 to 511, got -1"},
		{R"({"control": {"max_conections": 10}})",
		 "control.max_conections: unknown key (did you mean \"max_connections\"?)"},
		// shutdown
		{R"({"shutdown": "90s"})", "shutdown: expected an object, got \"90s\""},
		{R"({"shutdown": {"timeout": 90}})", "shutdown.timeout: expected a duration like \"30s\", got 90"},
		{R"({"shutdown": {"timeout": "0s"}})",
		 "shutdown.timeout: expected a duration above 0s, like \"90s\", got \"0s\""},
		{R"({"shutdown": {"timout": "1s"}})", "shutdown.timout: unknown key (did you mean \"timeout\"?)"},
		{R"({"shutdwon": {}})", "shutdwon: unknown key (did you mean \"shutdown\"?)"},
		// logging
		{R"({"logging": {"journal": "yes"}})",
		 "logging.journal: expected \"auto\", \"always\" or \"never\", got \"yes\""},
		{R"({"logging": {"jornal": "auto"}})", "logging.jornal: unknown key (did you mean \"journal\"?)"},
		// sockets: names and forms
		{R"({"sockets": {"we b": {"listen": "tcp://0.0.0.0:1"}}})",
		 "sockets[\"we b\"]: invalid name: use 1 to 64 characters of A-Z a-z 0-9 _ . -"},
		{R"({"sockets": {")" + std::string(65, 'a') + R"(": {"listen": "tcp://0.0.0.0:1"}}})",
		 "sockets." + std::string(65, 'a') + ": invalid name", Match::Contains},
		{with_socket(R"({})"), "sockets.http: needs \"listen\" (an address to bind) or \"systemd\" (a socket name to adopt)"},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "systemd": "http"})"),
		 "sockets.http: has both \"listen\" and \"systemd\"; give exactly one"},
		{with_socket(R"({"listen": "http://x"})"),
		 "sockets.http.listen: expected tcp://HOST:PORT, udp://HOST:PORT or unix:PATH, got \"http://x\""},
		{with_socket(R"({"listen": 8080})"),
		 "sockets.http.listen: expected tcp://HOST:PORT, udp://HOST:PORT or unix:PATH, got 8080"},
		{with_socket(R"({"listen": "tcp://localhost:80"})"),
		 "sockets.http.listen: HOST must be a numeric IPv4 address or a bracketed numeric IPv6 address, got \"localhost\""},
		{with_socket(R"({"listen": "tcp://::1:80"})"),
		 "sockets.http.listen: an IPv6 address must be in brackets, like \"tcp://[::1]:8080\", got \"tcp://::1:80\""},
		{with_socket(R"({"listen": "tcp://[::1]80"})"), "sockets.http.listen: missing \":PORT\" in \"tcp://[::1]80\""},
		{with_socket(R"({"listen": "tcp://[::1:80"})"), "sockets.http.listen: missing \"]\"", Match::Contains},
		{with_socket(R"({"listen": "tcp://[1.2.3.4]:80"})"), "sockets.http.listen: HOST must be", Match::Contains},
		{with_socket(R"({"listen": "udp://10.0.0.1"})"), "sockets.http.listen: missing \":PORT\" in \"udp://10.0.0.1\""},
		{with_socket(R"({"listen": "tcp://1.2.3.4:65536"})"),
		 "sockets.http.listen: PORT must be a number from 0 to 65535, got \"65536\""},
		{with_socket(R"({"listen": "tcp://1.2.3.4:"})"), "sockets.http.listen: PORT must be a number from 0 to 65535, got \"\""},
		{with_socket(R"({"listen": "tcp://1.2.3.4:-1"})"), "sockets.http.listen: PORT must be", Match::Contains},
		{with_socket(R"({"listen": "unix:run/x.sock"})"),
		 "sockets.http.listen: unix socket path must be absolute or \"@name\", got \"unix:run/x.sock\""},
		{with_socket(R"({"listen": "unix:@"})"), "sockets.http.listen: unix socket path must be absolute", Match::Contains},
		{with_socket(R"({"listen": "unix:/)" + std::string(107, 'x') + R"("})"),
		 "sockets.http.listen: socket path longer than 107 bytes"},
		{with_socket(R"({"systemd": ""})"),
		 "sockets.http.systemd: expected a socket name from LISTEN_FDNAMES (1 to 255 printable characters, no \":\"), got \"\""},
		{with_socket(R"({"systemd": "a:b"})"), "sockets.http.systemd: expected a socket name", Match::Contains},
		{R"({"sockets": {"a": {"listen": "tcp://0.0.0.0:80"}, "b": {"listen": "tcp://0.0.0.0:80"}}})",
		 "sockets.b.listen: same address as sockets.a"},
		{R"({"sockets": {"a": {"listen": "unix:/run/x"}, "b": {"listen": "unix:/run/x"}}})",
		 "sockets.b.listen: same address as sockets.a"},
		{R"({"sockets": {"a": {"listen": "unix:/run/x"}, "b": {"listen": "unix:/run//./x"}}})",
		 "sockets.b.listen: same address as sockets.a"},
		{R"({"sockets": {"a": {"systemd": "web"}, "b": {"systemd": "web"}}})",
		 "sockets.b.systemd: same systemd socket as sockets.a"},
		{R"({"control": {"path": "/run/b/control.sock"}, "sockets": {"a": {"listen": "unix:/run/b//control.sock"}}})",
		 "sockets.a.listen: the same path as control.path"},
		{std::string(100, '[') + std::string(100, ']'), "invalid JSON: nested more than 64 levels deep"},
		// sockets: options that do not apply
		{with_socket(R"({"listen": "udp://0.0.0.0:53", "backlog": 10})"),
		 "sockets.http.backlog: applies only to stream sockets (tcp and unix), not udp"},
		{with_socket(R"({"systemd": "web", "backlog": 10})"),
		 "sockets.http.backlog: does not apply to a socket adopted from systemd, which comes configured"},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "backlog": 0})"),
		 "sockets.http.backlog: expected an integer from 1 to 1000000, got 0"},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "backlog": 1000001})"),
		 "sockets.http.backlog: expected an integer from 1 to 1000000, got 1000001"},
		{with_socket(R"({"listen": "unix:/run/x", "reuseport": true})"),
		 "sockets.http.reuseport: applies only to tcp and udp sockets"},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "reuseport": "yes"})"),
		 "sockets.http.reuseport: expected true or false, got \"yes\""},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "ipv6_only": true})"),
		 "sockets.http.ipv6_only: applies only to IPv6 addresses, like \"tcp://[::]:8080\""},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "mode": "0660"})"),
		 "sockets.http.mode: applies only to unix sockets"},
		{with_socket(R"({"listen": "unix:@app", "mode": "0660"})"),
		 "sockets.http.mode: applies only to unix sockets with a file path; abstract sockets have no file mode"},
		{with_socket(R"({"listen": "tcp://0.0.0.0:80", "bakclog": 1})"),
		 "sockets.http.bakclog: unknown key (did you mean \"backlog\"?)"},
		// services
		{R"({"services": {"web/1": {}}})", "services[\"web/1\"]: invalid name", Match::Contains},
		{R"({"services": []})", "services: expected an object, got []"},
		{with_service(R"({"exec": "/bin/app"})"),
		 "services.web.exec: expected a non-empty array of strings (the program and its arguments), got \"/bin/app\""},
		{with_service(R"({"exec": []})"), "services.web.exec: expected a non-empty array", Match::Contains},
		{with_service(R"({"exec": ["/bin/app", ""]})"), "services.web.exec[1]: expected a non-empty string, got \"\""},
		{with_service(R"({"exec": ["/bin/app\u0000x"]})"), "services.web.exec[0]: must not contain a NUL byte"},
		{with_service(R"({"exec": ["/bin/app"], "version": "1\u00002"})"), "services.web.version: must not contain a NUL byte"},
		{with_service(R"({"exec": ["/bin/app"], "foo": 1})"), "services.web.foo: unknown key"},
		{with_service(R"({"exec": ["/bin/app"], "instance": 2})"),
		 "services.web.instance: unknown key (did you mean \"instances\"?)"},
		{with_service(R"({"sockets": ["http", "htp"]})"), "services.web.sockets[1]: no socket named \"htp\""},
		{with_service(R"({"sockets": ["http", "api", "http"]})"),
		 "services.web.sockets[2]: socket \"http\" is listed twice"},
		{with_service(R"({"sockets": "http"})"), "services.web.sockets: expected an array of socket names, got \"http\""},
		{with_service(R"({"sockets": [)" + [] {
			 std::string many;
			 for (int i = 0; i < 254; ++i)
				 many += std::string(i ? "," : "") + "\"http\"";
			 return many;
		 }() + "]}"),
		 "services.web.sockets: at most 253 sockets per service"},
		{with_service(R"({"instances": 0})"), "services.web.instances: expected an integer from 1 to 1024, got 0"},
		{with_service(R"({"instances": 1025})"), "services.web.instances: expected an integer from 1 to 1024, got 1025"},
		{with_service(R"({"instances": 2.5})"), "services.web.instances: expected an integer from 1 to 1024, got 2.5"},
		{with_service(R"({"instances": -1})"), "services.web.instances: expected an integer from 1 to 1024, got -1"},
		{with_service(R"({"instances": "2"})"), "services.web.instances: expected an integer from 1 to 1024, got \"2\""},
		{with_service(R"({"version": 2})"), "services.web.version: expected a string, got 2"},
		{with_service(R"({"ready": "yes"})"),
		 "services.web.ready: expected \"broker\", \"notify\" or \"exec\", got \"yes\""},
		{with_service(R"({"start_timeout": 30})"), "services.web.start_timeout: expected a duration like \"30s\", got 30"},
		{with_service(R"({"start_timeout": "0s"})"),
		 "services.web.start_timeout: expected a duration above 0s, like \"30s\", got \"0s\""},
		{with_service(R"({"drain": {"timeout": "soon"}})"),
		 "services.web.drain.timeout: expected a duration like \"30s\", got \"soon\""},
		{with_service(R"({"drain": {"signal": "SIGFOO"}})"),
		 "services.web.drain.signal: expected a signal name like \"SIGTERM\", got \"SIGFOO\""},
		{with_service(R"({"drain": {"signal": 15}})"),
		 "services.web.drain.signal: expected a signal name like \"SIGTERM\", got 15"},
		{with_service(R"({"drain": {"timeout": "1s", "grace": "1s"}})"), "services.web.drain.grace: unknown key"},
		{with_service(R"({"drain": "30s"})"), "services.web.drain: expected an object, got \"30s\""},
		{with_service(R"({"upgrade": {"batch": 0}})"), "services.web.upgrade.batch: expected an integer from 1 to 1024, got 0"},
		{with_service(R"({"upgrade": {"batch": 1025}})"),
		 "services.web.upgrade.batch: expected an integer from 1 to 1024, got 1025"},
		{with_service(R"({"upgrade": {"bach": 2}})"), "services.web.upgrade.bach: unknown key (did you mean \"batch\"?)"},
		{with_service(R"({"exec": ["/bin/app"], "restart": "never"})"),
		 "services.web.restart: expected \"no\", \"on-failure\" or \"always\", got \"never\""},
		{with_service(R"({"exec": ["/bin/app"], "user": "no-such-user-brokerd-test"})"),
		 "services.web.user: no such user \"no-such-user-brokerd-test\""},
		{with_service(R"({"exec": ["/bin/app"], "user": ""})"), "services.web.user: expected a user name, got \"\""},
		{with_service(R"({"exec": ["/bin/app"], "group": "no-such-group-brokerd-test"})"),
		 "services.web.group: no such group \"no-such-group-brokerd-test\""},
		{with_service(R"({"exec": ["/bin/app"], "cwd": "srv"})"), "services.web.cwd: expected an absolute path, got \"srv\""},
		{with_service(R"({"exec": ["/bin/app"], "env": ["A=1"]})"),
		 "services.web.env: expected an object of strings, like {\"MODE\": \"prod\"}, got an array"},
		{with_service(R"({"exec": ["/bin/app"], "env": {"MODE": 1}})"), "services.web.env.MODE: expected a string, got 1"},
		{with_service(R"({"exec": ["/bin/app"], "env": {"1MODE": "x"}})"),
		 "services.web.env.1MODE: not a valid environment variable name (use A-Z a-z 0-9 _, not starting with a digit)"},
		{with_service(R"({"exec": ["/bin/app"], "env": {"A=B": "x"}})"),
		 "services.web.env[\"A=B\"]: not a valid environment variable name", Match::Contains},
		{with_service(R"({"exec": ["/bin/app"], "env": {"LISTEN_FDS": "3"}})"),
		 "services.web.env.LISTEN_FDS: is set by brokerd for every worker and cannot be configured"},
		{with_service(R"({"exec": ["/bin/app"], "env": {"LISTEN_PID": "3"}})"),
		 "services.web.env.LISTEN_PID: is set by brokerd", Match::Contains},
		{with_service(R"({"exec": ["/bin/app"], "env": {"LISTEN_FDNAMES": "a"}})"),
		 "services.web.env.LISTEN_FDNAMES: is set by brokerd", Match::Contains},
		{with_service(R"({"exec": ["/bin/app"], "env": {"LISTEN_FDSTORE": "1"}})"),
		 "services.web.env.LISTEN_FDSTORE: is set by brokerd", Match::Contains},
		{with_service(R"({"exec": ["/bin/app"], "env": {"NOTIFY_SOCKET": "/x"}})"),
		 "services.web.env.NOTIFY_SOCKET: is set by brokerd", Match::Contains},
		{with_service(R"({"exec": ["/bin/app"], "env": {"BROKER_TOKEN": "x"}})"),
		 "services.web.env.BROKER_TOKEN: is set by brokerd", Match::Contains},
		{with_service(R"({"exec": ["/bin/app"], "register": {"users": ["root"]}})"),
		 "services.web.register: applies only to external services (without \"exec\"); spawned workers need no registration"},
		{with_service(R"({"register": {"user": ["root"]}})"),
		 "services.web.register.user: unknown key (did you mean \"users\"?)"},
		{with_service(R"({"register": {"groups": "root"}})"),
		 "services.web.register.groups: expected an array of names, got \"root\""},
		{with_service(R"({"user": "root"})"),
		 "services.web.user: applies only to services with \"exec\"; this one is external"},
		{with_service(R"({"env": {"A": "1"}})"), "services.web.env: applies only to services with \"exec\"", Match::Contains},
	};
	static_assert(std::size(cases) >= 30);
	for (const BadCase &c : cases)
		check_refused(c);
}

TEST_CASE("the DESIGN.md example parses field by field")
{
	Config cfg = parse(R"jsonc({
  "control": { "path": "/run/brokerd/control.sock", "mode": "0660", "admin_groups": ["brokerd"] },
  "sockets": {
    "http": { "listen": "tcp://0.0.0.0:8080", "backlog": 4096 },
    "dns":  { "listen": "udp://[::]:5353" },
    "api":  { "listen": "unix:/run/app/api.sock", "mode": "0660" },
    "web":  { "systemd": "web" }            // adopt the socket named "web" from LISTEN_FDNAMES
  },
  "services": {
    "app": {
      "exec": ["/usr/bin/app-server", "--flag"], "sockets": ["http", "api"],
      "instances": 2, "ready": "broker", "start_timeout": "30s",
      "drain": { "timeout": "60s", "signal": "SIGTERM" }, "upgrade": { "batch": 1 },
      "restart": "on-failure", "user": "nobody", "group": "nogroup", "env": { "MODE": "prod" }
    }
  }
})jsonc");

	CHECK(cfg.control.path == "/run/brokerd/control.sock");
	CHECK(cfg.control.mode == 0660);
	CHECK(cfg.control.admin_groups == std::vector<std::string>{"brokerd"});
	CHECK(cfg.control.admin_users.empty());
	CHECK(cfg.control.max_connections == 512);
	CHECK(cfg.control.max_connections_per_user == 128);
	CHECK(cfg.control.reserved_connections == 16);

	REQUIRE(cfg.sockets.size() == 4);
	CHECK(cfg.sockets[0].name == "api");
	CHECK(cfg.sockets[1].name == "dns");
	CHECK(cfg.sockets[2].name == "http");
	CHECK(cfg.sockets[3].name == "web");

	const SocketConfig *http = cfg.find_socket("http");
	REQUIRE(http);
	CHECK(http->kind == SocketKind::Tcp);
	CHECK(http->listen == "tcp://0.0.0.0:8080");
	CHECK(http->host == "0.0.0.0");
	CHECK(http->port == 8080);
	CHECK(http->backlog == 4096);
	CHECK_FALSE(http->reuseport);
	CHECK_FALSE(http->ipv6_only.has_value());
	CHECK_FALSE(http->mode.has_value());

	const SocketConfig *dns = cfg.find_socket("dns");
	REQUIRE(dns);
	CHECK(dns->kind == SocketKind::Udp);
	CHECK(dns->host == "::");
	CHECK(dns->port == 5353);

	const SocketConfig *api = cfg.find_socket("api");
	REQUIRE(api);
	CHECK(api->kind == SocketKind::Unix);
	CHECK(api->path == "/run/app/api.sock");
	CHECK(api->mode == std::optional<mode_t>(0660));

	const SocketConfig *web = cfg.find_socket("web");
	REQUIRE(web);
	CHECK(web->kind == SocketKind::Systemd);
	CHECK(web->systemd_name == "web");
	CHECK(web->listen.empty());

	CHECK(cfg.find_socket("nope") == nullptr);
	CHECK(cfg.find_service("nope") == nullptr);

	REQUIRE(cfg.services.size() == 1);
	const ServiceConfig *app = cfg.find_service("app");
	REQUIRE(app);
	CHECK(app->name == "app");
	CHECK(app->exec == std::vector<std::string>{"/usr/bin/app-server", "--flag"});
	CHECK(app->sockets == std::vector<std::string>{"http", "api"});
	CHECK(app->instances == 2);
	CHECK(app->ready == ReadyMode::Broker);
	CHECK(app->start_timeout == 30s);
	CHECK(app->drain_timeout == 60s);
	CHECK(app->drain_signal == SIGTERM);
	CHECK(app->upgrade_batch == 1);
	CHECK(app->restart == RestartPolicy::OnFailure);
	CHECK(app->user == "nobody");
	CHECK(app->group == "nogroup");
	CHECK(app->env == std::map<std::string, std::string>{{"MODE", "prod"}});
	CHECK(app->register_users.empty());
}

TEST_CASE("defaults")
{
	Config cfg = parse("{}");
	CHECK(cfg.control.path == BROKER_DEFAULT_CONTROL);
	CHECK(cfg.control.mode == 0666);
	CHECK(cfg.control.max_connections_per_user == 128);
	CHECK(cfg.control.reserved_connections == 16);
	CHECK(cfg.control.max_connections == 512);
	CHECK(cfg.shutdown.timeout == 90s);
	CHECK(cfg.logging.journal == JournalMode::Auto);
	CHECK(parse(R"({"logging": {"journal": "never"}})").logging.journal == JournalMode::Never);
	CHECK(parse(R"({"logging": {"journal": "always"}})").logging.journal == JournalMode::Always);
	CHECK(cfg.sockets.empty());
	CHECK(cfg.services.empty());
	// Operators keep at most a quarter of a small number of connections unless told otherwise.
	CHECK(parse(R"({"control": {"max_connections": 10}})").control.reserved_connections == 2);
	CHECK(parse(R"({"control": {"max_connections": 3}})").control.reserved_connections == 0);

	cfg = parse(R"({"sockets": {"s": {"listen": "tcp://127.0.0.1:0"}}, "services": {"x": {"exec": ["/bin/true"]}}})");
	const SocketConfig &s = cfg.sockets.at(0);
	CHECK(s.port == 0);
	CHECK(s.backlog == 4096);
	CHECK_FALSE(s.reuseport);
	const ServiceConfig &x = cfg.services.at(0);
	CHECK(x.sockets.empty());
	CHECK(x.instances == 1);
	CHECK(x.version.empty());
	CHECK(x.ready == ReadyMode::Exec);
	CHECK(x.start_timeout == 30s);
	CHECK(x.drain_timeout == 30s);
	CHECK(x.drain_signal == SIGTERM);
	CHECK(x.upgrade_batch == 1);
	CHECK(x.restart == RestartPolicy::OnFailure);
	CHECK(x.user.empty());
	CHECK(x.group.empty());
	CHECK(x.cwd.empty());
	CHECK(x.env.empty());
}

TEST_CASE("every other key, with comments, parses field by field")
{
	Config cfg = parse(R"jsonc(
	/* A block comment before the document. */
	{
		"control": {
			"path": "@brokerd-test", "mode": "0600", "max_connections": 65536,
			"max_connections_per_user": 3, "reserved_connections": 0,
			"admin_users": ["root"], "read_users": ["nobody", "root"], "read_groups": ["nogroup"]
		},
		"shutdown": { "timeout": "2m30s" },
		"sockets": {
			"v6": { "listen": "tcp://[::1]:9090", "ipv6_only": true, "reuseport": true, "backlog": 1 },
			"u6": { "listen": "udp://[fe80::1]:0", "ipv6_only": false },
			"abs": { "listen": "unix:@app.sock", "backlog": 1000000 },
			"udp-4.x_y": { "listen": "udp://127.0.0.1:65535", "reuseport": false }
		},
		"services": {
			"z": { "exec": ["/bin/sh", "-c", "exec worker"], "sockets": ["v6", "abs"], "instances": 1024,
			       "version": "v1.2.3", "ready": "notify", "start_timeout": "1m30s",
			       "drain": { "timeout": "0s", "signal": "HUP" }, "upgrade": { "batch": 3 },
			       "restart": "always", "user": "root", "group": "root", "cwd": "/srv/z",
			       "env": { "A": "1", "_b2": "", "PATH": "/usr/bin" } },
			"ext": { "sockets": ["udp-4.x_y"], "ready": "broker",
			         "register": { "users": ["nobody"], "groups": ["nogroup", "root"] } },
			"n": { "exec": ["w"], "restart": "no", "drain": { "signal": "9" }, "ready": "exec" }
		}
	} // and a line comment after it
	)jsonc");

	CHECK(cfg.control.path == "@brokerd-test");
	CHECK(cfg.control.max_connections_per_user == 3);
	CHECK(cfg.control.reserved_connections == 0);
	CHECK(cfg.control.mode == 0600);
	CHECK(cfg.control.max_connections == 65536);
	CHECK(cfg.shutdown.timeout == 150s);
	CHECK(cfg.control.admin_users == std::vector<std::string>{"root"});
	CHECK(cfg.control.read_users == std::vector<std::string>{"nobody", "root"});
	CHECK(cfg.control.read_groups == std::vector<std::string>{"nogroup"});

	REQUIRE(cfg.sockets.size() == 4);
	CHECK(cfg.sockets[0].name == "abs");
	CHECK(cfg.sockets[1].name == "u6");
	CHECK(cfg.sockets[2].name == "udp-4.x_y");
	CHECK(cfg.sockets[3].name == "v6");

	const SocketConfig &v6 = *cfg.find_socket("v6");
	CHECK(v6.kind == SocketKind::Tcp);
	CHECK(v6.host == "::1");
	CHECK(v6.port == 9090);
	CHECK(v6.ipv6_only == std::optional<bool>(true));
	CHECK(v6.reuseport);
	CHECK(v6.backlog == 1);

	const SocketConfig &u6 = *cfg.find_socket("u6");
	CHECK(u6.kind == SocketKind::Udp);
	CHECK(u6.host == "fe80::1");
	CHECK(u6.port == 0);
	CHECK(u6.ipv6_only == std::optional<bool>(false));

	const SocketConfig &abs = *cfg.find_socket("abs");
	CHECK(abs.kind == SocketKind::Unix);
	CHECK(abs.path == "@app.sock");
	CHECK(abs.backlog == 1000000);
	CHECK_FALSE(abs.mode.has_value());

	const SocketConfig &u4 = *cfg.find_socket("udp-4.x_y");
	CHECK(u4.kind == SocketKind::Udp);
	CHECK(u4.host == "127.0.0.1");
	CHECK(u4.port == 65535);

	REQUIRE(cfg.services.size() == 3);
	CHECK(cfg.services[0].name == "ext");
	CHECK(cfg.services[1].name == "n");
	CHECK(cfg.services[2].name == "z");

	const ServiceConfig &z = *cfg.find_service("z");
	CHECK(z.exec == std::vector<std::string>{"/bin/sh", "-c", "exec worker"});
	CHECK(z.sockets == std::vector<std::string>{"v6", "abs"});
	CHECK(z.instances == 1024);
	CHECK(z.version == "v1.2.3");
	CHECK(z.ready == ReadyMode::Notify);
	CHECK(z.start_timeout == 90s);
	CHECK(z.drain_timeout == 0s);
	CHECK(z.drain_signal == SIGHUP);
	CHECK(z.upgrade_batch == 3);
	CHECK(z.restart == RestartPolicy::Always);
	CHECK(z.user == "root");
	CHECK(z.group == "root");
	CHECK(z.cwd == "/srv/z");
	CHECK(z.env == std::map<std::string, std::string>{{"A", "1"}, {"PATH", "/usr/bin"}, {"_b2", ""}});

	const ServiceConfig &ext = *cfg.find_service("ext");
	CHECK(ext.exec.empty());
	CHECK(ext.sockets == std::vector<std::string>{"udp-4.x_y"});
	CHECK(ext.ready == ReadyMode::Broker);
	CHECK(ext.register_users == std::vector<std::string>{"nobody"});
	CHECK(ext.register_groups == std::vector<std::string>{"nogroup", "root"});

	const ServiceConfig &n = *cfg.find_service("n");
	CHECK(n.restart == RestartPolicy::No);
	CHECK(n.drain_signal == SIGKILL);
	CHECK(n.ready == ReadyMode::Exec);
}

TEST_CASE("two reuseport sockets may share an address")
{
	Config cfg = parse(R"({"sockets": {
		"a": {"listen": "tcp://0.0.0.0:80", "reuseport": true},
		"b": {"listen": "tcp://0.0.0.0:80", "reuseport": true},
		"c": {"listen": "udp://0.0.0.0:80"},
		"d": {"listen": "tcp://0.0.0.0:0"},
		"e": {"listen": "tcp://0.0.0.0:0"}}})");
	CHECK(cfg.sockets.size() == 5);
}

TEST_CASE("nesting is counted as the parser sees it, comments and all")
{
	// A quote inside a comment once hid the brackets after it from a separate text scan, so the
	// parser went 20000 levels deep and the duplicate-key check held a path for each: gigabytes.
	std::string deep = std::string(20000, '[') + std::string(20000, ']');
	struct Case {
		std::string text;
	};
	const Case hidden[] = {
		{"/*\"*/" + deep},
		{"//\"\n" + deep},
		{R"({"services": /* " */ {"web": )" + deep + "}}"},
		{R"({"a": "\"" /* " */, "b": )" + deep + "}"},
	};
	for (const Case &c : hidden) {
		CAPTURE(c.text.substr(0, 40));
		rusage before{}, after{};
		getrusage(RUSAGE_SELF, &before);
		CHECK(error_of(c.text) == "invalid JSON: nested more than 64 levels deep");
		getrusage(RUSAGE_SELF, &after);
		// ru_maxrss is in KiB: the refusal costs next to nothing, where the whole parse cost 600 MB.
		CHECK(after.ru_maxrss - before.ru_maxrss < 32 * 1024);
	}

	// Brackets inside comments and strings are no nesting at all.
	std::string commented = "/* " + std::string(100, '[') + " */ // " + std::string(100, '{') + "\n" +
	                        R"({"sockets": {"http": {"listen": "unix:/run/)" + std::string(90, '[') + R"("}}})";
	CHECK(parse(commented).sockets.size() == 1);

	// Exactly the limit parses; one more level is refused.
	CHECK(error_of(std::string(64, '[') + std::string(64, ']')) == "top level: expected an object, got an array");
	CHECK(error_of(std::string(65, '[') + std::string(65, ']')) == "invalid JSON: nested more than 64 levels deep");
}

TEST_CASE("parse_signal")
{
	const struct {
		std::string text;
		std::optional<int> value;
	} cases[] = {
		{"SIGTERM", SIGTERM},
		{"TERM", SIGTERM},
		{"15", SIGTERM},
		{"sigterm", SIGTERM},
		{"SIGHUP", SIGHUP},
		{"INT", SIGINT},
		{"QUIT", SIGQUIT},
		{"KILL", SIGKILL},
		{"9", SIGKILL},
		{"USR1", SIGUSR1},
		{"SIGUSR2", SIGUSR2},
		{"CONT", SIGCONT},
		{"STOP", SIGSTOP},
		{"WINCH", SIGWINCH},
		{"SIGCHLD", SIGCHLD},
		{"CLD", SIGCHLD},
		{"IOT", SIGABRT},
		{"SIGPIPE", SIGPIPE},
		{"SIGALRM", SIGALRM},
		{"SIGRTMIN", SIGRTMIN},
		{"RTMIN+2", SIGRTMIN + 2},
		{"SIGRTMAX-1", SIGRTMAX - 1},
		{"RTMAX", SIGRTMAX},
		{"", std::nullopt},
		{"SIG", std::nullopt},
		{"0", std::nullopt},
		{"65", std::nullopt},
		{"99999999999", std::nullopt},
		{"-15", std::nullopt},
		{"SIGFOO", std::nullopt},
		{"TERM ", std::nullopt},
		{"SIGSIGTERM", std::nullopt},
		{"RTMIN+99", std::nullopt},
		{"RTMIN-1", std::nullopt},
		{"RTMAX+1", std::nullopt},
	};
	for (const auto &c : cases) {
		CAPTURE(c.text);
		CHECK(parse_signal(c.text) == c.value);
	}
}

TEST_CASE("operator_signal: the names Signal takes and numbers 1 to 31")
{
	const struct {
		std::string text;
		std::optional<int> value;
	} cases[] = {
		{"USR1", SIGUSR1},   {"SIGusr1", SIGUSR1}, {"usr2", SIGUSR2},   {"HUP", SIGHUP},     {"SIGINT", SIGINT},
		{"QUIT", SIGQUIT},   {"TERM", SIGTERM},    {"KILL", SIGKILL},   {"CONT", SIGCONT},   {"STOP", SIGSTOP},
		{"WINCH", SIGWINCH}, {"TTIN", SIGTTIN},    {"SIGTTOU", SIGTTOU}, {"1", 1},           {"31", 31},
		{"9", SIGKILL},      {"", std::nullopt},   {"0", std::nullopt}, {"32", std::nullopt}, {"-1", std::nullopt},
		{"SIG", std::nullopt}, {"BOGUS", std::nullopt}, {"PIPE", std::nullopt}, {"CHLD", std::nullopt},
		{"RTMIN", std::nullopt}, {"USR1 ", std::nullopt}, {"000000001", std::nullopt},
	};
	for (const auto &c : cases) {
		CAPTURE(c.text);
		CHECK(operator_signal(c.text) == c.value);
	}
	// The message's list names exactly what is taken.
	std::string names = kOperatorSignals;
	for (std::size_t at = 0; at < names.size();) {
		std::size_t end = std::min(names.find(", ", at), names.size());
		std::string name = names.substr(at, end - at);
		CAPTURE(name);
		CHECK(operator_signal(name).has_value());
		at = end + 2;
	}
}

namespace {

// A file in $TMPDIR (or /tmp), removed when the test ends.
struct TempFile {
	std::string path;

	explicit TempFile(const std::string &content)
	{
		const char *dir = std::getenv("TMPDIR");
		path = std::string(dir && *dir ? dir : "/tmp") + "/test-config-XXXXXX";
		int fd = mkostemp(path.data(), O_CLOEXEC);
		REQUIRE(fd >= 0);
		REQUIRE(::write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
		::close(fd);
	}
	~TempFile() { ::unlink(path.c_str()); }
};

} // namespace

TEST_CASE("load reads a file and prefixes errors with its name")
{
	TempFile good(R"({"services": {"web": {"exec": ["/bin/true"], "instances": 3}}} // done)");
	Config cfg = load(good.path);
	REQUIRE(cfg.services.size() == 1);
	CHECK(cfg.services[0].instances == 3);

	TempFile bad(R"({"services": {"web": {"drain": {"timeout": "soon"}}}})");
	CHECK_THROWS_WITH_AS(load(bad.path),
	                     (bad.path + ": services.web.drain.timeout: expected a duration like \"30s\", got \"soon\"").c_str(),
	                     ConfigError);

	TempFile syntax("{\n\n   nope }");
	CHECK_THROWS_WITH_AS(load(syntax.path),
	                     (syntax.path + ": invalid JSON at line 3, column 5: invalid literal; expected string literal").c_str(),
	                     ConfigError);

	std::string missing = good.path + "-missing";
	CHECK_THROWS_WITH_AS(load(missing), ("cannot read " + missing + ": No such file or directory").c_str(), ConfigError);

	const char *dir = std::getenv("TMPDIR");
	std::string d = dir && *dir ? dir : "/tmp";
	CHECK_THROWS_WITH_AS(load(d), ("cannot read " + d + ": Is a directory").c_str(), ConfigError);
}

TEST_CASE("metrics: the endpoint's address, mode and connections, and what is refused")
{
	const BadCase cases[] = {
		{R"({"metrics": {}})", "metrics: needs \"listen\": tcp://HOST:PORT or unix:PATH"},
		{R"({"metrics": {"listen": "udp://127.0.0.1:9469"}})",
		 "metrics.listen: expected tcp://HOST:PORT or unix:PATH (HTTP needs a stream socket), got \"udp://127.0.0.1:9469\""},
		{R"({"metrics": {"listen": "http://x"}})", "metrics.listen: expected tcp://HOST:PORT, udp://HOST:PORT or unix:PATH",
		 Match::Contains},
		{R"({"metrics": {"listen": "tcp://127.0.0.1:9469", "mode": "0660"}})",
		 "metrics.mode: applies only to a unix socket with a file path"},
		{R"({"metrics": {"listen": "unix:@m", "mode": "0660"}})",
		 "metrics.mode: applies only to a unix socket with a file path"},
		{R"({"metrics": {"listen": "tcp://127.0.0.1:9469", "max_connections": 0}})", "metrics.max_connections:",
		 Match::Contains},
		{R"({"metrics": {"listen": "tcp://127.0.0.1:9469", "max_connection": 4}})",
		 "metrics.max_connection: unknown key (did you mean \"max_connections\"?)"},
	};
	for (const BadCase &c : cases)
		check_refused(c);
	CHECK_FALSE(parse("{}").metrics.has_value());
	auto tcp = parse(R"({"metrics": {"listen": "tcp://127.0.0.1:9469", "max_connections": 4}})").metrics;
	REQUIRE(tcp.has_value());
	CHECK(tcp->socket.kind == brokerd::config::SocketKind::Tcp);
	CHECK(tcp->socket.port == 9469);
	CHECK(tcp->max_connections == 4);
	CHECK_FALSE(tcp->socket.mode.has_value());
	auto unix_file = parse(R"({"metrics": {"listen": "unix:/run/brokerd/metrics.sock"}})").metrics;
	REQUIRE(unix_file.has_value());
	CHECK(unix_file->socket.path == "/run/brokerd/metrics.sock");
	CHECK(unix_file->socket.mode == 0666);
	CHECK(unix_file->max_connections == 16);
	CHECK(parse(R"({"metrics": {"listen": "unix:/m.sock", "mode": "0600"}})").metrics->socket.mode == 0600);
}
