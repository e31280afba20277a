// Spawner: plans an instance's process (exactly its fds, environment and credentials), forks and
// execs it, and reads what it reports on its exec-status and output pipes.
#include "supervisor/spawner.hpp"

#include "os/log.hpp"
#include "proto/limits.hpp"
#include "supervisor/process.hpp"
#include "supervisor/supervisor.hpp"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string_view>

extern char **environ;

namespace brokerd {

using namespace process;

namespace {

// execvp's search, done in the parent so a missing program is reported clearly.
std::string resolve_program(const std::string &name)
{
	if (name.find('/') != std::string::npos) {
		if (name[0] == '/')
			return name;
		char cwd[4096];
		if (!::getcwd(cwd, sizeof(cwd)))
			return name;
		return std::string(cwd) + "/" + name;
	}
	const char *path = std::getenv("PATH");
	std::string_view dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
	while (!dirs.empty()) {
		std::size_t colon = dirs.find(':');
		std::string_view dir = dirs.substr(0, colon);
		dirs = colon == std::string_view::npos ? std::string_view{} : dirs.substr(colon + 1);
		if (dir.empty())
			continue;
		std::string candidate = std::string(dir) + "/" + name;
		if (::access(candidate.c_str(), X_OK) == 0)
			return candidate;
	}
	return {};
}

bool inherited_variable(std::string_view entry)
{
	static constexpr std::string_view dropped[] = {
		"LISTEN_FDS=", "LISTEN_PID=", "LISTEN_FDNAMES=", "NOTIFY_SOCKET=", "WATCHDOG_USEC=",
		"WATCHDOG_PID=", "JOURNAL_STREAM=", "BROKER_",
	};
	for (auto d : dropped)
		if (entry.substr(0, d.size()) == d)
			return false;
	return true;
}

// What a child reports on its status pipe when it cannot become the worker: the step, and errno.
enum class ChildStep : int { Setup, Credentials, Chdir, Exec };
struct ChildFailure {
	ChildStep step;
	int err;
};

[[noreturn]] void child_fail(int status_fd, ChildStep step, int err)
{
	ChildFailure f{step, err};
	ssize_t r = ::write(status_fd, &f, sizeof(f));
	(void)r;
	::_exit(127);
}

constexpr std::string_view kListenPid = "LISTEN_PID=";
constexpr int kPipeSize = 1 << 20; // pipe-max-size's default

// Writes `pid` in decimal at `out`, which has room for it, without allocating.
void format_pid(char *out, pid_t pid)
{
	char digits[16];
	int n = 0;
	for (pid_t p = pid; p > 0; p /= 10)
		digits[n++] = static_cast<char>('0' + p % 10);
	while (n > 0)
		*out++ = digits[--n];
	*out = '\0';
}

// In the child, between fork and exec: only async-signal-safe calls, and no allocation (every
// buffer is in the plan). Reports a failure on the status pipe, whose write end is the plan's
// last fd and closes itself at exec.
[[noreturn]] void exec_child(SpawnPlan &plan)
{
	sigset_t all;
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, nullptr);
	for (int sig = 1; sig < NSIG; sig++)
		::signal(sig, SIG_DFL);
	const int top = static_cast<int>(plan.fds.size());
	const int status_fd = top - 1;
	if (plan.go_read >= 0) {
		::close(plan.go_write);
		char go = 0;
		ssize_t r;
		while ((r = ::read(plan.go_read, &go, 1)) < 0 && errno == EINTR) {
		}
		if (r != 1)
			child_fail(plan.fds[static_cast<std::size_t>(status_fd)], ChildStep::Setup, ECANCELED);
	}
	if (::setsid() < 0)
		child_fail(plan.fds[static_cast<std::size_t>(status_fd)], ChildStep::Setup, errno);

	// Lift every source above the target range first, so no dup2 overwrites one.
	for (std::size_t i = 0; i < plan.fds.size(); i++) {
		plan.lifted[i] = ::fcntl(plan.fds[i], F_DUPFD_CLOEXEC, top);
		if (plan.lifted[i] < 0)
			child_fail(plan.fds[static_cast<std::size_t>(status_fd)], ChildStep::Setup, errno);
	}
	int status_lifted = plan.lifted[static_cast<std::size_t>(status_fd)];
	for (int i = 0; i < top; i++) {
		int flags = i == status_fd ? O_CLOEXEC : 0;
		if (::dup3(plan.lifted[static_cast<std::size_t>(i)], i, flags) < 0)
			child_fail(status_lifted, ChildStep::Setup, errno);
	}
	// Exactly stdio, the sockets and the status pipe (which closes at exec) remain.
	::close_range(static_cast<unsigned>(top), ~0u, 0);

	const config::Credentials &creds = plan.creds;
	if (creds.change) {
		if (::setgroups(creds.groups.size(), creds.groups.data()) < 0 || ::setgid(creds.gid) < 0 ||
		    ::setuid(creds.uid) < 0)
			child_fail(status_fd, ChildStep::Credentials, errno);
	}
	if (::chdir(plan.cwd.c_str()) < 0)
		child_fail(status_fd, ChildStep::Chdir, errno);
	if (plan.listen_pid >= 0)
		format_pid(plan.envp[static_cast<std::size_t>(plan.listen_pid)] + kListenPid.size(), ::getpid());
	// The fd limit brokerd was started with, not the one it raised for itself: a worker
	// starts as the service manager would have started it.
	if (plan.nofile.rlim_cur != 0)
		::setrlimit(RLIMIT_NOFILE, &plan.nofile);
	::execve(plan.program.c_str(), plan.argv.data(), plan.envp.data());
	child_fail(status_fd, ChildStep::Exec, errno);
}

// The worker's environment: what it inherits of brokerd's, then what brokerd tells it, then the
// service's own env, which overrides both.
std::vector<std::string> worker_env(const SpawnInputs &in)
{
	const config::ServiceConfig &cfg = in.cfg;
	std::vector<std::string> env;
	for (char **e = in.inherited; e && *e; e++)
		if (inherited_variable(*e))
			env.emplace_back(*e);
	std::string fdnames;
	for (const auto &name : in.socket_names)
		fdnames += (fdnames.empty() ? "" : ":") + name;
	if (!in.socket_names.empty()) {
		env.push_back("LISTEN_FDS=" + std::to_string(in.socket_names.size()));
		env.push_back("LISTEN_FDNAMES=" + fdnames);
	}
	env.push_back("NOTIFY_SOCKET=" + in.notify_address);
	env.push_back("BROKER_SOCKET=" + in.control_path);
	env.push_back("BROKER_TOKEN=" + in.token);
	env.push_back("BROKER_SERVICE=" + in.service);
	env.push_back("BROKER_INSTANCE=" + in.instance);
	env.push_back("BROKER_GENERATION=" + std::to_string(in.generation));
	if (!cfg.version.empty())
		env.push_back("BROKER_VERSION=" + cfg.version);
	const config::Credentials &creds = cfg.accounts.creds;
	if (creds.change && !cfg.user.empty()) {
		std::erase_if(env, [](const std::string &s) {
			return s.starts_with("HOME=") || s.starts_with("USER=") || s.starts_with("LOGNAME=");
		});
		env.push_back("HOME=" + creds.home);
		env.push_back("USER=" + cfg.user);
		env.push_back("LOGNAME=" + cfg.user);
	}
	for (const auto &[k, v] : cfg.env) {
		// Not a capture of k itself: clang before 16 cannot capture a structured binding.
		std::string assignment = k + "=";
		std::erase_if(env, [&](const std::string &s) { return s.starts_with(assignment); });
		env.push_back(assignment + v);
	}
	return env;
}

} // namespace

SpawnPlan plan_spawn(const SpawnInputs &in)
{
	SpawnPlan plan;
	plan.program = in.program;
	plan.args = in.cfg.exec;
	plan.env = worker_env(in);
	if (!in.socket_names.empty()) {
		// Room for any pid's digits, written by the child.
		plan.listen_pid = static_cast<int>(plan.env.size());
		plan.env.push_back(std::string(kListenPid) + std::string(16, '\0'));
	}
	for (auto &a : plan.args)
		plan.argv.push_back(a.data());
	plan.argv.push_back(nullptr);
	for (auto &e : plan.env)
		plan.envp.push_back(e.data());
	plan.envp.push_back(nullptr);
	plan.cwd = in.cfg.cwd.empty() ? "/" : in.cfg.cwd;
	plan.creds = in.cfg.accounts.creds;
	plan.nofile = in.nofile;
	plan.fds = {-1, -1, -1};
	plan.fds.insert(plan.fds.end(), in.socket_fds.begin(), in.socket_fds.end());
	plan.fds.push_back(-1);
	plan.lifted.assign(plan.fds.size(), -1);
	return plan;
}

void Supervisor::hold()
{
	sd_event_source_set_enabled(held_source_.get(), SD_EVENT_ONESHOT);
	changed(); // so that the crash state is written first
}

int Supervisor::held_handler(sd_event_source *, void *userdata)
{
	return guarded("held_handler", [&]() -> int {
		auto *sup = static_cast<Supervisor *>(userdata);
		for (proto::UniqueFd &go : std::exchange(sup->pending_go_, {})) {
			char byte = 'g';
			ssize_t r = ::send(go.get(), &byte, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
			(void)r; // a child that is gone already does not need it
		}
		for (auto &svc : sup->services_)
			for (auto &gen : svc->generations)
				for (auto &inst : gen->instances)
					if (inst->drain_untold && inst->state == InstanceState::Draining && inst->pid)
						sup->tell_drain(*inst);
		return 0;
	});
}

std::string pipe_store_name(std::uint64_t inode)
{
	return std::string(kPipeStorePrefix) + std::to_string(inode);
}

pid_t fork_and_exec(SpawnPlan &plan)
{
	pid_t pid = ::fork();
	if (pid == 0)
		exec_child(plan);
	return pid;
}

std::optional<std::string> open_child_pipes(ChildPipes &p)
{
	for (auto [r, w] : {std::pair{&p.out_r, &p.out_w}, std::pair{&p.err_r, &p.err_w}, std::pair{&p.status_r, &p.status_w}}) {
		int fds[2];
		if (::pipe2(fds, O_CLOEXEC) < 0)
			return "pipe: " + errno_text(errno);
		r->reset(fds[0]);
		w->reset(fds[1]);
	}
	// A socket pair, not a pipe: the go byte is sent with MSG_NOSIGNAL, and a child that died
	// before it makes that an EPIPE, never a SIGPIPE for whoever runs the supervisor.
	int go[2];
	if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, go) < 0)
		return "socketpair: " + errno_text(errno);
	p.go_r.reset(go[0]);
	p.go_w.reset(go[1]);
	p.devnull.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
	if (!p.devnull)
		return "open /dev/null: " + errno_text(errno);
	return std::nullopt;
}

void Supervisor::spawn(Instance &inst)
{
	const config::ServiceConfig &cfg = inst.generation->cfg;
	Service &svc = *inst.service;
	set_state(inst, InstanceState::Starting);
	inst.status_text.clear();
	inst.exit_reason.clear();
	inst.token = random_token();
	inst.timer.reset();
	inst.main_pid = 0;
	inst.main_pid_start = 0;
	inst.session = 0;
	inst.origin = InstanceOrigin::Spawned;
	inst.pidfd.reset();

	auto fail = [&](const std::string &why) {
		log::error("instance " + inst.id + ": cannot start: " + why);
		inst.exit_reason = why;
		inst.token.clear();
		after_exit(inst, false);
	};

	if (cfg.exec.empty())
		return fail("the service has no exec: its workers register themselves");
	SpawnInputs in(cfg);
	in.program = resolve_program(cfg.exec[0]);
	if (in.program.empty())
		return fail("program \"" + cfg.exec[0] + "\" not found in PATH");
	// Resolved when the config was loaded: no lookup here, on the loop.
	if (!cfg.accounts.unknown.empty())
		return fail(cfg.accounts.unknown);
	if (!cfg.accounts.resolved && (!cfg.user.empty() || !cfg.group.empty()))
		return fail("its user and group were never resolved");
	in.inherited = environ;
	for (const Listener *l : svc.sockets) {
		in.socket_names.push_back(l->name);
		in.socket_fds.push_back(l->fd.get());
	}
	in.notify_address = notify_address_;
	in.control_path = control_path_;
	in.token = inst.token;
	in.service = svc.name;
	in.instance = inst.id;
	in.generation = inst.generation->number;
	in.nofile = child_nofile_;
	// Everything the child needs is built here, before fork.
	SpawnPlan plan = plan_spawn(in);
	ChildPipes pipes;
	if (auto why = open_child_pipes(pipes))
		return fail(*why);
	plan.fds[0] = pipes.devnull.get();
	plan.fds[1] = pipes.out_w.get();
	plan.fds[2] = pipes.err_w.get();
	plan.fds.back() = pipes.status_w.get();
	plan.go_read = pipes.go_r.get();
	plan.go_write = pipes.go_w.get();

	pid_t pid = launcher_(plan);
	if (pid < 0)
		return fail("fork: " + errno_text(errno));
	if (auto why = watch_child(inst, pid))
		return fail(*why);
	watch_pipes(inst, pipes);
	// Let go once the crash state names it (hold()).
	pending_go_.push_back(std::move(pipes.go_w));
	hold();

	log::info("instance " + inst.id + ": started pid " + std::to_string(pid) + " (" + plan.program + ")");
	emit(inst, EventKind::Started);
	if (cfg.ready != config::ReadyMode::Exec)
		arm_timer(inst, usec(cfg.start_timeout), start_timeout_handler);
	changed();
}

// A child just forked: watched through its pidfd from now on, or killed when it cannot be.
std::optional<std::string> Supervisor::watch_child(Instance &inst, pid_t pid)
{
	inst.child_source.reset();
	proto::UniqueFd pidfd(pidfd_open(pid));
	sd_event_source *s = nullptr;
	int r = pidfd ? sd_event_add_child_pidfd(event_, &s, pidfd.get(), WEXITED, child_handler, &inst) : -errno;
	if (r < 0) {
		// Only fd exhaustion gets here; never lose a child we cannot watch.
		::kill(pid, SIGKILL);
		::waitpid(pid, nullptr, 0);
		return "cannot watch child: " + errno_text(-r);
	}
	// The source owns the pidfd from here on, so it closes only after sd-event reaped the child.
	sd_event_source_set_child_pidfd_own(s, 1);
	(void)pidfd.release();
	inst.child_source.reset(s);
	inst.pid = pid;
	inst.pid_start = start_time(pid); // our child, not reaped yet: the pid is surely its
	inst.session = pid;
	return std::nullopt;
}

// The parent's ends of a new child's exec-status and output pipes.
void Supervisor::watch_pipes(Instance &inst, ChildPipes &pipes)
{
	sd_event_source *s = nullptr;
	inst.exec_status = std::move(pipes.status_r);
	if (sd_event_add_io(event_, &s, inst.exec_status.get(), EPOLLIN, exec_handler, &inst) >= 0)
		inst.exec_source.reset(s);

	for (auto [pipe, fd, target] :
	     {std::tuple{&inst.out, &pipes.out_r, 1}, std::tuple{&inst.err, &pipes.err_r, 2}}) {
		::fcntl(fd->get(), F_SETFL, O_NONBLOCK);
		// Room for what a worker writes while brokerd is down and restarting (the default is
		// 64 KiB); allocated only as it fills.
		::fcntl(fd->get(), F_SETPIPE_SZ, kPipeSize);
		// The previous process's, if it still had not reached its end: what it wrote is passed on.
		if (pipe->fd)
			forward_output(inst, *pipe, true);
		close_pipe(*pipe);
		pipe->fd = std::move(*fd);
		pipe->partial.clear();
		pipe->target = target;
		if (sd_event_add_io(event_, &s, pipe->fd.get(), EPOLLIN, output_handler, &inst) >= 0)
			pipe->source.reset(s);
		keep_pipe(*pipe);
	}
}

void Supervisor::keep_pipe(OutputPipe &pipe)
{
	struct stat st {};
	if (!keep_fd || ::fstat(pipe.fd.get(), &st) < 0)
		return;
	pipe.inode = st.st_ino;
	pipe.stored = keep_fd(pipe_store_name(pipe.inode), pipe.fd.get());
}

void Supervisor::close_pipe(OutputPipe &pipe)
{
	if (pipe.stored && release_fd)
		release_fd(pipe_store_name(pipe.inode));
	pipe.stored = false;
	pipe.inode = 0;
	pipe.source.reset();
	pipe.fd.reset();
}

int Supervisor::exec_handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("exec_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		inst.supervisor->on_exec_status(inst, false);
		return 0;
	});
}

void Supervisor::on_exec_status(Instance &inst, bool exiting)
{
	if (!inst.exec_status)
		return;
	ChildFailure f{};
	ssize_t n = ::read(inst.exec_status.get(), &f, sizeof(f));
	if (n < 0 && errno == EAGAIN)
		return;
	inst.exec_source.reset();
	inst.exec_status.reset();
	if (n == static_cast<ssize_t>(sizeof(f))) {
		const config::ServiceConfig &cfg = inst.generation->cfg;
		std::string step;
		switch (f.step) {
		case ChildStep::Setup:
			step = "setting up the worker's process";
			break;
		case ChildStep::Credentials:
			step = "switching to user " + (cfg.user.empty() ? std::string("-") : cfg.user) + " and group " +
			       (cfg.group.empty() ? std::string("-") : cfg.group);
			break;
		case ChildStep::Chdir:
			step = "chdir " + (cfg.cwd.empty() ? std::string("/") : cfg.cwd);
			break;
		case ChildStep::Exec:
			step = "exec " + cfg.exec[0];
			break;
		}
		inst.exit_reason = step + ": " + errno_text(f.err);
		log::error("instance " + inst.id + ": " + inst.exit_reason);
		return; // the child's exit follows
	}
	if (!exiting && inst.generation->cfg.ready == config::ReadyMode::Exec && inst.state == InstanceState::Starting)
		instance_ready(inst, "exec");
}

int Supervisor::output_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata)
{
	return guarded("output_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		OutputPipe &pipe = fd == inst.out.fd.get() ? inst.out : inst.err;
		(void)s;
		inst.supervisor->on_output(inst, pipe, (revents & (EPOLLHUP | EPOLLERR)) && !(revents & EPOLLIN));
		return 0;
	});
}

namespace {

// The line of `buf` that begins at `start`: it ends at a newline, or is cut after kMaxOutputLine
// bytes without one, whenever those bytes arrived; none while the rest could still become a line.
struct LineSpan {
	std::size_t end;  // of the line's text
	std::size_t next; // where the line after it begins
};
std::optional<LineSpan> next_line(std::string_view buf, std::size_t start)
{
	constexpr std::size_t max = proto::limits::kMaxOutputLine;
	std::string_view rest = buf.substr(start, max + 1);
	if (std::size_t nl = rest.find('\n'); nl != std::string_view::npos)
		return LineSpan{start + nl, start + nl + 1};
	if (rest.size() > max)
		return LineSpan{start + max, start + max};
	return std::nullopt;
}

// Where the whole lines at the start of `buf` end.
std::size_t whole_lines(std::string_view buf)
{
	std::size_t at = 0;
	while (auto l = next_line(buf, at))
		at = l->next;
	return at;
}

} // namespace

// A pipe's `partial` holds the lines not passed on yet, all of them in last_lines already, then
// the start of the next line. A line that cannot be passed on now (the journal is full) keeps the
// pipe unread until resume_output(): a slow journal slows the worker that writes, and nothing else.
void Supervisor::on_output(Instance &inst, OutputPipe &pipe, bool eof)
{
	// Bounded: at most a few reads per wakeup, so one chatty worker cannot starve the loop.
	for (int round = 0; round < 4 && !eof; round++) {
		char buf[16384];
		ssize_t n = ::read(pipe.fd.get(), buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		if (n <= 0) {
			eof = true;
			break;
		}
		std::size_t at = whole_lines(pipe.partial);
		pipe.partial.append(buf, static_cast<std::size_t>(n));
		while (auto l = next_line(pipe.partial, at)) {
			inst.last_lines.emplace_back(pipe.partial, at, l->end - at);
			if (inst.last_lines.size() > proto::limits::kKeptOutputLines)
				inst.last_lines.pop_front();
			if (output_kept)
				output_kept();
			at = l->next;
		}
	}
	if (eof) {
		// What it wrote last without a newline is a line too, now.
		if (whole_lines(pipe.partial) < pipe.partial.size())
			pipe.partial += '\n';
		forward_output(inst, pipe, true);
		close_pipe(pipe);
		return;
	}
	bool flowing = forward_output(inst, pipe, false);
	if (pipe.source)
		sd_event_source_set_enabled(pipe.source.get(), flowing ? SD_EVENT_ON : SD_EVENT_OFF);
}

bool Supervisor::forward_output(Instance &inst, OutputPipe &pipe, bool last)
{
	std::size_t at = 0;
	bool all = true;
	while (auto l = next_line(pipe.partial, at)) {
		std::string_view line(pipe.partial.data() + at, l->end - at);
		bool taken = true;
		if (output_line)
			taken = output_line(inst, pipe.target, line, last);
		else
			log::worker_line(pipe.target, inst.id, line);
		if (!taken) {
			all = false;
			break;
		}
		at = l->next;
	}
	pipe.partial.erase(0, at);
	return all;
}

void Supervisor::resume_output()
{
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				for (OutputPipe *pipe : {&inst->out, &inst->err}) {
					if (!pipe->fd)
						continue;
					bool flowing = forward_output(*inst, *pipe, false);
					if (flowing && pipe->source)
						sd_event_source_set_enabled(pipe->source.get(), SD_EVENT_ON);
					if (!flowing)
						return; // full again: the rest wait for the next wakeup
				}
}

} // namespace brokerd
