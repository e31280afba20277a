// Integration: the control socket and brokerctl — permissions, exit codes, output, fd hygiene, config checks.
#include "harness.hpp"
#include "../skip.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>

using namespace itest;
using proto::varlink::SyncClient;

namespace {

json web_config()
{
	return {{"sockets", {{"http", tcp_socket()}}},
	        {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 2, "broker")}}}};
}

// brokerctl copied into the temp dir, so that nobody can run it wherever the build dir is.
std::string brokerctl_for_nobody(const Broker &b)
{
	std::string path = b.path("brokerctl");
	std::filesystem::copy_file(env("BROKERCTL"), path, std::filesystem::copy_options::overwrite_existing);
	::chmod(path.c_str(), 0755);
	return path;
}

RunResult brokerctl(const std::vector<std::string> &args, const SpawnOptions &opts = {})
{
	std::vector<std::string> argv = {env("BROKERCTL")};
	argv.insert(argv.end(), args.begin(), args.end());
	return run(argv, opts);
}

// Exit codes of a child that checks one call as nobody.
enum : int { kDenied = 10, kAllowed = 11, kOtherError = 12 };

int call_as_nobody(const std::string &control, const std::string &method, const json &params = json::object())
{
	try {
		SyncClient c(control, std::chrono::seconds(20));
		json reply = c.call(method, params).body;
		std::fprintf(stderr, "%s succeeded: %s\n", method.c_str(), reply.dump().c_str());
		return kAllowed;
	} catch (const proto::varlink::Error &e) {
		std::fprintf(stderr, "%s failed: %s (%s)\n", method.c_str(), e.what(), e.varlink_error().c_str());
		return e.varlink_error() == "org.varlink.service.PermissionDenied" ? kDenied : kOtherError;
	}
}

int exit_code(Process &p)
{
	auto st = p.wait(10s);
	if (!st) {
		p.kill();
		return -1;
	}
	return WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
}

UniqueFd raw_connect(const std::string &path)
{
	UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
	REQUIRE(fd);
	REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
	return fd;
}

} // namespace

TEST_CASE("Control methods are denied to other users; GetInfo is open to everyone")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root to run a client as nobody");
	Broker b;
	BROKER_CONTEXT(b);
	b.start(web_config());
	std::string control = b.control_path();

	struct stat sb {};
	REQUIRE(::stat(control.c_str(), &sb) == 0);
	CHECK(S_ISSOCK(sb.st_mode));
	CHECK((sb.st_mode & 0777) == 0666);

	struct Case {
		const char *method;
		int expected;
	};
	for (Case c : {Case{"io.brokerd.Control.Status", kDenied}, Case{"io.brokerd.Control.Sockets", kDenied},
	               Case{"org.varlink.service.GetInfo", kAllowed}}) {
		SpawnOptions so;
		so.as_nobody = true;
		so.stderr_path = b.path("nobody.log");
		Process p = Process::fork_run([&] { return call_as_nobody(control, c.method); }, so);
		INFO(c.method, " as nobody: ", read_file(b.path("nobody.log")));
		CHECK(exit_code(p) == c.expected);
	}
	// The owner (root or brokerd's uid) may.
	CHECK(b.status()["services"].size() == 1);

	SpawnOptions nobody;
	nobody.as_nobody = true;
	RunResult r = run({brokerctl_for_nobody(b), "--socket", control, "status"}, nobody);
	INFO("brokerctl as nobody: ", r.describe());
	CHECK(r.exit_code == 4);

	// 500 denied calls in a row cannot flood brokerd's log: a few lines a second, then a count.
	auto denied_lines = [&] {
		std::string log = b.log();
		std::size_t n = 0;
		for (std::size_t at = log.find(" denied"); at != std::string::npos; at = log.find(" denied", at + 1))
			n++;
		return n;
	};
	std::size_t before = denied_lines();
	constexpr int kCalls = 500;
	nobody.stderr_path = b.path("flood.log");
	Process flood = Process::fork_run(
		[&] {
			SyncClient c(control, std::chrono::seconds(10));
			int denied = 0;
			for (int i = 0; i < kCalls; i++) {
				try {
					c.call("io.brokerd.Control.Status");
				} catch (const proto::varlink::Error &e) {
					denied += e.varlink_error() == "org.varlink.service.PermissionDenied";
				}
			}
			return denied == kCalls ? 0 : 1;
		},
		nobody);
	INFO("flood: ", read_file(b.path("flood.log")));
	CHECK(exit_code(flood) == 0);
	std::size_t logged = denied_lines() - before;
	CHECK(logged >= 1);
	CHECK(logged < 100);

	b.stop();
}

TEST_CASE("an admin who is not root cannot choose what brokerd runs as root")
{
	if (::geteuid() != 0)
		TEST_SKIP("needs root to run a client as nobody");
	Broker b;
	BROKER_CONTEXT(b);
	json root_svc = service({"/bin/sleep", "1000"}, {}, 1, "exec");
	json nobody_svc = root_svc;
	nobody_svc["user"] = "nobody";
	b.start({{"control", {{"admin_users", {"nobody"}}}}, {"services", {{"as-root", root_svc}, {"as-nobody", nobody_svc}}}});
	std::string control = b.control_path();

	struct Case {
		const char *service;
		json params;
		int expected;
	};
	const json exec = {"/bin/sleep", "2000"};
	const json env = {{"GREETING", "hello"}};
	for (const Case &c : {
		     Case{"as-root", {{"exec", exec}}, kDenied},
		     Case{"as-root", {{"env", env}}, kDenied},
		     Case{"as-root", {{"version", "2"}}, kAllowed}, // a label: BROKER_VERSION
		     Case{"as-nobody", {{"exec", exec}, {"env", env}}, kAllowed},
	     }) {
		json params = c.params;
		params["service"] = c.service;
		SpawnOptions so;
		so.as_nobody = true;
		so.stderr_path = b.path("admin.log");
		Process p = Process::fork_run([&] { return call_as_nobody(control, "io.brokerd.Control.Upgrade", params); }, so);
		INFO("Upgrade ", params.dump(), " as nobody: ", read_file(b.path("admin.log")));
		CHECK(exit_code(p) == c.expected);
		if (c.expected == kDenied)
			CHECK(read_file(b.path("admin.log")).find("only root may choose") != std::string::npos);
	}
	// Admins keep what does not choose a program: Restart and Rollback deploy a whole generation
	// that root configured.
	for (const char *method : {"io.brokerd.Control.Restart", "io.brokerd.Control.Rollback"}) {
		SpawnOptions so;
		so.as_nobody = true;
		so.stderr_path = b.path("admin.log");
		Process p = Process::fork_run([&] { return call_as_nobody(control, method, {{"service", "as-root"}}); }, so);
		INFO(method, " as nobody: ", read_file(b.path("admin.log")));
		CHECK(exit_code(p) == kAllowed);
	}
	// The allowed override runs, as the service's user.
	json st = b.status("as-nobody");
	json gen = member(member(st, "services")[0], "generations").back();
	CHECK(gen["exec"] == exec);
	pid_t worker = worker_pids(st, "as-nobody").at(0);
	CHECK(read_file("/proc/" + std::to_string(worker) + "/status").find("\nUid:\t65534\t") != std::string::npos);
	// The denied ones changed nothing: the root service runs its configured program.
	for (pid_t pid : worker_pids(b.status("as-root"), "as-root"))
		CHECK(proc_cmdline(pid) == std::vector<std::string>{"/bin/sleep", "1000"});

	// brokerctl says why.
	SpawnOptions nobody;
	nobody.as_nobody = true;
	RunResult r = run({brokerctl_for_nobody(b), "--socket", control, "upgrade", "as-root", "--exec", "/bin/sh"}, nobody);
	INFO("brokerctl as nobody: ", r.describe());
	CHECK(r.exit_code == 4);
	CHECK(r.err.find("only root may choose") != std::string::npos);
	b.stop();
}

TEST_CASE("brokerctl exit codes: not running, no such service")
{
	TempDir dir;
	RunResult missing = brokerctl({"--socket", dir / "nosuch.sock", "status"});
	INFO("missing socket: ", missing.describe());
	CHECK(missing.exit_code == 3);
	CHECK(missing.err.find("no control socket at") != std::string::npos);
	// A directory given for the socket: said as such, not as a missing socket.
	RunResult not_socket = brokerctl({"--socket", dir.path(), "status"});
	INFO("not a socket: ", not_socket.describe());
	CHECK(not_socket.exit_code == 3);
	CHECK(not_socket.err.find("is not a socket") != std::string::npos);

	Broker b;
	BROKER_CONTEXT(b);
	b.start(web_config());
	RunResult nosuch = brokerctl({"--socket", b.control_path(), "status", "nosuch"});
	INFO("status nosuch: ", nosuch.describe());
	CHECK(nosuch.exit_code == 5);
	CHECK(nosuch.err.find("nosuch") != std::string::npos);

	RunResult ok = brokerctl({"--socket", b.control_path(), "status", "web"});
	INFO("status web: ", ok.describe());
	CHECK(ok.exit_code == 0);

	RunResult usage = brokerctl({"--socket", b.control_path(), "--no-such-option"});
	INFO("bad option: ", usage.describe());
	CHECK(usage.exit_code == 2);
	// A misspelled command: the usage error names the one meant; a word near none names none.
	RunResult typo = brokerctl({"--socket", b.control_path(), "upgrdae", "web"});
	INFO("misspelled command: ", typo.describe());
	CHECK(typo.exit_code == 2);
	CHECK(typo.err.find("unknown command \"upgrdae\" (did you mean \"upgrade\"?)") != std::string::npos);
	RunResult far = brokerctl({"--socket", b.control_path(), "frobnicate"});
	INFO("unknown command: ", far.describe());
	CHECK(far.exit_code == 2);
	CHECK(far.err.find("unknown command \"frobnicate\"\n") != std::string::npos);

	// A command's help names the global options and leaves the exit statuses to the main help.
	RunResult sub_help = brokerctl({"upgrade", "--help"});
	INFO("upgrade --help: ", sub_help.describe());
	CHECK(sub_help.exit_code == 0);
	for (const char *global : {"--socket PATH", "--json", "--timeout DURATION"})
		CHECK_MESSAGE(sub_help.out.find(global) != std::string::npos, global);
	CHECK(sub_help.out.find("--drain-timeout") != std::string::npos);
	CHECK(sub_help.out.find("Exit status:") == std::string::npos);
	RunResult main_help = brokerctl({"--help"});
	CHECK(main_help.exit_code == 0);
	CHECK(main_help.out.find("Exit status:") != std::string::npos);

	// --exec takes one word, and brokerctl's own options may follow it; the form that took the
	// rest of the line is refused with the new one as the hint, and nothing begins.
	RunResult old_form = brokerctl({"--socket", b.control_path(), "upgrade", "web", "--exec", "/bin/sleep", "--port", "80"});
	INFO("--exec with arguments and no --: ", old_form.describe());
	CHECK(old_form.exit_code == 2);
	CHECK(old_form.err.find("give a command with arguments after --: --exec -- /usr/bin/app --port 80") != std::string::npos);
	CHECK(member(member(b.status("web"), "services")[0], "generations").size() == 1);
	RunResult one_word = brokerctl({"--socket", b.control_path(), "upgrade", "web", "--exec", "/bin/sleep", "--no-wait"});
	INFO("--exec WORD --no-wait: ", one_word.describe());
	CHECK(one_word.exit_code == 0);
	CHECK(one_word.out.find("gen 2") != std::string::npos);
	// The new instance ran /bin/sleep alone (and failed, which rolls the upgrade back): its
	// complaint reaches brokerd's log through its stderr.
	bool alone = wait_until([&] { return b.log().find("/bin/sleep: missing operand") != std::string::npos; }, 30s);
	CHECK_MESSAGE(alone, "the new instance's stderr never said it ran /bin/sleep without arguments");

	b.stop();
}

TEST_CASE("brokerctl status and sockets: human output names things, --json matches Status")
{
	Broker b;
	BROKER_CONTEXT(b);
	b.start(web_config());
	json st = b.status();
	INFO("Status: ", st.dump());
	std::string address = find_named(st["sockets"], "http")->value("address", "");
	auto insts = instances(st, "web");
	REQUIRE(insts.size() == 2);

	RunResult human = brokerctl({"--socket", b.control_path(), "status"});
	INFO("status: ", human.describe());
	CHECK(human.exit_code == 0);
	CHECK(human.out.find("web") != std::string::npos);
	CHECK(human.out.find("http") != std::string::npos);
	for (const auto &i : insts) {
		CHECK(human.out.find(i["id"].get<std::string>()) != std::string::npos);
		CHECK(human.out.find(std::to_string(i["pid"].get<int>())) != std::string::npos);
	}

	RunResult socks = brokerctl({"--socket", b.control_path(), "sockets"});
	INFO("sockets: ", socks.describe());
	CHECK(socks.exit_code == 0);
	CHECK(socks.out.find("http") != std::string::npos);
	CHECK(socks.out.find(address.substr(address.find("://") + 3)) != std::string::npos);

	RunResult js = brokerctl({"--socket", b.control_path(), "--json", "status"});
	INFO("status --json: ", js.describe());
	REQUIRE(js.exit_code == 0);
	json parsed = json::parse(js.out, nullptr, false);
	REQUIRE(!parsed.is_discarded());
	CHECK(parsed["pid"] == st["pid"]);
	CHECK(parsed["version"] == st["version"]);
	CHECK(parsed["sockets"] == st["sockets"]);
	REQUIRE(parsed["services"].size() == st["services"].size());
	auto json_insts = instances(parsed, "web");
	REQUIRE(json_insts.size() == insts.size());
	for (std::size_t i = 0; i < insts.size(); ++i) {
		CHECK(json_insts[i]["id"] == insts[i]["id"]);
		CHECK(json_insts[i]["pid"] == insts[i]["pid"]);
		CHECK(json_insts[i]["state"] == insts[i]["state"]);
	}

	RunResult jsocks = brokerctl({"--socket", b.control_path(), "--json", "sockets"});
	INFO("sockets --json: ", jsocks.describe());
	REQUIRE(jsocks.exit_code == 0);
	json psocks = json::parse(jsocks.out, nullptr, false);
	REQUIRE(!psocks.is_discarded());
	// Either the Sockets reply ({"sockets": [...]}) or the bare array.
	CHECK((psocks.is_array() ? psocks : psocks["sockets"]) == st["sockets"]);

	b.stop();
}

TEST_CASE("1000 control connections leave brokerd's fd count where it was")
{
	Broker b;
	BROKER_CONTEXT(b);
	b.start(web_config());
	pid_t pid = b.pid();
	std::string control = b.control_path();

	// Warm up every path once (sd-event may open a timerfd on first use), then take the
	// baseline once the count has settled.
	b.status();
	raw_connect(control);
	(void)::send(raw_connect(control).get(), "{\"method\":", 10, MSG_NOSIGNAL);
	std::size_t baseline = 0;
	int same = 0;
	wait_until(
		[&] {
			std::size_t n = fd_count(pid);
			same = n == baseline ? same + 1 : 0;
			baseline = n;
			return same >= 5;
		},
		5s);
	INFO("baseline fd count ", baseline, ": ", [&] {
		std::string s;
		for (const auto &[fd, t] : proc_fds(pid))
			s += std::to_string(fd) + "->" + t + " ";
		return s;
	}());

	for (int i = 0; i < 1000; ++i) {
		switch (i % 3) {
		case 0:
			raw_connect(control);
			break;
		case 1: {
			SyncClient c(control, std::chrono::seconds(10));
			c.call("io.brokerd.Control.Status");
			break;
		}
		case 2: {
			UniqueFd fd = raw_connect(control);
			const char partial[] = "{\"method\":\"io.brokerd.Control.Stat";
			CHECK(::send(fd.get(), partial, sizeof partial - 1, MSG_NOSIGNAL) > 0);
			break;
		}
		}
	}

	std::size_t now = 0;
	bool settled = wait_until([&] { return (now = fd_count(pid)) <= baseline; }, 10s);
	INFO("fd count after: ", now, ": ", [&] {
		std::string s;
		for (const auto &[fd, t] : proc_fds(pid))
			s += std::to_string(fd) + "->" + t + " ";
		return s;
	}());
	CHECK(settled);
	CHECK(now == baseline);
	// And it still answers.
	CHECK(instances(b.status(), "web").size() == 2);

	b.stop();
}

TEST_CASE("brokerd --check-config validates without starting anything")
{
	TempDir dir;
	std::string good = dir / "good.json";
	std::string control = dir / "control.sock";
	std::string exec = env("EXAMPLE_HTTP");
	write_file(good, R"({
  // comments are allowed
  "control": {"path": ")" + control + R"("},
  "sockets": {"http": {"listen": "tcp://127.0.0.1:0"}},
  "services": {"web": {"exec": [")" + exec + R"("], "sockets": ["http"], "instances": 2, "ready": "broker",
                       "drain": {"timeout": "5s"}}}
}
)");
	RunResult ok = run({env("BROKERD"), "--check-config", good});
	INFO("good: ", ok.describe());
	CHECK(ok.exit_code == 0);
	CHECK(::access(control.c_str(), F_OK) != 0); // nothing bound

	struct Case {
		const char *what;
		std::string text;
		const char *key; // the key path the message must name
	};
	auto with = [&](const std::string &socket, const std::string &svc) {
		return R"({"control": {"path": ")" + control + R"("}, "sockets": {"http": )" + socket +
		       R"(}, "services": {"web": )" + svc + "}}";
	};
	std::string good_socket = R"({"listen": "tcp://127.0.0.1:0"})";
	std::string good_service = R"({"exec": [")" + exec + R"("], "sockets": ["http"]})";
	const Case cases[] = {
		{"bad duration", with(good_socket, R"({"exec": [")" + exec + R"("], "sockets": ["http"], "drain": {"timeout": "soon"}})"),
		 "services.web.drain.timeout"},
		{"bad listen address", with(R"({"listen": "bogus://nowhere"})", good_service), "sockets.http.listen"},
		{"unknown socket", with(good_socket, R"({"exec": [")" + exec + R"("], "sockets": ["nosuch"]})"),
		 "services.web.sockets"},
		{"bad ready mode", with(good_socket, R"({"exec": [")" + exec + R"("], "sockets": ["http"], "ready": "maybe"})"),
		 "services.web.ready"},
		{"bad instances", with(good_socket, R"({"exec": [")" + exec + R"("], "sockets": ["http"], "instances": "two"})"),
		 "services.web.instances"},
	};
	for (const auto &c : cases) {
		std::string file = dir / "bad.json";
		write_file(file, c.text);
		RunResult r = run({env("BROKERD"), "--check-config", file});
		INFO(c.what, ": ", r.describe());
		CHECK(r.exit_code == 1);
		CHECK(r.err.find(c.key) != std::string::npos);
	}

	std::string broken = dir / "broken.json";
	write_file(broken, "{\"sockets\": ");
	RunResult syntax = run({env("BROKERD"), "--check-config", broken});
	INFO("syntax error: ", syntax.describe());
	CHECK(syntax.exit_code == 1);
	CHECK(!syntax.err.empty());
}

TEST_CASE("brokerd --version matches the version Status reports")
{
	RunResult v = run({env("BROKERD"), "--version"});
	INFO(v.describe());
	CHECK(v.exit_code == 0);

	Broker b;
	BROKER_CONTEXT(b);
	b.start(web_config());
	std::string version = b.status().value("version", "");
	CHECK(!version.empty());
	CHECK(v.out.find(version) != std::string::npos);
	b.stop();
}

TEST_CASE("a second brokerd refuses a control socket or a unix socket something listens on")
{
	Broker b;
	BROKER_CONTEXT(b);
	json cfg = web_config();
	cfg["sockets"]["local"] = {{"listen", "unix:" + b.path("local.sock")}};
	b.start(cfg);

	// Its control socket, then its unix listener: each is alive, and stays the first brokerd's.
	TempDir other;
	const std::pair<json, std::string> cases[] = {
		{{{"control", {{"path", b.control_path()}}}}, "another brokerd (or something else) listens on it"},
		{{{"control", {{"path", other / "control.sock"}}}, {"sockets", {{"local", {{"listen", "unix:" + b.path("local.sock")}}}}}},
		 "something still listens on it"},
	};
	for (const auto &[second, message] : cases) {
		std::string file = other / "brokerd.json";
		write_file(file, second.dump());
		RunResult r = run({env("BROKERD"), "--config", file});
		INFO("second brokerd: ", r.describe());
		CHECK(r.exit_code != 0);
		CHECK(r.err.find(message) != std::string::npos);
		CHECK(b.status().contains("services"));
	}
	CHECK(::access(b.path("local.sock").c_str(), F_OK) == 0);
	b.stop();
}

namespace {

RunResult ctl(const Broker &b, const std::vector<std::string> &args)
{
	std::vector<std::string> argv = {"--socket", b.control_path()};
	argv.insert(argv.end(), args.begin(), args.end());
	return brokerctl(argv);
}

// The config file brokerd reads at upgrade and reload, with its control socket kept.
void write_config(const Broker &b, json cfg)
{
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump(2));
}

// "hello from web gen N ...": N, or 0 when the answer is not that.
int generation_answering(std::uint16_t port)
{
	HttpResponse r = http_get(port);
	int gen = 0;
	return r.status == 200 && std::sscanf(r.body.c_str(), "hello from web gen %d", &gen) == 1 ? gen : 0;
}

// How many times brokerd's log says `text`.
std::size_t log_count(const Broker &b, const std::string &text)
{
	std::string log = b.log();
	std::size_t n = 0;
	for (std::size_t at = log.find(text); at != std::string::npos; at = log.find(text, at + 1))
		n++;
	return n;
}

} // namespace

TEST_CASE("what cannot begin is refused with exit 7 and changes nothing; rollback, stop and start do what they say")
{
	Broker b;
	BROKER_CONTEXT(b);
	json cfg = web_config();
	cfg["sockets"]["other"] = tcp_socket();
	cfg["services"]["ext"] = {{"instances", 1}, {"ready", "exec"}, {"register", {{"users", {"root"}}}}};
	b.start(cfg);
	std::uint16_t port = socket_port(b.status(), "http");
	std::vector<pid_t> first = worker_pids(b.status("web"), "web");
	REQUIRE(first.size() == 2);

	struct Refused {
		const char *what;
		std::function<void(json &)> edit; // of the config file, before the call
		std::vector<std::string> args;
		std::string message;
	};
	const Refused refused[] = {
		{"rollback without a previous generation", [](json &) {}, {"rollback", "web"},
		 "web has no previous generation to roll back to"},
		{"an invalid config file", [](json &c) { c["services"]["web"]["drain"] = {{"timeout", "soon"}}; },
		 {"upgrade", "web"}, "services.web.drain.timeout"},
		{"a config file without the service", [](json &c) { c["services"].erase("web"); }, {"upgrade", "web"},
		 "services.web: not in the config file any more"},
		{"other sockets", [](json &c) { c["services"]["web"]["sockets"] = {"http", "other"}; }, {"upgrade", "web"},
		 "services.web.sockets: changed"},
		{"a restart of a registered service", [](json &) {}, {"restart", "ext"}, "ext is a registered service"},
		{"an upgrade of a registered service", [](json &) {}, {"upgrade", "ext"}, "ext is a registered service"},
		// brokerd keeps no generation of a registered service to go back to.
		{"a rollback of a registered service", [](json &) {}, {"rollback", "ext"},
		 "ext has no previous generation to roll back to"},
	};
	for (const Refused &r : refused) {
		json edited = cfg;
		r.edit(edited);
		write_config(b, edited);
		RunResult out = ctl(b, r.args);
		INFO(r.what, ": ", out.describe());
		CHECK(out.exit_code == 7);
		CHECK(out.err.find(r.message) != std::string::npos);
		CHECK(worker_pids(b.status("web"), "web") == first);
		CHECK(generation_answering(port) == 1);
	}
	write_config(b, cfg);

	// Rollback deploys the previous generation's configuration again, as a new generation.
	RunResult up = ctl(b, {"upgrade", "web", "--env", "MARK=two"});
	INFO("upgrade: ", up.describe());
	REQUIRE(up.exit_code == 0);
	RunResult back = ctl(b, {"rollback", "web"});
	INFO("rollback: ", back.describe());
	REQUIRE(back.exit_code == 0);
	CHECK(generation_answering(port) == 3);
	std::vector<pid_t> third = worker_pids(b.status("web"), "web");
	REQUIRE(third.size() == 2);
	for (pid_t pid : third)
		CHECK(read_file("/proc/" + std::to_string(pid) + "/environ").find("MARK=two") == std::string::npos);

	// While an upgrade runs, rollback and stop are refused as well as a second upgrade (the test
	// upgrade-concurrent-upgrade has those); abort ends it.
	RunResult held = ctl(b, {"upgrade", "web", "--no-wait", "--start-timeout", "1m", "--exec", "--", "/bin/sleep", "60"});
	INFO("upgrade --no-wait: ", held.describe());
	REQUIRE(held.exit_code == 0);
	for (const char *command : {"rollback", "stop"}) {
		RunResult out = ctl(b, {command, "web"});
		INFO(command, " during an upgrade: ", out.describe());
		CHECK(out.exit_code == 7);
		CHECK(out.err.find("an upgrade of web to gen 4 is in progress") != std::string::npos);
	}
	REQUIRE(ctl(b, {"abort", "web"}).exit_code == 0);
	// The rollback ends as the new instance is told to drain; gone, it leaves generation 3 alone.
	CHECK(wait_until(
		[&] {
			json st = b.status("web");
			const json *svc = find_named(st["services"], "web");
			return svc && (!svc->contains("upgrade") || (*svc)["upgrade"].is_null()) &&
			       worker_pids(st, "web") == third;
		},
		30s));

	// Stop returns once every instance has exited; a stopped service refuses the rest until start.
	RunResult stop = ctl(b, {"stop", "web"});
	INFO("stop: ", stop.describe());
	REQUIRE(stop.exit_code == 0);
	for (pid_t pid : third)
		CHECK_MESSAGE(!process_exists(pid), "worker ", pid, " still runs after brokerctl stop returned");
	for (const std::vector<std::string> &args : {std::vector<std::string>{"upgrade", "web"},
	                                             std::vector<std::string>{"rollback", "web"},
	                                             std::vector<std::string>{"restart", "web"}}) {
		RunResult out = ctl(b, args);
		INFO(args[0], " of a stopped service: ", out.describe());
		CHECK(out.exit_code == 7);
		CHECK(out.err.find("web is stopped") != std::string::npos);
	}
	RunResult start = ctl(b, {"start", "web"});
	INFO("start: ", start.describe());
	REQUIRE(start.exit_code == 0);
	CHECK(generation_answering(port) == 5);
	RunResult again = ctl(b, {"start", "web"});
	INFO("start again: ", again.describe());
	CHECK(again.exit_code == 7);
	CHECK(again.err.find("web is already running") != std::string::npos);

	// A registered service stops and starts too: start only accepts registrations again, since
	// brokerd runs none of its workers.
	RunResult ext_stop = ctl(b, {"stop", "ext"});
	INFO("stop ext: ", ext_stop.describe());
	CHECK(ext_stop.exit_code == 0);
	{
		// The test process is root, whom the rule lists: only the stop keeps it out.
		SyncClient worker(b.control_path(), 10s);
		std::string outcome = "ok";
		try {
			worker.call("io.brokerd.Worker.Hello", {{"service", "ext"}, {"want_fds", false}});
		} catch (const proto::varlink::Error &e) {
			outcome = e.varlink_error();
		}
		CHECK(outcome == "org.varlink.service.PermissionDenied");
		CHECK(log_count(b, "denied: the service is stopped") == 1);
	}
	RunResult ext_start = ctl(b, {"start", "ext"});
	INFO("start ext: ", ext_start.describe());
	CHECK(ext_start.exit_code == 0);
	CHECK(log_count(b, "service ext: accepting registrations again") == 1);
	RunResult ext_again = ctl(b, {"start", "ext"});
	INFO("start ext again: ", ext_again.describe());
	CHECK(ext_again.exit_code == 7);
	CHECK(ext_again.err.find("ext is already running") != std::string::npos);
	b.stop();
}

TEST_CASE("SIGHUP reloads the config file as brokerctl reload does, and an invalid file changes nothing")
{
	Broker b;
	BROKER_CONTEXT(b);
	json cfg = web_config();
	b.start(cfg);

	cfg["sockets"]["api"] = tcp_socket();
	write_config(b, cfg);
	REQUIRE(::kill(b.pid(), SIGHUP) == 0);
	CHECK(wait_until([&] { return find_named(b.status()["sockets"], "api") != nullptr; }, 20s));

	json bad = cfg;
	bad["sockets"].erase("api");
	bad["services"]["web"]["instances"] = "three";
	write_config(b, bad);
	REQUIRE(::kill(b.pid(), SIGHUP) == 0);
	CHECK(wait_until([&] { return log_count(b, "reload failed, keeping the running config") == 1; }, 20s));
	CHECK(b.log().find("services.web.instances") != std::string::npos);
	json st = b.status();
	CHECK(find_named(st["sockets"], "api") != nullptr);
	CHECK(instances(st, "web").size() == 2);
	b.stop();
}

TEST_CASE("restart: always starts again an instance that exits 0; on-failure and no do not")
{
	Broker b;
	BROKER_CONTEXT(b);
	auto exiting = [](const char *status, const char *restart) {
		json s = service({"/bin/sh", "-c", std::string("exit ") + status}, {}, 1, "exec");
		s["restart"] = restart;
		return s;
	};
	b.start({{"services",
	          {{"always", exiting("0", "always")}, {"on-failure", exiting("0", "on-failure")}, {"no", exiting("1", "no")}}}});
	// Its third start comes 100 ms and 200 ms of backoff after its first exit, the others' first
	// restart would have come 100 ms after theirs.
	CHECK(wait_until([&] { return log_count(b, "instance always/1/0: started pid") >= 3; }, 20s));
	CHECK(log_count(b, "instance on-failure/1/0: started pid") == 1);
	CHECK(log_count(b, "instance no/1/0: started pid") == 1);
	b.stop();
}

TEST_CASE("a worker that sends STOPPING=1 drains under its drain timeout, and is killed at it")
{
	Broker b;
	BROKER_CONTEXT(b);
	const char *stopper = R"(
import os, signal, socket
signal.signal(signal.SIGTERM, signal.SIG_IGN)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", addr)
s.sendto(b"STOPPING=1", addr)
while True:
    signal.pause()
)";
	json svc = service({"python3", "-c", stopper}, {}, 1, "notify");
	svc["drain"] = {{"timeout", "5s"}};
	svc["restart"] = "no";
	b.start({{"services", {{"stopper", svc}}}});
	std::vector<pid_t> pids = worker_pids(b.status("stopper"), "stopper");
	REQUIRE(pids.size() == 1);
	REQUIRE(pids[0] > 0);
	CHECK(wait_until([&] { return !process_exists(pids[0]); }, 20s));
	CHECK(log_count(b, "instance stopper/1/0: drain timeout, sending SIGKILL") == 1);
	b.stop();
}

TEST_CASE("a registered service without a register rule lets nobody register, root included")
{
	Broker b;
	BROKER_CONTEXT(b);
	b.start({{"services", {{"ext", {{"instances", 1}, {"ready", "exec"}}}}}});
	std::string control = b.control_path();
	SpawnOptions so;
	so.stderr_path = b.path("hello.log");
	Process p = Process::fork_run(
		[&] {
			try {
				SyncClient c(control, std::chrono::seconds(10));
				c.call("io.brokerd.Worker.Hello", {{"service", "ext"}, {"version", "1"}});
				std::fprintf(stderr, "Hello succeeded\n");
				return 1;
			} catch (const proto::varlink::Error &e) {
				std::fprintf(stderr, "Hello failed: %s\n", e.varlink_error().c_str());
				return e.varlink_error() == "org.varlink.service.PermissionDenied" ? 0 : 2;
			}
		},
		so);
	INFO("as root: ", read_file(b.path("hello.log")));
	CHECK(exit_code(p) == 0);
	CHECK(instances(b.status("ext"), "ext").empty());
	CHECK(log_count(b, "not allowed by services.ext.register") == 1);
	b.stop();
}

TEST_CASE("a Watch stream that falls 256 KiB behind is closed as too slow, and brokerd serves on")
{
	Broker b;
	BROKER_CONTEXT(b);
	json ext = {{"instances", 1}, {"ready", "exec"}, {"register", {{"users", {"root"}}}}};
	b.start({{"services", {{"ext", ext}}}});
	std::string control = b.control_path();

	// Events: registrations of "ext" that come and go, 20 at a time, from a child that ignores
	// the SIGTERM brokerd drains a registered worker with. Each makes a few hundred bytes of them.
	SpawnOptions so;
	so.stderr_path = b.path("registrations.log");
	Process events = Process::fork_run(
		[&] {
			::signal(SIGTERM, SIG_IGN);
			for (int round = 0; round < 200; round++) {
				std::vector<std::unique_ptr<SyncClient>> held;
				for (int i = 0; i < 20; i++) {
					held.push_back(std::make_unique<SyncClient>(control, std::chrono::seconds(10)));
					held.back()->call("io.brokerd.Worker.Hello", {{"service", "ext"}, {"version", "1"}});
				}
			}
			return 0;
		},
		so);

	// A Watch read until its first event, so that it surely streams, and never after.
	SyncClient watch(control, std::chrono::seconds(20));
	watch.send(proto::varlink::make_call("io.brokerd.Control.Watch", json::object(), true));
	proto::varlink::Message first = watch.receive();
	INFO("first Watch reply: ", first.body.dump());
	CHECK(!first.body.contains("error"));
	CHECK(wait_until([&] { return log_count(b, "too slow reading Watch events") == 1; }, 60s));
	events.kill();
	INFO("registrations: ", read_file(b.path("registrations.log")));

	// What the kernel still held is there to read, then the end of the stream (not a wait for
	// more events: the registrations have stopped).
	bool ended = false;
	try {
		for (;;)
			watch.receive();
	} catch (const proto::varlink::Error &e) {
		ended = std::string(e.what()).find("connection closed by the broker") != std::string::npos;
		MESSAGE("Watch after the close: ", std::string(e.what()));
	}
	CHECK(ended);
	CHECK(b.status()["pid"] == b.pid());
	b.stop();
}
