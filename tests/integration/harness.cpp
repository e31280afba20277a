// Integration-test harness: processes, temp dirs, brokerd's lifecycle, Status, HTTP and /proc.
#include "harness.hpp"

#include "proto/sync_client.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

extern char **environ;

namespace itest {

namespace {

[[noreturn]] void fail(const std::string &what)
{
	throw std::runtime_error(what);
}

[[noreturn]] void fail_errno(const std::string &what)
{
	throw std::runtime_error(what + ": " + std::strerror(errno));
}

// Direct syscalls: glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
int pidfd_open(pid_t pid, unsigned flags)
{
	return static_cast<int>(::syscall(SYS_pidfd_open, pid, flags));
}

int pidfd_send_signal(int pidfd, int sig, siginfo_t *info, unsigned flags)
{
	return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, info, flags));
}

int ms_left(Clock::time_point deadline)
{
	auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
	return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

// Polls one fd until `events` or the deadline; false on timeout.
bool poll_one(int fd, short events, Clock::time_point deadline)
{
	for (;;) {
		pollfd p{fd, events, 0};
		int r = ::poll(&p, 1, ms_left(deadline));
		if (r > 0)
			return true;
		if (r == 0)
			return false;
		if (errno != EINTR)
			fail_errno("poll");
	}
}

// Orphans of a killed brokerd come back to the test process, which can then reap them.
void become_subreaper()
{
	static bool done = false;
	if (!done && ::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0)
		done = true;
}

// Pids the harness spawned on purpose; any other child of the test process is an orphan.
std::set<pid_t> &own_children()
{
	static std::set<pid_t> s;
	return s;
}

std::vector<pid_t> all_pids()
{
	std::vector<pid_t> out;
	DIR *d = ::opendir("/proc");
	if (!d)
		return out;
	while (dirent *e = ::readdir(d)) {
		char *end = nullptr;
		long v = std::strtol(e->d_name, &end, 10);
		if (end && *end == '\0' && v > 0)
			out.push_back(static_cast<pid_t>(v));
	}
	::closedir(d);
	return out;
}

// What /proc/PID/stat says of a process, and whether it is on its way out.
struct ProcStat {
	pid_t pid = 0;
	pid_t ppid = 0;
	pid_t sid = 0;
	char state = '?';
	unsigned long flags = 0;
	unsigned long long start = 0; // clock ticks after boot

	bool dead() const { return state == 'Z' || state == 'X' || state == 'x'; }
};

std::optional<ProcStat> proc_stat(pid_t pid)
{
	std::string line = read_file("/proc/" + std::to_string(pid) + "/stat");
	// The comm field may hold spaces and parentheses: the fields go on after the last ')'.
	auto close = line.rfind(')');
	if (close == std::string::npos || close + 2 >= line.size())
		return std::nullopt;
	std::istringstream rest(line.substr(close + 2));
	ProcStat st;
	st.pid = pid;
	std::string skip;
	rest >> st.state >> st.ppid >> skip >> st.sid >> skip >> skip >> st.flags;
	for (int field = 10; field <= 22; ++field) // minflt .. starttime
		rest >> skip;
	try {
		st.start = std::stoull(skip);
	} catch (const std::exception &) {
		return std::nullopt;
	}
	return rest ? std::optional<ProcStat>(st) : std::nullopt;
}

// Exiting (PF_EXITING), or with a SIGKILL pending: it goes without anyone's help.
bool dying(pid_t pid)
{
	constexpr unsigned long kPfExiting = 0x4;
	auto st = proc_stat(pid);
	if (!st || st->dead() || (st->flags & kPfExiting))
		return true;
	std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/status"));
	std::string line;
	while (std::getline(in, line))
		if (line.rfind("SigPnd:", 0) == 0 || line.rfind("ShdPnd:", 0) == 0)
			if ((std::stoull(line.substr(7), nullptr, 16) >> (SIGKILL - 1)) & 1)
				return true;
	return false;
}

std::string cmdline_text(pid_t pid)
{
	std::string out;
	for (const auto &arg : proc_cmdline(pid))
		out += (out.empty() ? "" : " ") + arg;
	return out.empty() ? "(no command line)" : out;
}

// Failures the running test case reported, counted as doctest reports them to its listeners.
std::atomic<int> failures_in_case{0};

struct FailureCounter : doctest::IReporter {
	explicit FailureCounter(const doctest::ContextOptions &) {}
	void report_query(const doctest::QueryData &) override {}
	void test_run_start() override {}
	void test_run_end(const doctest::TestRunStats &) override {}
	void test_case_start(const doctest::TestCaseData &) override { failures_in_case = 0; }
	void test_case_reenter(const doctest::TestCaseData &) override { failures_in_case = 0; }
	void test_case_end(const doctest::CurrentTestCaseStats &) override {}
	void test_case_exception(const doctest::TestCaseException &) override { failures_in_case++; }
	void subcase_start(const doctest::SubcaseSignature &) override {}
	void subcase_end() override {}
	void log_assert(const doctest::AssertData &a) override { failures_in_case += a.m_failed; }
	void log_message(const doctest::MessageData &m) override
	{
		failures_in_case += (m.m_severity & (doctest::assertType::is_check | doctest::assertType::is_require)) != 0;
	}
	void test_case_skipped(const doctest::TestCaseData &) override {}
};

// Brokers alive in the test process, so that an orphan reparented to the test is charged to the
// one whose worker's session it belongs to.
std::set<const Broker *> &live_brokers()
{
	static std::set<const Broker *> s;
	return s;
}

std::vector<std::string> build_env(const std::vector<std::string> &add, const std::vector<std::string> &unset)
{
	auto name_of = [](const std::string &kv) { return kv.substr(0, kv.find('=')); };
	std::vector<std::string> out;
	for (char **e = environ; *e; ++e) {
		std::string kv = *e;
		std::string n = name_of(kv);
		bool drop = std::find(unset.begin(), unset.end(), n) != unset.end();
		for (const auto &a : add)
			drop = drop || name_of(a) == n;
		if (!drop)
			out.push_back(kv);
	}
	out.insert(out.end(), add.begin(), add.end());
	return out;
}

std::vector<char *> cstrings(std::vector<std::string> &v)
{
	std::vector<char *> out;
	for (auto &s : v)
		out.push_back(s.data());
	out.push_back(nullptr);
	return out;
}

// The variables the harness controls for brokerd never leak in from the test's environment.
const std::vector<std::string> kScrubbed = {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                                            "WATCHDOG_USEC", "WATCHDOG_PID", "BROKER_SOCKET", "BROKER_TOKEN"};

// In the child after fork: stdio, credentials, no stray fds. Returns only on failure.
void setup_child(const SpawnOptions &opts, int out_fd, int err_fd)
{
	if (opts.kill_with_parent)
		::prctl(PR_SET_PDEATHSIG, SIGTERM);
	::signal(SIGPIPE, SIG_DFL);
	sigset_t none;
	sigemptyset(&none);
	::sigprocmask(SIG_SETMASK, &none, nullptr);

	int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (devnull < 0 || ::dup2(devnull, 0) < 0)
		_exit(126);
	if (out_fd >= 0 && ::dup2(out_fd, 1) < 0)
		_exit(126);
	if (err_fd >= 0 && ::dup2(err_fd, 2) < 0)
		_exit(126);
	// Everything of ours is CLOEXEC already; this also covers fds opened by libraries.
	::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
	if (opts.as_nobody) {
		if (::setgroups(0, nullptr) < 0 || ::setgid(65534) < 0 || ::setuid(65534) < 0)
			_exit(126);
	}
}

constexpr std::string_view kListenPid = "LISTEN_PID=";

// In the child after fork: `fds` at 3, 4, ..., inheritable, through `high` (as many slots) so that
// none is overwritten before it is moved. Allocates nothing; _exits on failure.
void place_listen_fds(const std::vector<int> &fds, std::vector<int> &high)
{
	int n = static_cast<int>(fds.size());
	for (int i = 0; i < n; ++i)
		if ((high[i] = ::fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + n)) < 0)
			_exit(126);
	for (int i = 0; i < n; ++i)
		if (::dup2(high[i], 3 + i) < 0) // the copy at 3 + i is not CLOEXEC; high[i] goes at exec
			_exit(126);
}

// The decimal digits of v and a NUL at `out`, which has room for them; allocates nothing.
void write_decimal(char *out, long v)
{
	char digits[24];
	int n = 0;
	do
		digits[n++] = static_cast<char>('0' + v % 10);
	while ((v /= 10) > 0);
	while (n > 0)
		*out++ = digits[--n];
	*out = '\0';
}

UniqueFd open_output(const std::string &path)
{
	UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
	if (!fd)
		fail_errno("open " + path);
	return fd;
}

// A line of the harness's own in brokerd's log, where a failure report shows it in its place.
void mark_log(const std::string &path, const std::string &text)
{
	std::string line = "[harness] " + text + "\n";
	(void)!::write(open_output(path).get(), line.data(), line.size());
}

} // namespace

REGISTER_LISTENER("itest-failures", 2, FailureCounter);

// ---------------------------------------------------------------------------------------------

std::string env(const char *name)
{
	const char *v = std::getenv(name);
	if (!v || !*v)
		fail(std::string("environment variable ") + name + " is not set (run the tests with meson test)");
	return v;
}

bool executable(const std::string &path)
{
	return ::access(path.c_str(), X_OK) == 0;
}

std::string fd_probe()
{
	if (const char *p = std::getenv("FD_PROBE"))
		return p;
	// Built next to the test programs in the same directory.
	return (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "itest-fd-probe").string();
}

TempDir::TempDir()
{
	std::string base = std::filesystem::temp_directory_path().string() + "/brokerd-itest.XXXXXX";
	if (!::mkdtemp(base.data()))
		fail_errno("mkdtemp");
	path_ = base;
	if (::chmod(path_.c_str(), 0755) < 0)
		fail_errno("chmod " + path_);
}

TempDir::~TempDir()
{
	std::error_code ec;
	std::filesystem::remove_all(path_, ec);
}

std::string read_file(const std::string &path)
{
	std::ifstream f(path, std::ios::binary);
	std::ostringstream s;
	s << f.rdbuf();
	return s.str();
}

void write_file(const std::string &path, const std::string &text, mode_t mode)
{
	UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
	if (!fd)
		fail_errno("open " + path);
	if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()))
		fail_errno("write " + path);
	::fchmod(fd.get(), mode);
}

// ---------------------------------------------------------------------------------------------

Process::Process(Process &&o) noexcept
	: pid_(std::exchange(o.pid_, -1)), pidfd_(std::move(o.pidfd_)), status_(std::exchange(o.status_, std::nullopt))
{
}

Process &Process::operator=(Process &&o) noexcept
{
	if (this != &o) {
		if (running())
			kill();
		pid_ = std::exchange(o.pid_, -1);
		pidfd_ = std::move(o.pidfd_);
		status_ = std::exchange(o.status_, std::nullopt);
	}
	return *this;
}

Process::~Process()
{
	if (running())
		kill();
}

Process Process::spawn(const std::vector<std::string> &argv, const SpawnOptions &opts)
{
	if (argv.empty())
		fail("spawn: empty argv");
	std::vector<std::string> args = argv;
	std::vector<std::string> envs = build_env(opts.env, kScrubbed);
	for (const auto &u : opts.unset_env)
		std::erase_if(envs, [&](const std::string &kv) { return kv.rfind(u + "=", 0) == 0; });
	std::vector<int> listen;
	if (!opts.listen_fds.empty()) {
		std::string names;
		for (const auto &[name, fd] : opts.listen_fds) {
			names += (listen.empty() ? "" : ":") + name;
			listen.push_back(fd);
		}
		envs.push_back("LISTEN_FDS=" + std::to_string(listen.size()));
		envs.push_back("LISTEN_FDNAMES=" + names);
		// Room for any pid, filled in by the child: it does not know its pid before the fork.
		envs.push_back(std::string(kListenPid) + std::string(20, '\0'));
	}
	auto cargv = cstrings(args);
	auto cenv = cstrings(envs);
	char *listen_pid = listen.empty() ? nullptr : cenv[cenv.size() - 2] + kListenPid.size();
	std::vector<int> high(listen.size()); // allocated before the fork
	return fork_run([&] {
		if (!listen.empty()) {
			place_listen_fds(listen, high);
			write_decimal(listen_pid, ::getpid());
		}
		::execvpe(cargv[0], cargv.data(), cenv.data());
		return 127;
	}, opts);
}

Process Process::fork_run(const std::function<int()> &fn, const SpawnOptions &opts)
{
	UniqueFd out, err;
	if (!opts.stdout_path.empty())
		out = open_output(opts.stdout_path);
	if (!opts.stderr_path.empty())
		err = open_output(opts.stderr_path);
	int out_fd = out ? out.get() : opts.stdout_fd;
	int err_fd = err ? err.get() : opts.stderr_fd;

	become_subreaper();
	pid_t pid = ::fork();
	if (pid < 0)
		fail_errno("fork");
	if (pid == 0) {
		setup_child(opts, out_fd, err_fd);
		int rc = 125;
		try {
			rc = fn();
		} catch (const std::exception &e) {
			std::fprintf(stderr, "child: %s\n", e.what());
		}
		std::fflush(nullptr);
		_exit(rc);
	}
	Process p;
	p.pid_ = pid;
	p.pidfd_.reset(pidfd_open(pid, 0));
	own_children().insert(pid);
	if (!p.pidfd_)
		fail_errno("pidfd_open");
	return p;
}

std::optional<int> Process::wait(std::chrono::milliseconds timeout)
{
	if (status_ || pid_ <= 0)
		return status_;
	auto deadline = Clock::now() + timeout;
	if (!poll_one(pidfd_.get(), POLLIN, deadline))
		return std::nullopt;
	int st = 0;
	pid_t r;
	do
		r = ::waitpid(pid_, &st, 0);
	while (r < 0 && errno == EINTR);
	if (r != pid_)
		fail_errno("waitpid");
	own_children().erase(pid_);
	status_ = st;
	return status_;
}

void Process::signal(int sig)
{
	if (running())
		pidfd_send_signal(pidfd_.get(), sig, nullptr, 0);
}

void Process::kill()
{
	if (!running())
		return;
	signal(SIGKILL);
	wait(10s);
}

std::string describe_status(int st)
{
	if (WIFEXITED(st))
		return "exited with " + std::to_string(WEXITSTATUS(st));
	if (WIFSIGNALED(st))
		return std::string("killed by signal ") + sigabbrev_np(WTERMSIG(st));
	return "wait status " + std::to_string(st);
}

std::string RunResult::describe() const
{
	return "exit code " + std::to_string(exit_code) + "\n--- stdout:\n" + out + "\n--- stderr:\n" + err;
}

RunResult run(const std::vector<std::string> &argv, const SpawnOptions &opts_in, std::chrono::milliseconds timeout)
{
	int out_pipe[2], err_pipe[2];
	if (::pipe2(out_pipe, O_CLOEXEC) < 0)
		fail_errno("pipe2");
	UniqueFd out_r(out_pipe[0]), out_w(out_pipe[1]);
	if (::pipe2(err_pipe, O_CLOEXEC) < 0)
		fail_errno("pipe2");
	UniqueFd err_r(err_pipe[0]), err_w(err_pipe[1]);

	SpawnOptions opts = opts_in;
	opts.stdout_fd = out_w.get();
	opts.stderr_fd = err_w.get();
	opts.stdout_path.clear();
	opts.stderr_path.clear();
	Process p = Process::spawn(argv, opts);
	out_w.reset();
	err_w.reset();

	RunResult res;
	auto deadline = Clock::now() + timeout;
	bool out_open = true, err_open = true;
	while (out_open || err_open) {
		pollfd fds[2] = {{out_open ? out_r.get() : -1, POLLIN, 0}, {err_open ? err_r.get() : -1, POLLIN, 0}};
		int r = ::poll(fds, 2, ms_left(deadline));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break; // timeout: killed below
		char buf[4096];
		for (int i = 0; i < 2; ++i) {
			if (!fds[i].revents)
				continue;
			ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
			if (n > 0)
				(i == 0 ? res.out : res.err).append(buf, n);
			else if (n == 0 || errno != EINTR)
				(i == 0 ? out_open : err_open) = false;
		}
	}
	auto st = p.wait(std::chrono::milliseconds(ms_left(deadline)));
	if (!st) {
		p.kill();
		res.err += "\n[harness: " + argv[0] + " timed out, killed]";
		return res;
	}
	res.exit_code = WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
	if (WIFSIGNALED(*st))
		res.err += "\n[harness: " + describe_status(*st) + "]";
	return res;
}

bool wait_until(const std::function<bool()> &pred, std::chrono::milliseconds timeout)
{
	auto deadline = Clock::now() + timeout;
	for (;;) {
		if (pred())
			return true;
		if (Clock::now() >= deadline)
			return false;
		// Nothing can wake us for a /proc state: re-check it at a short, fixed pace.
		::poll(nullptr, 0, std::min(10, ms_left(deadline)));
	}
}

// ---------------------------------------------------------------------------------------------

Broker::Broker()
{
	static std::atomic<unsigned> counter{0};
	notify_name_ = "brokerd-itest-notify-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
	notify_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!notify_)
		fail_errno("socket");
	live_brokers().insert(this);
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path + 1, notify_name_.data(), notify_name_.size());
	socklen_t len = offsetof(sockaddr_un, sun_path) + 1 + notify_name_.size();
	if (::bind(notify_.get(), reinterpret_cast<sockaddr *>(&sa), len) < 0)
		fail_errno("bind notify socket");
}

Broker::~Broker()
{
	// A test that did not stop brokerd gets a graceful stop, so that what it would leave behind
	// is seen; a test that failed already is cleaned up at once.
	bool failed = failure_reported() || std::uncaught_exceptions() > 0;
	if (proc_.running() && !failed) {
		note_all_sessions();
		proc_.signal(SIGTERM);
		if (!proc_.wait(20s))
			FAIL_CHECK("brokerd (pid " << proc_.pid() << "), which the test did not stop, still ran 20 s after SIGTERM");
	}
	kill_all();
	live_brokers().erase(this);
}

void Broker::start(json config, const BrokerOptions &opts)
{
	if (!config.contains("control"))
		config["control"] = json::object();
	if (!config["control"].contains("path"))
		config["control"]["path"] = control_path();
	write_file(config_path(), config.dump(2) + "\n");
	spawn(opts);
}

void Broker::spawn(const BrokerOptions &opts)
{
	std::vector<std::string> argv = opts.prefix;
	argv.push_back(env("BROKERD"));
	argv.push_back("--config");
	argv.push_back(config_path());

	SpawnOptions so;
	so.env = opts.env;
	so.env.push_back("NOTIFY_SOCKET=" + (opts.notify_socket.empty() ? "@" + notify_name_ : opts.notify_socket));
	so.stderr_path = log_path();
	so.stdout_path = log_path();
	so.listen_fds = opts.listen_fds;
	proc_ = Process::spawn(argv, so);
	if (opts.wait_ready)
		wait_ready(opts.ready_timeout);
}

void Broker::wait_ready(std::chrono::milliseconds timeout)
{
	auto deadline = Clock::now() + timeout;
	for (;;) {
		pollfd p[2] = {{notify_.get(), POLLIN, 0}, {proc_.pidfd(), POLLIN, 0}};
		int r = ::poll(p, 2, ms_left(deadline));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fail_errno("poll");
		if (r == 0)
			fail("brokerd sent no READY=1 within " + std::to_string(timeout.count()) + " ms");
		if (p[0].revents & POLLIN) {
			char buf[4096];
			ssize_t n = ::recv(notify_.get(), buf, sizeof buf, 0);
			if (n > 0) {
				std::istringstream lines(std::string(buf, n));
				std::string line;
				while (std::getline(lines, line))
					if (line == "READY=1")
						return;
			}
			continue;
		}
		if (p[1].revents & POLLIN) {
			auto st = proc_.wait(1s);
			fail("brokerd " + (st ? describe_status(*st) : std::string("died")) + " before READY=1");
		}
	}
}

std::optional<std::string> Broker::next_notify(std::chrono::milliseconds timeout)
{
	pollfd p{notify_.get(), POLLIN, 0};
	auto deadline = Clock::now() + timeout;
	for (;;) {
		int r = ::poll(&p, 1, ms_left(deadline));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return std::nullopt;
		char buf[4096];
		ssize_t n = ::recv(notify_.get(), buf, sizeof buf, 0);
		if (n >= 0)
			return std::string(buf, static_cast<std::size_t>(n));
	}
}

json Broker::status(const std::optional<std::string> &service)
{
	proto::varlink::SyncClient c(control_path(), 10s);
	json params = json::object();
	if (service)
		params["service"] = *service;
	json p = c.call("io.brokerd.Control.Status", params).body.value("parameters", json::object());
	last_worker_pids_.clear();
	for (const auto &svc : member(p, "services"))
		for (const auto &g : member(svc, "generations"))
			for (const auto &i : member(g, "instances"))
				if (i.value("pid", 0) > 0)
					last_worker_pids_.push_back(i["pid"].get<pid_t>());
	note_sessions(last_worker_pids_);
	return p;
}

void Broker::stop(std::chrono::milliseconds timeout)
{
	if (shut_down(timeout))
		check_strays();
	else
		kill_all();
}

bool Broker::shut_down(std::chrono::milliseconds timeout)
{
	REQUIRE(proc_.running());
	auto workers = last_worker_pids_;
	note_all_sessions();
	proc_.signal(SIGTERM);
	auto st = proc_.wait(timeout);
	if (!st) {
		FAIL_CHECK("brokerd did not exit within " << timeout.count() << " ms of SIGTERM");
		return false;
	}
	CHECK_MESSAGE(describe_status(*st) == "exited with 0", "brokerd ", describe_status(*st), " after SIGTERM");
	CHECK_MESSAGE(::access(control_path().c_str(), F_OK) != 0, "control socket file left behind");
	for (pid_t w : workers)
		CHECK_MESSAGE(!process_exists(w), "worker ", w, " outlived brokerd");
	return true;
}

std::string Broker::log() const
{
	return read_file(log_path());
}

std::string Broker::report() const
{
	return "brokerd (pid " + std::to_string(proc_.pid()) + ") stderr:\n" + log();
}

// A snapshot of /proc, and who the test process is.
struct Broker::Scan {
	std::map<pid_t, ProcStat> procs;
	pid_t self = ::getpid();

	Scan()
	{
		for (pid_t p : all_pids())
			if (auto st = proc_stat(p))
				procs[p] = *st;
	}
	const ProcStat *find(pid_t pid) const
	{
		auto it = procs.find(pid);
		return it == procs.end() ? nullptr : &it->second;
	}
};

void Broker::note_sessions(const std::vector<pid_t> &pids)
{
	static const pid_t test_session = ::getsid(0);
	for (pid_t p : pids) {
		pid_t sid = ::getsid(p);
		if (sid <= 0 || sid == test_session || sessions_.count(sid))
			continue;
		auto leader = proc_stat(sid);
		sessions_[sid] = leader ? leader->start : 0;
	}
}

void Broker::note_all_sessions()
{
	if (!proc_.running())
		return;
	std::vector<pid_t> pids;
	for (const auto &p : leftovers(Scan()))
		pids.push_back(p.pid);
	note_sessions(pids);
}

bool Broker::owns_session(pid_t sid, const Scan &scan) const
{
	auto it = sessions_.find(sid);
	if (it == sessions_.end())
		return false;
	// While a session has members its id is not handed out again: a process with that pid now
	// is its leader (same start time), or came after the session ended.
	const ProcStat *leader = scan.find(sid);
	return !leader || leader->start == it->second;
}

std::vector<StrayProcess> Broker::leftovers(const Scan &scan) const
{
	pid_t root = proc_.running() ? proc_.pid() : -1;
	auto orphan_is_mine = [&](const ProcStat &top) {
		if (own_children().count(top.pid))
			return false; // a Process the test holds, and what it started
		for (const Broker *other : live_brokers())
			if (other != this && other->owns_session(top.sid, scan))
				return false;
		return true;
	};
	std::vector<StrayProcess> out;
	for (const auto &[pid, st] : scan.procs) {
		if (pid == scan.self || pid == root || st.dead())
			continue;
		bool mine = owns_session(st.sid, scan);
		const ProcStat *below = &st;
		for (int depth = 0; !mine && depth < 4096; ++depth) {
			if (below->ppid == root) {
				mine = true;
			} else if (below->ppid == scan.self) {
				mine = orphan_is_mine(*below);
				break;
			}
			below = scan.find(below->ppid);
			if (!below)
				break;
		}
		if (mine)
			out.push_back({pid, st.ppid, st.sid, cmdline_text(pid)});
	}
	return out;
}

std::vector<StrayProcess> Broker::reap_strays()
{
	std::vector<StrayProcess> found;
	std::set<pid_t> seen;
	for (int round = 0; round < 20; ++round) {
		auto left = leftovers(Scan());
		if (left.empty())
			break;
		for (const auto &p : left) {
			UniqueFd fd(pidfd_open(p.pid, 0));
			if (!fd)
				continue; // gone meanwhile
			// One that brokerd SIGKILLed on its way out is dying, not left behind.
			bool stray = !dying(p.pid) || !exits_within(fd.get(), 10s);
			if (stray) {
				if (seen.insert(p.pid).second)
					found.push_back(p);
				pidfd_send_signal(fd.get(), SIGKILL, nullptr, 0);
				exits_within(fd.get(), 10s);
			}
			siginfo_t si{};
			::waitid(P_PIDFD, fd.get(), &si, WEXITED | WNOHANG); // ours only once reparented
		}
	}
	// Orphans that died on their own are the test's zombies now.
	Scan scan;
	for (const auto &[pid, st] : scan.procs)
		if (st.ppid == scan.self && st.dead() && !own_children().count(pid))
			::waitpid(pid, nullptr, WNOHANG);
	return found;
}

void Broker::start_again(const BrokerOptions &opts)
{
	REQUIRE_MESSAGE(!proc_.running(), "start_again() while brokerd (pid ", proc_.pid(), ") runs");
	std::string passed;
	for (const auto &[name, fd] : opts.listen_fds)
		passed += " " + name;
	mark_log(log_path(), "starting brokerd again, LISTEN_FDNAMES:" + (passed.empty() ? " (none)" : passed));
	spawn(opts);
}

std::vector<StrayProcess> Broker::kill9()
{
	REQUIRE_MESSAGE(proc_.running(), "kill9() while brokerd does not run");
	note_all_sessions();
	// Whatever descends from brokerd now is what it started; taken before the kill, as it is
	// reparented to the test the moment brokerd dies.
	std::vector<StrayProcess> started = leftovers(Scan());
	last_worker_pids_.clear(); // no longer a running brokerd's: survivors_ has them
	pid_t pid = proc_.pid();
	proc_.kill();
	REQUIRE_MESSAGE(proc_.status().has_value(), "brokerd (pid ", pid, ") not reaped within 10 s of SIGKILL");
	mark_log(log_path(), "brokerd (pid " + std::to_string(pid) + ") " + describe_status(*proc_.status()));
	std::vector<StrayProcess> alive;
	for (const auto &p : started) {
		auto st = proc_stat(p.pid);
		if (!st || st->dead())
			continue;
		// brokerd's stop sentinel is no worker: the next brokerd carries on with it, and the
		// stray checks still find it if it outlives the last stop.
		if (p.cmdline.find(" --sentinel") != std::string::npos)
			continue;
		survivors_[p.pid] = st->start;
		if (auto it = sessions_.find(st->sid); it != sessions_.end())
			survivor_sessions_.insert(*it);
		alive.push_back({p.pid, st->ppid, st->sid, p.cmdline});
	}
	return alive;
}

std::vector<StrayProcess> Broker::end_survivors()
{
	Scan scan;
	auto is_survivor = [&](const ProcStat &st) {
		auto it = survivors_.find(st.pid);
		if (it != survivors_.end() && it->second == st.start)
			return true;
		auto sess = survivor_sessions_.find(st.sid);
		if (sess == survivor_sessions_.end())
			return false;
		const ProcStat *leader = scan.find(st.sid);
		return !leader || leader->start == sess->second; // not a reused session id
	};
	std::vector<StrayProcess> ended;
	for (const auto &[pid, st] : scan.procs) {
		if (st.dead() || !is_survivor(st))
			continue;
		UniqueFd fd(pidfd_open(pid, 0));
		if (!fd)
			continue; // gone meanwhile
		ended.push_back({pid, st.ppid, st.sid, cmdline_text(pid)});
		pidfd_send_signal(fd.get(), SIGKILL, nullptr, 0);
		exits_within(fd.get(), 10s);
		siginfo_t si{};
		::waitid(P_PIDFD, fd.get(), &si, WEXITED | WNOHANG); // ours once reparented
	}
	survivors_.clear();
	survivor_sessions_.clear();
	return ended;
}

void Broker::report_strays(const std::string &what, const std::vector<StrayProcess> &strays)
{
	if (strays.empty())
		return;
	std::string msg = std::to_string(strays.size()) + " stray process" + (strays.size() == 1 ? "" : "es") + " " +
	                  what + " (brokerd pid " + std::to_string(proc_.pid()) + ", the test pid " +
	                  std::to_string(::getpid()) + "), killed now:\n" + describe(strays);
	if (failure_reported() || std::uncaught_exceptions() > 0)
		MESSAGE(msg);
	else
		FAIL_CHECK(msg);
}

void Broker::check_strays()
{
	REQUIRE_MESSAGE(!proc_.running(), "check_strays() while brokerd runs");
	report_strays("outlived brokerd", reap_strays());
}

void Broker::kill_all()
{
	if (proc_.running()) {
		note_all_sessions();
		std::string msg = "brokerd (pid " + std::to_string(proc_.pid()) + ") still ran at the end of the test, killed now";
		if (failure_reported() || std::uncaught_exceptions() > 0)
			MESSAGE(msg);
		else
			FAIL_CHECK(msg);
		proc_.kill();
	}
	report_strays("left at the end of the test", reap_strays());
}

std::string describe(const std::vector<StrayProcess> &strays)
{
	std::string out;
	for (const auto &p : strays)
		out += "  pid " + std::to_string(p.pid) + ", parent " + std::to_string(p.parent) + ", session " +
		       std::to_string(p.session) + ": " + p.cmdline + "\n";
	return out;
}

bool failure_reported()
{
	return failures_in_case > 0;
}

UniqueFd pidfd_of(pid_t pid)
{
	return UniqueFd(pidfd_open(pid, 0));
}

bool exits_within(int pidfd, std::chrono::milliseconds timeout)
{
	return poll_one(pidfd, POLLIN, Clock::now() + timeout);
}

bool reaped(int pidfd)
{
	// A pidfd's fdinfo says "Pid: -1" once the process is released, zombie no more.
	std::istringstream in(read_file("/proc/self/fdinfo/" + std::to_string(pidfd)));
	std::string line;
	while (std::getline(in, line))
		if (line.rfind("Pid:", 0) == 0)
			return std::stoi(line.substr(4)) == -1;
	return false;
}

std::vector<pid_t> session_members(pid_t sid)
{
	std::vector<pid_t> out;
	for (pid_t p : all_pids())
		if (auto st = proc_stat(p); st && st->sid == sid && !st->dead())
			out.push_back(p);
	return out;
}

// ---------------------------------------------------------------------------------------------

// A member of `obj` by reference (value() would return a copy), or an empty array.
const json &member(const json &obj, const char *key)
{
	static const json empty = json::array();
	if (!obj.is_object())
		return empty;
	auto it = obj.find(key);
	return it == obj.end() ? empty : *it;
}

const json *find_named(const json &array, const std::string &name)
{
	if (!array.is_array())
		return nullptr;
	for (const auto &e : array)
		if (e.is_object() && e.value("name", "") == name)
			return &e;
	return nullptr;
}

std::vector<json> instances(const json &status, const std::string &service)
{
	std::vector<json> out;
	const json *svc = find_named(member(status, "services"), service);
	if (!svc)
		return out;
	for (const auto &g : member(*svc, "generations"))
		for (const auto &i : member(g, "instances"))
			out.push_back(i);
	return out;
}

std::vector<pid_t> worker_pids(const json &status, const std::string &service)
{
	std::vector<pid_t> out;
	for (const auto &i : instances(status, service))
		out.push_back(i.value("pid", 0));
	return out;
}

std::uint16_t socket_port(const json &status, const std::string &socket)
{
	const json *s = find_named(member(status, "sockets"), socket);
	if (!s)
		fail("Status has no socket named " + socket + ": " + status.dump());
	std::string addr = s->value("address", "");
	auto colon = addr.rfind(':');
	if (colon == std::string::npos)
		fail("socket " + socket + " has no port in its address: " + addr);
	return static_cast<std::uint16_t>(std::stoi(addr.substr(colon + 1)));
}

std::map<int, std::string> proc_fds(pid_t pid)
{
	std::map<int, std::string> out;
	std::string dir = "/proc/" + std::to_string(pid) + "/fd";
	DIR *d = ::opendir(dir.c_str());
	if (!d)
		fail_errno("opendir " + dir);
	while (dirent *e = ::readdir(d)) {
		if (e->d_name[0] == '.')
			continue;
		char target[512];
		ssize_t n = ::readlinkat(::dirfd(d), e->d_name, target, sizeof target - 1);
		if (n < 0)
			continue; // closed meanwhile
		out[std::atoi(e->d_name)] = std::string(target, n);
	}
	::closedir(d);
	return out;
}

std::size_t fd_count(pid_t pid)
{
	return proc_fds(pid).size();
}

std::string notify_address(pid_t pid)
{
	std::ifstream in("/proc/" + std::to_string(pid) + "/environ");
	std::string entry;
	while (std::getline(in, entry, '\0'))
		if (entry.starts_with("NOTIFY_SOCKET="))
			return entry.substr(14);
	return {};
}

std::vector<std::string> proc_cmdline(pid_t pid)
{
	std::string raw = read_file("/proc/" + std::to_string(pid) + "/cmdline");
	std::vector<std::string> out;
	std::size_t start = 0;
	for (std::size_t i = 0; i < raw.size(); ++i)
		if (raw[i] == '\0') {
			out.push_back(raw.substr(start, i - start));
			start = i + 1;
		}
	return out;
}

bool process_exists(pid_t pid)
{
	std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
	std::string line;
	if (!std::getline(f, line))
		return false;
	auto close = line.rfind(')');
	return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z' &&
	       line[close + 2] != 'X';
}

std::optional<std::uint64_t> socket_inode(const std::string &target)
{
	if (target.rfind("socket:[", 0) != 0 || target.back() != ']')
		return std::nullopt;
	return std::stoull(target.substr(8, target.size() - 9));
}

std::set<std::uint64_t> socket_inodes(pid_t pid)
{
	std::set<std::uint64_t> out;
	for (const auto &[fd, target] : proc_fds(pid))
		if (auto ino = socket_inode(target))
			out.insert(*ino);
	return out;
}

std::map<std::uint64_t, std::uint16_t> tcp_listeners()
{
	std::map<std::uint64_t, std::uint16_t> out;
	for (const char *file : {"/proc/net/tcp", "/proc/net/tcp6"}) {
		std::ifstream f(file);
		std::string line;
		std::getline(f, line); // header
		while (std::getline(f, line)) {
			std::istringstream in(line);
			std::string sl, local, remote, st, queues, timer, retr, uid, timeout;
			std::uint64_t inode = 0;
			in >> sl >> local >> remote >> st >> queues >> timer >> retr >> uid >> timeout >> inode;
			if (st != "0A") // TCP_LISTEN
				continue;
			auto colon = local.rfind(':');
			out[inode] = static_cast<std::uint16_t>(std::stoul(local.substr(colon + 1), nullptr, 16));
		}
	}
	return out;
}

Beacon::Beacon()
{
	int p[2];
	if (::pipe2(p, O_CLOEXEC) < 0)
		fail_errno("pipe2");
	read_.reset(p[0]);
	write_.reset(p[1]);
}

void Beacon::send()
{
	(void)!::write(write_.get(), "x", 1);
}

bool Beacon::receive(std::chrono::milliseconds timeout)
{
	char c;
	return poll_one(read_.get(), POLLIN, Clock::now() + timeout) && ::read(read_.get(), &c, 1) == 1;
}

bool Beacon::from_child(std::chrono::milliseconds timeout)
{
	write_.reset();
	return receive(timeout);
}

std::uint16_t free_port()
{
	UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	sockaddr_in sa{};
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof sa;
	if (!fd || ::bind(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) < 0 ||
	    ::getsockname(fd.get(), reinterpret_cast<sockaddr *>(&sa), &len) < 0)
		fail_errno("free_port");
	return ntohs(sa.sin_port);
}

UniqueFd unix_connect(const std::string &path)
{
	UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
	if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) < 0)
		return {};
	return fd;
}

UniqueFd tcp_connect(std::uint16_t port, std::chrono::milliseconds timeout)
{
	UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd)
		fail_errno("socket");
	sockaddr_in sa{};
	sa.sin_family = AF_INET;
	sa.sin_port = htons(port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) < 0) {
		if (errno != EINPROGRESS)
			fail_errno("connect to 127.0.0.1:" + std::to_string(port));
		if (!poll_one(fd.get(), POLLOUT, Clock::now() + timeout))
			fail("connect to 127.0.0.1:" + std::to_string(port) + ": timed out");
		int err = 0;
		socklen_t len = sizeof err;
		::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			errno = err;
			fail_errno("connect to 127.0.0.1:" + std::to_string(port));
		}
	}
	return fd;
}

// ---------------------------------------------------------------------------------------------

HttpConnection::HttpConnection(std::uint16_t port, std::chrono::milliseconds timeout)
	: fd_(tcp_connect(port, timeout)), timeout_(timeout)
{
}

HttpConnection::HttpConnection(UniqueFd connected, std::chrono::milliseconds timeout)
	: fd_(std::move(connected)), timeout_(timeout)
{
	::fcntl(fd_.get(), F_SETFL, ::fcntl(fd_.get(), F_GETFL) | O_NONBLOCK);
}

void HttpConnection::send_all(const std::string &data)
{
	auto deadline = Clock::now() + timeout_;
	std::size_t off = 0;
	while (off < data.size()) {
		ssize_t n = ::send(fd_.get(), data.data() + off, data.size() - off, MSG_NOSIGNAL);
		if (n > 0) {
			off += n;
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			fail_errno("http send");
		if (!poll_one(fd_.get(), POLLOUT, deadline))
			fail("http send: timed out");
	}
}

bool HttpConnection::fill()
{
	auto deadline = Clock::now() + timeout_;
	for (;;) {
		char buf[16384];
		ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
		if (n > 0) {
			buf_.append(buf, n);
			return true;
		}
		if (n == 0)
			return false;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			fail_errno("http receive");
		if (!poll_one(fd_.get(), POLLIN, deadline))
			fail("http receive: timed out after " + std::to_string(timeout_.count()) + " ms");
	}
}

std::string HttpConnection::read_line()
{
	for (;;) {
		auto eol = buf_.find("\r\n");
		if (eol != std::string::npos) {
			std::string line = buf_.substr(0, eol);
			buf_.erase(0, eol + 2);
			return line;
		}
		if (buf_.size() > 65536)
			fail("http: header line too long");
		if (!fill())
			fail("http: connection closed in the header (got '" + buf_ + "')");
	}
}

HttpResponse HttpConnection::get(const std::string &path, bool keep_alive)
{
	send_all("GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: brokerd-itest\r\nConnection: " +
	         std::string(keep_alive ? "keep-alive" : "close") + "\r\n\r\n");
	HttpResponse r;
	std::string status_line = read_line();
	if (status_line.rfind("HTTP/1.", 0) != 0 || status_line.size() < 12)
		fail("http: bad status line '" + status_line + "'");
	r.status = std::stoi(status_line.substr(9, 3));
	for (;;) {
		std::string line = read_line();
		if (line.empty())
			break;
		auto colon = line.find(':');
		if (colon == std::string::npos)
			fail("http: bad header '" + line + "'");
		std::string name = line.substr(0, colon);
		std::transform(name.begin(), name.end(), name.begin(), ::tolower);
		std::string value = line.substr(colon + 1);
		value.erase(0, value.find_first_not_of(" \t"));
		r.headers[name] = value;
	}
	if (r.headers.count("content-length")) {
		std::size_t len = std::stoul(r.headers["content-length"]);
		while (buf_.size() < len)
			if (!fill())
				fail("http: connection closed in the body");
		r.body = buf_.substr(0, len);
		buf_.erase(0, len);
	} else if (r.headers["transfer-encoding"] == "chunked") {
		for (;;) {
			std::size_t len = std::stoul(read_line(), nullptr, 16);
			while (buf_.size() < len + 2)
				if (!fill())
					fail("http: connection closed in a chunk");
			r.body += buf_.substr(0, len);
			buf_.erase(0, len + 2);
			if (len == 0)
				break;
		}
	} else {
		while (fill()) {
		}
		r.body = std::move(buf_);
		buf_.clear();
	}
	return r;
}

HttpResponse http_get(std::uint16_t port, const std::string &path)
{
	HttpConnection c(port);
	return c.get(path, false);
}

json service(std::vector<std::string> exec, std::vector<std::string> sockets, int instances, const std::string &ready)
{
	return json{{"exec", exec}, {"sockets", sockets}, {"instances", instances}, {"ready", ready}};
}

json tcp_socket()
{
	return json{{"listen", "tcp://127.0.0.1:0"}};
}

std::vector<ProbeRecord> probe_records(const std::string &dir, const std::string &prefix)
{
	std::vector<ProbeRecord> out;
	for (const auto &entry : std::filesystem::directory_iterator(dir)) {
		std::string name = entry.path().filename().string();
		if (name.rfind(prefix + ".", 0) != 0 || name.ends_with(".tmp"))
			continue;
		ProbeRecord rec;
		std::istringstream in(read_file(entry.path().string()));
		std::string kind;
		while (in >> kind) {
			if (kind == "pid") {
				in >> rec.pid;
			} else if (kind == "fd" || kind == "sockname") {
				int fd;
				std::string target;
				in >> fd;
				std::getline(in >> std::ws, target);
				(kind == "fd" ? rec.fds : rec.sockname)[fd] = target;
			} else if (kind == "env") {
				std::string kv;
				std::getline(in >> std::ws, kv);
				auto eq = kv.find('=');
				rec.env[kv.substr(0, eq)] = kv.substr(eq + 1);
			} else if (kind == "end") {
				break;
			}
		}
		out.push_back(std::move(rec));
	}
	std::sort(out.begin(), out.end(), [](const auto &a, const auto &b) { return a.pid < b.pid; });
	return out;
}

} // namespace itest
