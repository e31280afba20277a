// Upgrade tests' helpers: load in the background, brokerctl, streamed calls, and what Status must show.
#include "support.hpp"


#include <doctest/doctest.h>

#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

namespace utest {

std::uint64_t status_mask(pid_t pid, const std::string &field)
{
	std::ifstream f("/proc/" + std::to_string(pid) + "/status");
	std::string line;
	while (std::getline(f, line))
		if (line.rfind(field + ":", 0) == 0)
			return std::stoull(line.substr(field.size() + 1), nullptr, 16);
	return 0;
}

namespace {

std::uint64_t sigbit(int sig)
{
	return std::uint64_t{1} << (sig - 1);
}

std::size_t tcp_sockets(pid_t pid)
{
	std::size_t n = 0;
	for (const auto &[fd, target] : proc_fds(pid))
		n += target.rfind("socket:", 0) == 0;
	return n;
}

} // namespace

void TestBroker::launch(const std::function<void()> &spawn)
{
	std::uint64_t before = notify.notified().ready;
	notify.start_main([&] {
		spawn();
		return b.pid();
	});
	bool ready = wait_until([&] {
		return notify.wait_ready(50ms, before) || !b.process().running() || !process_exists(b.pid());
	}, 20s);
	REQUIRE_MESSAGE(ready, "brokerd sent no READY=1 within 20s");
	if (!notify.wait_ready(0ms, before)) {
		auto st = b.process().wait(10s);
		FAIL("brokerd ", st ? describe_status(*st) : std::string("died"), " before READY=1");
	}
}

void TestBroker::start(const json &config, const std::vector<std::string> &env)
{
	env_ = env;
	BrokerOptions opts;
	opts.env = env;
	opts.notify_socket = notify.address();
	opts.wait_ready = false;
	launch([&] { b.start(config, opts); });
}

std::vector<StrayProcess> TestBroker::kill9()
{
	std::vector<StrayProcess> survivors = b.kill9();
	// What brokerd sent before it died is in the socket's queue: handled now, as systemd
	// handles its notify messages before the main process's SIGCHLD.
	notify.sync();
	return survivors;
}

void TestBroker::restart()
{
	notify.sync();
	auto stored = notify.copies();
	BrokerOptions opts;
	opts.env = env_;
	opts.notify_socket = notify.address();
	opts.wait_ready = false;
	for (const auto &[name, fd] : stored)
		opts.listen_fds.emplace_back(name, fd.get());
	launch([&] { b.start_again(opts); });
}

Loadgen::Loadgen(const Broker &b, std::uint16_t port, const std::string &mode, const std::string &expect,
                 int connections, int rate)
	: mode_(mode)
{
	static std::atomic<unsigned> counter{0};
	out_path_ = b.path("loadgen-" + mode + "-" + std::to_string(counter++) + ".json");
	SpawnOptions so;
	so.stdout_path = out_path_;
	so.stderr_path = b.path("loadgen.log");
	// --duration is only a cap: finish() stops it. A request that takes 5 s is a failure
	// whatever the machine's load.
	std::vector<std::string> argv = {env("LOADGEN"), "--target", "127.0.0.1:" + std::to_string(port), "--mode", mode,
	                                 "--connections", std::to_string(connections), "--timeout", "5s",
	                                 "--duration", "300s", "--expect", expect, "--json"};
	if (rate > 0) {
		argv.push_back("--rate");
		argv.push_back(std::to_string(rate));
	}
	proc_ = Process::spawn(argv, so);
	// SIGUSR1/2 would kill it before it blocks them; and the load must be on before any upgrade.
	bool up = wait_until(
		[&] {
			if (!proc_.running() || !process_exists(proc_.pid()))
				return true;
			std::uint64_t want = sigbit(SIGUSR1) | sigbit(SIGUSR2) | sigbit(SIGTERM);
			return (status_mask(proc_.pid(), "SigBlk") & want) == want && tcp_sockets(proc_.pid()) > 0;
		},
		10s);
	REQUIRE_MESSAGE(up, "broker-loadgen did not start its load within 10s");
	REQUIRE_MESSAGE(process_exists(proc_.pid()), "broker-loadgen exited at once: ", read_file(b.path("loadgen.log")));
}

void Loadgen::signal_taken(int sig)
{
	proc_.signal(sig);
	// Signals of one kind merge while pending: a window whose end came before its start was
	// read would not count.
	bool taken = wait_until(
		[&] { return !process_exists(proc_.pid()) || !(status_mask(proc_.pid(), "ShdPnd") & sigbit(sig)); }, 10s);
	REQUIRE_MESSAGE(taken, "broker-loadgen ", mode_, " did not take signal ", sig, " within 10s");
}

json Loadgen::finish()
{
	proc_.signal(SIGTERM);
	auto st = proc_.wait(30s);
	REQUIRE_MESSAGE(st.has_value(), "broker-loadgen did not stop within 30s of SIGTERM");
	INFO("broker-loadgen ", mode_, " ", describe_status(*st));
	REQUIRE(WIFEXITED(*st));
	REQUIRE(WEXITSTATUS(*st) == 0);
	json report = json::parse(read_file(out_path_), nullptr, false);
	REQUIRE_MESSAGE(report.is_object(), "broker-loadgen printed no JSON: ", read_file(out_path_));
	return report;
}

Load::Load(const Broker &b, std::uint16_t port, const std::string &expect, int rate)
{
	gens_.reserve(2);
	gens_.emplace_back(b, port, "keepalive", expect, 8, rate);
	gens_.emplace_back(b, port, "close", expect, 8, rate);
}

void Load::begin_upgrade()
{
	windows_++;
	for (auto &g : gens_)
		g.begin_upgrade();
}

void Load::end_upgrade()
{
	for (auto &g : gens_)
		g.end_upgrade();
}

std::set<int> Load::finish_and_check()
{
	std::set<int> generations;
	for (auto &g : gens_) {
		json r = g.finish();
		MESSAGE("broker-loadgen ", g.mode(), ": ", r.value("requests", 0), " requests, ",
		        r["phases"]["upgrade"].value("ok", 0), " ok during ", r.value("upgrade_windows", 0),
		        " upgrade windows, ", r.value("failed", 0), " failed, ", r.value("idle_resets", 0),
		        " idle connections reset, ", r.value("idle_closes", 0), " closed, generations ",
		        r["generations_seen"].dump());
		INFO("broker-loadgen ", g.mode(), ": ", r.dump());
		CHECK(r.value("requests", 0) > 0);
		CHECK(r.value("failed", -1) == 0);
		CHECK(r.value("ok", 0) == r.value("requests", -1));
		// A reset of an idle keep-alive connection is a failure for a real client; a clean FIN
		// before its next request is not (see broker-loadgen's header).
		CHECK_MESSAGE(r.value("idle_resets", -1) == 0, "broker-loadgen ", g.mode(), ": ",
		              r.value("idle_resets", -1), " idle keep-alive connections were reset");
		CHECK(r.value("upgrade_windows", -1) == windows_);
		if (windows_ > 0)
			CHECK_MESSAGE(r["phases"]["upgrade"].value("ok", 0) > 0, "broker-loadgen ", g.mode(),
			              ": no request succeeded during the ", windows_, " upgrade windows");
		for (const auto &gen : r.value("generations_seen", json::array()))
			generations.insert(gen.get<int>());
	}
	return generations;
}

RunResult brokerctl(const Broker &b, const std::vector<std::string> &args, std::chrono::milliseconds timeout)
{
	std::vector<std::string> argv = {env("BROKERCTL"), "--socket", b.control_path()};
	argv.insert(argv.end(), args.begin(), args.end());
	return run(argv, {}, timeout);
}

RunResult brokerctl_ok(const Broker &b, const std::vector<std::string> &args)
{
	RunResult r = brokerctl(b, args);
	INFO("brokerctl ", joined(args), ": ", r.describe());
	REQUIRE(r.exit_code == 0);
	return r;
}

void write_config(const Broker &b, json cfg)
{
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump(2));
}

StreamCall::StreamCall(const std::string &control, const std::string &method, json params)
	: client_(control, 10s)
{
	client_.send(proto::varlink::make_call(method, std::move(params), true));
}

std::optional<StreamCall::Reply> StreamCall::next(std::chrono::milliseconds timeout)
{
	if (ended_)
		return std::nullopt;
	client_.set_timeout(timeout);
	proto::varlink::Message m;
	try {
		m = client_.receive();
	} catch (const proto::varlink::Error &e) {
		if (e.code() == ETIMEDOUT)
			return std::nullopt;
		throw;
	}
	Reply r;
	r.parameters = m.body.value("parameters", json::object());
	r.error = m.body.value("error", "");
	r.continues = m.body.value("continues", false);
	ended_ = !r.continues;
	seen_.push_back(r);
	return r;
}

std::optional<StreamCall::Reply> StreamCall::until(const std::function<bool(const Reply &)> &pred,
                                                   std::chrono::milliseconds timeout)
{
	auto deadline = Clock::now() + timeout;
	while (!ended_) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
		if (left.count() <= 0)
			return std::nullopt;
		auto r = next(left);
		if (!r)
			return std::nullopt;
		if (pred(*r))
			return r;
	}
	return std::nullopt;
}

std::string StreamCall::transcript() const
{
	std::string s;
	for (const auto &r : seen_)
		s += (r.error.empty() ? "" : r.error + " ") + r.parameters.dump() + "\n";
	return s;
}

StreamCall::Reply final_reply(StreamCall &call, std::chrono::milliseconds timeout)
{
	auto r = call.until([](const StreamCall::Reply &r) { return !r.continues; }, timeout);
	INFO("replies so far:\n", call.transcript());
	REQUIRE_MESSAGE(r.has_value(), "the call did not end within ", timeout.count(), " ms");
	return *r;
}

const json *service_of(const json &status, const std::string &service)
{
	return find_named(member(status, "services"), service);
}

std::vector<json> generation_instances(const json &status, const std::string &service, int generation)
{
	std::vector<json> out;
	if (const json *svc = service_of(status, service))
		for (const auto &g : member(*svc, "generations"))
			if (g.value("number", -1) == generation)
				for (const auto &i : member(g, "instances"))
					out.push_back(i);
	return out;
}

int newest_generation(const json &status, const std::string &service)
{
	int newest = 0;
	if (const json *svc = service_of(status, service))
		for (const auto &g : member(*svc, "generations"))
			newest = std::max(newest, g.value("number", 0));
	return newest;
}

bool serves_alone(const json &status, const std::string &service, int generation, std::size_t count, std::string &why)
{
	const json *svc = service_of(status, service);
	if (!svc) {
		why = "no service " + service;
		return false;
	}
	if (svc->contains("upgrade") && !(*svc)["upgrade"].is_null()) {
		why = "an upgrade is still in progress";
		return false;
	}
	if (svc->value("state", "") != "running") {
		why = "service state is " + svc->value("state", "?");
		return false;
	}
	std::size_t ready = 0;
	for (const auto &g : member(*svc, "generations")) {
		for (const auto &i : member(g, "instances")) {
			int pid = i.value("pid", 0);
			if (g.value("number", -1) != generation) {
				if (pid != 0) {
					why = "instance " + i.value("id", "?") + " of another generation still runs";
					return false;
				}
				continue;
			}
			if (i.value("state", "") == "ready" && pid > 0 && process_exists(pid))
				ready++;
			else if (pid != 0 || i.value("state", "") != "exited") {
				why = "instance " + i.value("id", "?") + " is " + i.value("state", "?");
				return false;
			}
		}
	}
	if (ready != count) {
		why = std::to_string(ready) + " ready instances of gen " + std::to_string(generation) + ", not " +
		      std::to_string(count);
		return false;
	}
	return true;
}

void check_serves_alone(Broker &b, const std::string &service, int generation, std::size_t count,
                        std::chrono::milliseconds timeout)
{
	std::string why;
	json st;
	bool ok = wait_until(
		[&] {
			st = b.status(service);
			return serves_alone(st, service, generation, count, why);
		},
		timeout);
	INFO("Status: ", st.dump());
	CHECK_MESSAGE(ok, service, " gen ", generation, " does not serve alone with ", count, " ready instances: ", why);
}

pid_t instance_pid(const json &status, const std::string &service, const std::string &id)
{
	for (const auto &i : instances(status, service))
		if (i.value("id", "") == id)
			return i.value("pid", 0);
	return 0;
}

std::vector<pid_t> running_pids(const json &status, const std::string &service)
{
	std::vector<pid_t> out;
	for (pid_t p : worker_pids(status, service))
		if (p > 0)
			out.push_back(p);
	std::sort(out.begin(), out.end());
	return out;
}

std::map<int, std::string> brokerd_fds(pid_t pid)
{
	std::map<int, std::string> fds = proc_fds(pid);
	std::erase_if(fds, [](const auto &fd) { return fd.second == "anon_inode:[timerfd]"; });
	return fds;
}

namespace {

// Whether a process's main thread sleeps in epoll_wait, and how often it has been switched out:
// two equal samples mean it did not run in between.
struct Sleep {
	bool in_epoll = false;
	std::string switches;
	bool operator==(const Sleep &) const = default;
};

Sleep sleep_of(pid_t pid)
{
	static const std::set<long> epoll_calls = {
#ifdef SYS_epoll_wait
		SYS_epoll_wait,
#endif
		SYS_epoll_pwait,
#ifdef SYS_epoll_pwait2
		SYS_epoll_pwait2,
#endif
	};
	Sleep s;
	std::string dir = "/proc/" + std::to_string(pid);
	std::istringstream call(read_file(dir + "/syscall")); // "running", or the call's number first
	long nr = -1;
	s.in_epoll = (call >> nr) && epoll_calls.count(nr);
	std::istringstream status(read_file(dir + "/status"));
	std::string line;
	while (std::getline(status, line))
		if (line.find("ctxt_switches:") != std::string::npos)
			s.switches += line;
	return s;
}

} // namespace

std::optional<std::map<int, std::string>> idle_fds(pid_t pid, std::chrono::milliseconds timeout)
{
	std::map<int, std::string> fds;
	bool idle = wait_until(
		[&] {
			Sleep before = sleep_of(pid);
			if (!before.in_epoll)
				return false;
			fds = brokerd_fds(pid);
			return sleep_of(pid) == before;
		},
		timeout);
	return idle ? std::optional(fds) : std::nullopt;
}

std::string listing(const std::map<int, std::string> &fds)
{
	std::string s;
	for (const auto &[fd, target] : fds)
		s += "  " + std::to_string(fd) + " -> " + target + "\n";
	return s;
}

std::size_t rss_kb(pid_t pid)
{
	std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/status"));
	std::string line;
	while (std::getline(in, line))
		if (line.rfind("VmRSS:", 0) == 0)
			return std::stoull(line.substr(6));
	return 0;
}

std::set<std::uint64_t> listening_on(std::uint16_t port)
{
	std::set<std::uint64_t> out;
	for (const auto &[inode, p] : tcp_listeners())
		if (p == port)
			out.insert(inode);
	return out;
}

std::uint64_t inode_of(int fd)
{
	struct stat st{};
	return fd >= 0 && ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

bool kill9(pid_t pid)
{
	int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
	if (fd < 0)
		return false;
	UniqueFd owned(fd);
	return ::syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0) == 0;
}

bool ignores(pid_t pid, int sig)
{
	return (status_mask(pid, "SigIgn") >> (sig - 1)) & 1;
}

int generation_answering(std::uint16_t port)
{
	static const std::regex re(R"(gen (\d+))");
	HttpResponse r = http_get(port);
	std::smatch m;
	if (r.status != 200 || !std::regex_search(r.body, m, re))
		return -1;
	return std::stoi(m[1]);
}

json config_with(const json &services)
{
	return {{"sockets", {{"http", tcp_socket()}}}, {"services", services}};
}

json http_service(int instances, const json &extra)
{
	json s = service({env("EXAMPLE_HTTP")}, {"http"}, instances, "broker");
	s.update(extra);
	return s;
}

const std::vector<std::string> kIgnoresTerm = {"/bin/sh", "-c", "trap '' TERM; exec sleep 1000"};

json stubborn_service(const std::string &drain_timeout)
{
	json s = service(kIgnoresTerm, {"http"}, 1, "exec");
	s["drain"] = {{"timeout", drain_timeout}};
	return s;
}

json python_service(int instances, const json &extra)
{
	json s = service({"python3", env("EXAMPLE_PYTHON")}, {"http"}, instances, "notify");
	s.update(extra);
	return s;
}

std::string shell_quote(const std::string &s)
{
	std::string out = "'";
	for (char c : s)
		out += c == '\'' ? std::string("'\\''") : std::string(1, c);
	return out + "'";
}

std::string joined(const std::vector<std::string> &items)
{
	std::string out;
	for (const auto &i : items)
		out += (out.empty() ? "" : ", ") + i;
	return out;
}

std::size_t occurrences(const std::string &text, const std::string &what)
{
	std::size_t n = 0;
	for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size()))
		n++;
	return n;
}

} // namespace utest
