// Spawner: starts an instance's process with exactly its fds, environment and credentials, and reads
// what it reports on its exec-status and output pipes.
#include "supervisor/supervisor.hpp"

#include "control/access.hpp"
#include "os/log.hpp"
#include "proto/limits.hpp"
#include "supervisor/process.hpp"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

extern char **environ;

namespace brokerd {

using json = nlohmann::json;
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

using access::Credentials;
using access::lookup_credentials;

// In the child, between fork and exec: only async-signal-safe calls. Reports errno on the
// status pipe, whose write end sits at fd `status_fd` and closes itself at exec.
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

} // namespace

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
	inst.session = 0;
	inst.forked = false;
	inst.rollout_drained = false;
	inst.pidfd.reset();

	auto fail = [&](const std::string &why) {
		log::error("instance " + inst.id + ": cannot start: " + why);
		inst.exit_reason = why;
		inst.token.clear();
		after_exit(inst, false);
	};

	if (cfg.exec.empty())
		return fail("the service has no exec: its workers register themselves");
	std::string program = resolve_program(cfg.exec[0]);
	if (program.empty())
		return fail("program \"" + cfg.exec[0] + "\" not found in PATH");

	Credentials creds;
	try {
		creds = lookup_credentials(cfg);
	} catch (const std::exception &e) {
		return fail(e.what());
	}

	// Everything the child needs is built here, before fork.
	std::vector<std::string> env_strings;
	for (char **e = environ; *e; e++)
		if (inherited_variable(*e))
			env_strings.emplace_back(*e);
	std::string fdnames;
	for (const Listener *l : svc.sockets)
		fdnames += (fdnames.empty() ? "" : ":") + l->name;
	std::size_t nsockets = svc.sockets.size();
	if (nsockets > 0) {
		env_strings.push_back("LISTEN_FDS=" + std::to_string(nsockets));
		env_strings.push_back("LISTEN_FDNAMES=" + fdnames);
	}
	env_strings.push_back("NOTIFY_SOCKET=" + notify_address_);
	env_strings.push_back("BROKER_SOCKET=" + control_path_);
	env_strings.push_back("BROKER_TOKEN=" + inst.token);
	env_strings.push_back("BROKER_SERVICE=" + svc.name);
	env_strings.push_back("BROKER_INSTANCE=" + inst.id);
	env_strings.push_back("BROKER_GENERATION=" + std::to_string(inst.generation->number));
	if (!cfg.version.empty())
		env_strings.push_back("BROKER_VERSION=" + cfg.version);
	if (creds.change && !cfg.user.empty()) {
		std::erase_if(env_strings, [](const std::string &s) {
			return s.starts_with("HOME=") || s.starts_with("USER=") || s.starts_with("LOGNAME=");
		});
		env_strings.push_back("HOME=" + creds.home);
		env_strings.push_back("USER=" + cfg.user);
		env_strings.push_back("LOGNAME=" + cfg.user);
	}
	for (const auto &[k, v] : cfg.env) {
		// Not a capture of k itself: clang before 16 cannot capture a structured binding.
		std::string assignment = k + "=";
		std::erase_if(env_strings, [&](const std::string &s) { return s.starts_with(assignment); });
		env_strings.push_back(assignment + v);
	}
	char listen_pid[32] = "LISTEN_PID=";
	std::vector<char *> envp;
	for (auto &s : env_strings)
		envp.push_back(s.data());
	if (nsockets > 0)
		envp.push_back(listen_pid);
	envp.push_back(nullptr);
	std::vector<std::string> args = cfg.exec;
	std::vector<char *> argv;
	for (auto &a : args)
		argv.push_back(a.data());
	argv.push_back(nullptr);
	std::string cwd = cfg.cwd.empty() ? "/" : cfg.cwd;

	int out_pipe[2], err_pipe[2], status_pipe[2];
	if (::pipe2(out_pipe, O_CLOEXEC) < 0)
		return fail("pipe: " + errno_text(errno));
	proto::UniqueFd out_r(out_pipe[0]), out_w(out_pipe[1]);
	if (::pipe2(err_pipe, O_CLOEXEC) < 0)
		return fail("pipe: " + errno_text(errno));
	proto::UniqueFd err_r(err_pipe[0]), err_w(err_pipe[1]);
	if (::pipe2(status_pipe, O_CLOEXEC) < 0)
		return fail("pipe: " + errno_text(errno));
	proto::UniqueFd status_r(status_pipe[0]), status_w(status_pipe[1]);
	proto::UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
	if (!devnull)
		return fail("open /dev/null: " + errno_text(errno));

	// Sources to move into place: 0, 1, 2, then the sockets at 3.., then the status pipe.
	std::vector<int> sources = {devnull.get(), out_w.get(), err_w.get()};
	for (const Listener *l : svc.sockets)
		sources.push_back(l->fd.get());
	sources.push_back(status_w.get());
	const int status_fd = static_cast<int>(sources.size()) - 1;

	pid_t pid = ::fork();
	if (pid < 0)
		return fail("fork: " + errno_text(errno));
	if (pid == 0) {
		sigset_t all;
		sigemptyset(&all);
		sigprocmask(SIG_SETMASK, &all, nullptr);
		for (int sig = 1; sig < NSIG; sig++)
			::signal(sig, SIG_DFL);
		if (::setsid() < 0)
			child_fail(status_w.get(), ChildStep::Setup, errno);

		// Lift every source above the target range first, so no dup2 overwrites one.
		const int top = static_cast<int>(sources.size());
		std::vector<int> lifted(sources.size());
		for (std::size_t i = 0; i < sources.size(); i++) {
			lifted[i] = ::fcntl(sources[i], F_DUPFD_CLOEXEC, top);
			if (lifted[i] < 0)
				child_fail(status_w.get(), ChildStep::Setup, errno);
		}
		int status_lifted = lifted[static_cast<std::size_t>(status_fd)];
		for (int i = 0; i < top; i++) {
			int flags = i == status_fd ? O_CLOEXEC : 0;
			if (::dup3(lifted[static_cast<std::size_t>(i)], i, flags) < 0)
				child_fail(status_lifted, ChildStep::Setup, errno);
		}
		// Exactly stdio, the sockets and the status pipe (which closes at exec) remain.
		::close_range(static_cast<unsigned>(top), ~0u, 0);

		if (creds.change) {
			if (::setgroups(creds.groups.size(), creds.groups.data()) < 0 || ::setgid(creds.gid) < 0 ||
			    ::setuid(creds.uid) < 0)
				child_fail(status_fd, ChildStep::Credentials, errno);
		}
		if (::chdir(cwd.c_str()) < 0)
			child_fail(status_fd, ChildStep::Chdir, errno);
		if (nsockets > 0) {
			// LISTEN_PID=<our pid>, formatted without allocating.
			char digits[16];
			int n = 0;
			for (pid_t p = ::getpid(); p > 0; p /= 10)
				digits[n++] = static_cast<char>('0' + p % 10);
			char *w = listen_pid + std::strlen(listen_pid);
			while (n > 0)
				*w++ = digits[--n];
			*w = '\0';
		}
		// The fd limit brokerd was started with, not the one it raised for itself: a worker
		// starts as the service manager would have started it.
		if (child_nofile_.rlim_cur != 0)
			::setrlimit(RLIMIT_NOFILE, &child_nofile_);
		::execve(program.c_str(), argv.data(), envp.data());
		child_fail(status_fd, ChildStep::Exec, errno);
	}

	inst.child_source.reset();
	proto::UniqueFd pidfd(pidfd_open(pid));
	sd_event_source *s = nullptr;
	int r = pidfd ? sd_event_add_child_pidfd(event_, &s, pidfd.get(), WEXITED, child_handler, &inst) : -errno;
	if (r < 0) {
		// Only fd exhaustion gets here; never lose a child we cannot watch.
		::kill(pid, SIGKILL);
		::waitpid(pid, nullptr, 0);
		return fail("cannot watch child: " + errno_text(-r));
	}
	// The source owns the pidfd from here on, so it closes only after sd-event reaped the child.
	sd_event_source_set_child_pidfd_own(s, 1);
	(void)pidfd.release();
	inst.child_source.reset(s);
	inst.pid = pid;
	inst.session = pid;

	inst.exec_status = std::move(status_r);
	if (sd_event_add_io(event_, &s, inst.exec_status.get(), EPOLLIN, exec_handler, &inst) >= 0)
		inst.exec_source.reset(s);

	for (auto [pipe, fd, target] : {std::tuple{&inst.out, &out_r, 1}, std::tuple{&inst.err, &err_r, 2}}) {
		::fcntl(fd->get(), F_SETFL, O_NONBLOCK);
		pipe->fd = std::move(*fd);
		pipe->partial.clear();
		pipe->target = target;
		if (sd_event_add_io(event_, &s, pipe->fd.get(), EPOLLIN, output_handler, &inst) >= 0)
			pipe->source.reset(s);
	}

	log::info("instance " + inst.id + ": started pid " + std::to_string(pid) + " (" + program + ")");
	emit(inst, "started");
	if (cfg.ready != config::ReadyMode::Exec)
		arm_timer(inst, static_cast<std::uint64_t>(cfg.start_timeout.count()) * kUsecPerMsec,
		          start_timeout_handler);
	changed();
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
		pipe.partial.append(buf, static_cast<std::size_t>(n));
		std::size_t start = 0;
		for (;;) {
			std::size_t nl = pipe.partial.find('\n', start);
			bool cut = nl == std::string::npos && pipe.partial.size() - start >= proto::limits::kMaxOutputLine;
			if (nl == std::string::npos && !cut)
				break;
			std::size_t end = cut ? start + proto::limits::kMaxOutputLine : nl;
			std::string_view line(pipe.partial.data() + start, end - start);
			log::worker_line(pipe.target, inst.id, line);
			inst.last_lines.emplace_back(line);
			if (inst.last_lines.size() > proto::limits::kKeptOutputLines)
				inst.last_lines.pop_front();
			start = cut ? end : nl + 1;
		}
		pipe.partial.erase(0, start);
	}
	if (eof) {
		if (!pipe.partial.empty())
			log::worker_line(pipe.target, inst.id, pipe.partial);
		pipe.partial.clear();
		pipe.source.reset();
		pipe.fd.reset();
	}
}

} // namespace brokerd
