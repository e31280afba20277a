// Supervisor: spawns instances with exactly their fds, tracks them with pidfds, drains them.
#include "supervisor/supervisor.hpp"

#include "control/access.hpp"
#include "daemon/state.hpp"

#include "proto/limits.hpp"
#include "proto/errors.hpp"
#include "os/log.hpp"
#include "proto/status_text.hpp"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

extern char **environ;

namespace brokerd {

using json = nlohmann::json;

namespace {

constexpr std::uint64_t kUsecPerMsec = 1000;

std::string errno_text(int e)
{
	return std::strerror(e);
}

int pidfd_open(pid_t pid)
{
	return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

int pidfd_send_signal(int pidfd, int sig)
{
	return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

std::string random_token()
{
	unsigned char bytes[proto::limits::kTokenBytes];
	std::size_t got = 0;
	while (got < sizeof(bytes)) {
		ssize_t n = ::getrandom(bytes + got, sizeof(bytes) - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			throw std::runtime_error("getrandom: " + errno_text(errno));
		got += static_cast<std::size_t>(n);
	}
	static const char hex[] = "0123456789abcdef";
	std::string t;
	for (unsigned char b : bytes) {
		t.push_back(hex[b >> 4]);
		t.push_back(hex[b & 15]);
	}
	return t;
}

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

std::string describe_exit(const siginfo_t &si)
{
	if (si.si_code == CLD_EXITED)
		return "exited with status " + std::to_string(si.si_status);
	const char *name = sigabbrev_np(si.si_status);
	return std::string("killed by SIG") + (name ? name : std::to_string(si.si_status).c_str());
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

const char *state_name(InstanceState s)
{
	switch (s) {
	case InstanceState::Starting:
		return "starting";
	case InstanceState::Ready:
		return "ready";
	case InstanceState::Draining:
		return "draining";
	case InstanceState::Exited:
		return "exited";
	case InstanceState::Failed:
		return "failed";
	}
	return "unknown";
}

Supervisor::Supervisor(sd_event *event, const std::list<Listener> &listeners, std::string control_path)
	: event_(event), listeners_(listeners), control_path_(std::move(control_path))
{
	router_.on_report = [this](const HandoffRouter::Report &r) { handoff_report(r); };
}

Supervisor::~Supervisor() = default;

const Listener *Supervisor::find_listener(std::string_view name) const
{
	for (const auto &l : listeners_)
		if (l.name == name)
			return &l;
	return nullptr;
}

Service *Supervisor::find_service(std::string_view name)
{
	for (auto &svc : services_)
		if (svc->name == name)
			return svc.get();
	return nullptr;
}

bool Supervisor::uses_listener(const Listener &l) const
{
	for (const auto &svc : services_)
		for (const Listener *s : svc->sockets)
			if (s == &l)
				return true;
	return false;
}

void Supervisor::add_service(const config::ServiceConfig &cfg)
{
	if (shutting_down_)
		throw std::runtime_error("service " + cfg.name + ": brokerd is shutting down");
	auto svc = std::make_unique<Service>();
	svc->name = cfg.name;
	svc->cfg = cfg;
	for (const auto &name : cfg.sockets) {
		const Listener *l = find_listener(name);
		if (!l)
			throw std::runtime_error("service " + cfg.name + ": no socket named \"" + name + "\"");
		svc->sockets.push_back(l);
	}
	Service &ref = *svc;
	services_.push_back(std::move(svc));
	if (cfg.exec.empty())
		return;
	Generation &gen = new_generation(ref, cfg);
	ref.current = &gen;
	log::info("service " + ref.name + " gen " + std::to_string(gen.number) + ": starting " +
	          std::to_string(cfg.instances) + " instance(s)");
	for (unsigned i = 0; i < cfg.instances; i++)
		spawn(add_instance(gen));
}

void Supervisor::remove_service(const std::string &name)
{
	Service *svc = find_service(name);
	if (!svc || svc->removing)
		return;
	svc->removing = true;
	log::notice("service " + name + ": removed from the config, draining it");
	// Nobody may be left waiting on a service that is going away.
	if (auto up = std::move(svc->upgrade)) {
		json err = {{"service", name}, {"generation", up->to->number},
		            {"reason", "the service was removed from the config"}, {"output", json::array()}};
		for (Observer *o : up->observers)
			o->failed(proto::errors::kUpgradeFailed, err);
	}
	for (Observer *o : std::exchange(svc->start_waiters, {}))
		o->failed(proto::errors::kStartFailed, {{"service", name}, {"reason", "the service was removed from the config"}});
	for (Observer *o : std::exchange(svc->stop_waiters, {}))
		o->finished(json::object());
	for (auto &gen : svc->generations)
		for (auto &inst : gen->instances) {
			inst->retired = true;
			drain(*inst);
		}
	schedule_prune();
	changed();
}

Generation &Supervisor::new_generation(Service &svc, const config::ServiceConfig &cfg)
{
	auto gen = std::make_unique<Generation>();
	gen->service = &svc;
	gen->number = svc.next_generation++;
	gen->cfg = cfg;
	Generation &ref = *gen;
	svc.generations.push_back(std::move(gen));
	return ref;
}

Instance &Supervisor::add_instance(Generation &gen)
{
	auto inst = std::make_unique<Instance>();
	inst->supervisor = this;
	inst->service = gen.service;
	inst->generation = &gen;
	inst->index = gen.next_index++;
	inst->id = gen.service->name + "/" + std::to_string(gen.number) + "/" + std::to_string(inst->index);
	gen.instances.push_back(std::move(inst));
	return *gen.instances.back();
}

void Supervisor::set_state(Instance &inst, InstanceState s)
{
	inst.state = s;
	inst.since = now_usec(CLOCK_REALTIME);
}

void Supervisor::arm_timer(Instance &inst, std::uint64_t usec_from_now,
                           int (*cb)(sd_event_source *, std::uint64_t, void *))
{
	sd_event_source *s = nullptr;
	std::uint64_t when = now_usec(CLOCK_MONOTONIC) + usec_from_now;
	int r = sd_event_add_time(event_, &s, CLOCK_MONOTONIC, when, 1000, cb, &inst);
	if (r < 0) {
		log::error("instance " + inst.id + ": cannot add timer: " + errno_text(-r));
		inst.timer.reset();
		return;
	}
	inst.timer.reset(s);
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

int Supervisor::child_handler(sd_event_source *, const siginfo_t *si, void *userdata)
{
	return guarded("child_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		siginfo_t copy = *si;
		inst.supervisor->on_exit(inst, copy);
		return 0;
	});
}

void Supervisor::on_exit(Instance &inst, const siginfo_t &si)
{
	// Learn whether exec failed before judging the exit, and flush what the worker printed. A
	// forking server names its main process (MAINPID=) just before its first one exits: what the
	// notify socket holds is read first, whichever the event loop saw first.
	on_exec_status(inst, true);
	if (read_notifications)
		read_notifications();
	for (OutputPipe *p : {&inst.out, &inst.err})
		if (p->fd)
			on_output(inst, *p, false);
	if (inst.main_pid && si.si_code == CLD_EXITED && si.si_status == 0 && ::kill(inst.main_pid, 0) == 0) {
		// A forking server: its first process is done, the main pid it named serves on.
		log::info("instance " + inst.id + ": pid " + std::to_string(inst.pid) + " exited, main pid " +
		          std::to_string(inst.main_pid) + " continues");
		inst.pid = std::exchange(inst.main_pid, 0);
		inst.forked = true; // watched through its pidfd from now on, like a registered worker
		sd_event_source *s = nullptr;
		if (sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst) >= 0) {
			inst.child_source.reset(s);
			// Its exec succeeded, as it ran to the end: "exec" readiness, which waited for the
			// exec status, may have seen the exit first.
			if (inst.generation->cfg.ready == config::ReadyMode::Exec && inst.state == InstanceState::Starting)
				instance_ready(inst, "exec");
			return;
		}
	}
	// Leftover processes of the instance's session go with it: no worker is orphaned.
	::kill(-inst.session, SIGKILL);

	std::string how = describe_exit(si);
	bool clean = si.si_code == CLD_EXITED && si.si_status == 0;
	if (inst.exit_reason.empty())
		inst.exit_reason = how;
	// Expected only when brokerd asked it to go: a worker that drains on its own (STOPPING=1) and
	// exits is judged like any other exit.
	bool expected = inst.retired || shutting_down_;
	std::string pid = std::to_string(inst.pid);
	if (expected)
		log::info("instance " + inst.id + ": pid " + pid + " " + how);
	else
		log::warning("instance " + inst.id + ": pid " + pid + " " + how + " unexpectedly");
	after_exit(inst, clean || expected);
}

void Supervisor::after_exit(Instance &inst, bool clean)
{
	bool expected = inst.retired || shutting_down_;
	if (inst.external) {
		// A registered instance is never restarted by us: whoever started it decides.
		inst.retired = true;
		inst.child_source.reset();
		inst.pidfd.reset();
	} else if (inst.forked) {
		// A forking server's main process: the slot restarts under its policy like any other.
		inst.child_source.reset();
		inst.pidfd.reset();
		inst.forked = false;
	}
	inst.timer.reset();
	inst.events = nullptr;
	inst.token.clear();
	inst.exec_source.reset();
	inst.exec_status.reset();
	set_state(inst, expected || clean ? InstanceState::Exited : InstanceState::Failed);

	// Feed the rollout first so the event already shows the new counts.
	Service &svc = *inst.service;
	Upgrade *up = svc.upgrade.get();
	std::optional<RolloutStep> step;
	if (up && inst.generation == up->to && up->rollout.phase() == RolloutPhase::Rolling && !expected) {
		// A new instance that dies before the upgrade is done fails the upgrade.
		up->failed_instance = inst.id;
		up->failed_output.assign(inst.last_lines.begin(), inst.last_lines.end());
		inst.retired = true;
		step = up->rollout.fail("instance " + inst.id + " " + inst.exit_reason);
	} else if (up && inst.generation == up->from && up->rollout.phase() == RolloutPhase::Rolling) {
		// Only the exit of one it drained counts as such. A registered worker gone on its own is
		// one fewer to drain (a spawned one restarts, or its empty slot is drained later).
		if (inst.rollout_drained)
			step = up->rollout.old_exited();
		else if (inst.external)
			step = up->rollout.old_lost();
	}
	emit(inst, expected || clean ? "exited" : "failed", inst.exit_reason);
	inst.pid = 0;

	if (step) {
		apply(svc, *step);
	} else if (!expected && !shutting_down_ && !inst.retired && !svc.stopped) {
		const auto policy = inst.generation->cfg.restart;
		bool restart = policy == config::RestartPolicy::Always ||
		               (policy == config::RestartPolicy::OnFailure && !clean);
		if (restart)
			schedule_restart(inst);
		if (up && inst.restored && inst.generation == up->from && up->rollout.phase() == RolloutPhase::RollingBack) {
			// A refill that failed must not hold the rollback open: it ends short, and the slot
			// goes on under its restart policy.
			log::error("instance " + inst.id + ": could not be restored, the rollback ends short of full capacity");
			inst.restored = false;
			apply(svc, up->rollout.restored_ready());
		}
	}
	if (inst.state != InstanceState::Starting)
		inst.retired = inst.retired || inst.generation != svc.current || svc.removing;
	schedule_prune();
	check_waiters(svc);
	changed();
}

void Supervisor::schedule_restart(Instance &inst)
{
	// A start timeout is a failure like a crash: a worker that never gets ready is stopped too.
	const config::ServiceConfig &cfg = inst.generation->cfg;
	std::uint64_t start_timeout = cfg.ready == config::ReadyMode::Exec
	                                      ? 0
	                                      : static_cast<std::uint64_t>(cfg.start_timeout.count()) * kUsecPerMsec;
	RestartBackoff::Decision d = inst.backoff.failed(now_usec(CLOCK_MONOTONIC), start_timeout);
	if (d.crash_loop) {
		std::string msg = "crash loop (" + std::to_string(d.failures) + " failures within " +
		                  std::to_string(d.window / 1'000'000) + "s), not restarting; last: " + inst.exit_reason;
		log::error("instance " + inst.id + ": " + msg);
		emit(inst, "crash-loop", msg);
		return;
	}
	log::info("instance " + inst.id + ": restarting in " + std::to_string(d.delay / kUsecPerMsec) + "ms");
	// The slot counts as starting again, so readiness waits for it.
	set_state(inst, InstanceState::Starting);
	arm_timer(inst, d.delay, restart_handler);
}

int Supervisor::restart_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("restart_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		if (!inst.supervisor->shutting_down_ && !inst.retired)
			inst.supervisor->spawn(inst);
		return 0;
	});
}

int Supervisor::start_timeout_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("start_timeout_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		if (inst.state != InstanceState::Starting || !inst.pid)
			return 0;
		auto secs = std::chrono::duration_cast<std::chrono::milliseconds>(inst.generation->cfg.start_timeout).count();
		std::string why = "was not ready within the start timeout (" + std::to_string(secs) + "ms)";
		log::error("instance " + inst.id + ": " + why + ", sending SIGKILL");
		inst.supervisor->kill_instance(inst, std::move(why));
		return 0;
	});
}

int Supervisor::drain_timeout_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("drain_timeout_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		if (!inst.pid)
			return 0;
		Supervisor &sup = *inst.supervisor;
		bool budget = sup.shutting_down_ && now_usec(CLOCK_MONOTONIC) >= sup.shutdown_deadline_;
		log::warning("instance " + inst.id + (budget ? ": shutdown timeout" : ": drain timeout") + ", sending SIGKILL");
		sup.kill_instance(inst, budget ? "killed at the shutdown timeout" : "killed at the drain timeout");
		return 0;
	});
}

void Supervisor::kill_instance(Instance &inst, std::string reason)
{
	inst.exit_reason = std::move(reason);
	signal(inst, SIGKILL);
	// With MAINPID= named, that went to the main process: its session goes too, the first
	// process included, whose exit is what is watched until then.
	if (!inst.external)
		::kill(-inst.session, SIGKILL);
}

void Supervisor::signal(Instance &inst, int sig)
{
	if (!inst.pid || !inst.child_source)
		return;
	int pidfd = inst.external || inst.forked || inst.main_pid ? inst.pidfd.get()
	                                                          : sd_event_source_get_child_pidfd(inst.child_source.get());
	if (pidfd < 0)
		return;
	if (pidfd_send_signal(pidfd, sig) < 0 && errno != ESRCH)
		log::warning("instance " + inst.id + ": cannot send signal: " + errno_text(errno) + ", ignoring");
}

void Supervisor::drain(Instance &inst, std::optional<config::Duration> timeout)
{
	if (!inst.pid) {
		// Not running (failed, or waiting to restart): nothing to drain, and no restart either.
		inst.timer.reset();
		if (inst.state == InstanceState::Starting)
			set_state(inst, InstanceState::Exited);
		inst.retired = true;
		schedule_prune();
		return;
	}
	if (inst.state == InstanceState::Draining)
		return;
	const auto &cfg = inst.generation->cfg;
	const std::uint64_t usec = drain_time(timeout.value_or(cfg.drain_timeout));
	set_state(inst, InstanceState::Draining);
	bool told = inst.events && inst.events->send_event({{"event", "drain"}, {"timeout_ms", usec / kUsecPerMsec}});
	if (told) {
		log::info("instance " + inst.id + ": drain requested");
	} else {
		const char *name = sigabbrev_np(cfg.drain_signal);
		log::info("instance " + inst.id + ": draining with SIG" + (name ? name : std::to_string(cfg.drain_signal)));
		signal(inst, cfg.drain_signal);
	}
	emit(inst, "draining");
	arm_timer(inst, usec, drain_timeout_handler);
}

std::uint64_t Supervisor::drain_time(config::Duration timeout) const
{
	std::uint64_t usec = static_cast<std::uint64_t>(timeout.count()) * kUsecPerMsec;
	if (!shutting_down_)
		return usec;
	std::uint64_t now = now_usec(CLOCK_MONOTONIC);
	return std::min(usec, shutdown_deadline_ > now ? shutdown_deadline_ - now : 0);
}

void Supervisor::instance_ready(Instance &inst, std::string_view how)
{
	if (inst.state != InstanceState::Starting || !inst.pid)
		return;
	set_state(inst, InstanceState::Ready);
	inst.backoff.ready(now_usec(CLOCK_MONOTONIC));
	inst.timer.reset();
	log::info("instance " + inst.id + ": ready (" + std::string(how) + ")");
	Service &svc = *inst.service;
	Upgrade *up = svc.upgrade.get();
	std::optional<RolloutStep> step;
	if (up && !inst.retired && inst.generation == up->to)
		step = up->rollout.new_ready();
	else if (up && inst.generation == up->from && inst.restored)
		step = up->rollout.restored_ready();
	emit(inst, "ready");
	if (shutting_down_ || inst.retired || svc.stopped)
		drain(inst);
	else if (step)
		apply(svc, *step);
	check_waiters(svc);
	changed();
}

std::optional<std::string> Supervisor::instance_status(Instance &inst, std::string text)
{
	if (auto why = proto::check_status_text(text))
		return why;
	inst.status_text = std::move(text);
	return std::nullopt;
}

void Supervisor::instance_stopping(Instance &inst)
{
	if (inst.state == InstanceState::Ready || inst.state == InstanceState::Starting) {
		set_state(inst, InstanceState::Draining);
		emit(inst, "draining", "STOPPING=1");
		arm_timer(inst, static_cast<std::uint64_t>(inst.generation->cfg.drain_timeout.count()) * kUsecPerMsec,
		          drain_timeout_handler);
		changed();
	}
}

void Supervisor::instance_main_pid(Instance &inst, pid_t pid)
{
	// Only a process of the instance's own session may become its main process. The pidfd is
	// opened first, and the process it names is still alive after the session check: a pid
	// reused in between is never adopted.
	proto::UniqueFd pidfd(pid > 0 && !inst.external ? pidfd_open(pid) : -1);
	if (!pidfd || ::getsid(pid) != inst.session || pidfd_send_signal(pidfd.get(), 0) < 0) {
		log::client(log::Level::Warning, "instance " + inst.id + ": MAINPID=" + std::to_string(pid) +
		                                     " is not a process of its session, ignoring");
		return;
	}
	if (inst.forked) {
		// Its main process handed over to another (a binary upgrade): watch that one instead.
		sd_event_source *s = nullptr;
		int r = sd_event_add_io(event_, &s, pidfd.get(), EPOLLIN, external_handler, &inst);
		if (r < 0) {
			log::warning("instance " + inst.id + ": MAINPID=" + std::to_string(pid) + ": " + errno_text(-r) + ", ignoring");
			return;
		}
		inst.child_source.reset(s);
		inst.pid = pid;
	} else {
		inst.main_pid = pid == inst.pid ? 0 : pid;
	}
	inst.pidfd = std::move(pidfd);
	log::info("instance " + inst.id + ": main pid is now " + std::to_string(pid));
}

bool Supervisor::attach_events(Instance &inst, EventSink *sink)
{
	if (inst.events)
		return false;
	inst.events = sink;
	inst.counted = sink;
	// A drain decided before the stream opened must still reach the worker.
	if (inst.state == InstanceState::Draining)
		sink->send_event({{"event", "drain"}, {"timeout_ms", inst.generation->cfg.drain_timeout.count()}});
	return true;
}

void Supervisor::detach_events(EventSink *sink)
{
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances) {
				if (inst->events == sink)
					inst->events = nullptr;
				if (inst->counted == sink)
					inst->counted = nullptr;
			}
	// What it was sent and did not acknowledge goes back to the senders.
	router_.forget(*sink);
}

Instance *Supervisor::find_by_sink(const EventSink *sink)
{
	if (!sink)
		return nullptr;
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->counted == sink)
					return inst.get();
	return nullptr;
}

// The ready instances of the generation that succeeds the sender's and said accept_handoff:
// during an upgrade the one being rolled out, otherwise the current one, if newer.
std::vector<EventSink *> Supervisor::handoff_targets(const Instance &sender) const
{
	const Service &svc = *sender.service;
	const Generation *next = svc.upgrade ? svc.upgrade->to : svc.current;
	std::vector<EventSink *> out;
	if (!next || next->number <= sender.generation->number || svc.removing)
		return out;
	for (const auto &inst : next->instances)
		if (inst->state == InstanceState::Ready && inst->accepts_handoff && inst->events && !inst->retired)
			out.push_back(inst->events);
	return out;
}

void Supervisor::handoff(Instance &sender, EventSink &sink, std::uint64_t batch, std::vector<HandoffItem> items,
                         std::uint64_t remaining)
{
	Service &svc = *sender.service;
	std::uint64_t n = items.size();
	sender.handoff.handed += n;
	sender.handoff_remaining = remaining;
	svc.handoff.handed += n;
	if (svc.upgrade)
		svc.upgrade->handoff.handed += n;
	std::vector<EventSink *> targets = handoff_targets(sender);
	router_.submit(svc.name, sink, batch, std::move(items), targets);
	// The router may have closed connections on the way: look the service up again.
	if (Service *s = find_service(svc.name))
		handoff_progress(*s);
}

std::optional<std::string> Supervisor::handoff_received(EventSink &sink, std::uint64_t batch,
                                                        const std::vector<std::uint64_t> &refused)
{
	return router_.received(sink, batch, refused);
}

void Supervisor::handoff_report(const HandoffRouter::Report &r)
{
	Service *svc = find_service(r.service);
	if (!svc)
		return;
	svc->handoff.received += r.landed;
	svc->handoff.returned += r.returned;
	if (svc->upgrade) {
		svc->upgrade->handoff.received += r.landed;
		svc->upgrade->handoff.returned += r.returned;
	}
	if (Instance *to = find_by_sink(r.receiver))
		to->handoff.received += r.landed;
	if (Instance *from = find_by_sink(r.sender))
		from->handoff.returned += r.returned;
	if (r.receiver)
		handoff_progress(*svc);
}

json Supervisor::handoff_json(const Service &svc, const HandoffCounts &c) const
{
	std::uint64_t remaining = 0;
	for (const auto &gen : svc.generations)
		for (const auto &inst : gen->instances)
			if (inst->state != InstanceState::Exited && inst->state != InstanceState::Failed)
				remaining += inst->handoff_remaining;
	return {{"handed", c.handed}, {"received", c.received}, {"returned", c.returned}, {"expected", c.handed + remaining}};
}

// At most ten progress events a second while connections move, and always the one that shows
// them all settled.
void Supervisor::handoff_progress(Service &svc)
{
	const HandoffCounts &c = svc.upgrade ? svc.upgrade->handoff : svc.handoff;
	json counts = handoff_json(svc, c);
	bool settled = c.handed == c.received + c.returned && counts["expected"] == c.handed;
	std::uint64_t now = now_usec(CLOCK_MONOTONIC);
	if (!settled && now - svc.handoff_reported < 100000)
		return;
	svc.handoff_reported = now;
	std::string message = "migrating connections " + std::to_string(c.received) + "/" +
	                      std::to_string(counts["expected"].get<std::uint64_t>());
	if (c.returned)
		message += ", " + std::to_string(c.returned) + " returned";
	if (Upgrade *up = svc.upgrade.get()) {
		json p = progress(svc, "handoff", nullptr, message);
		for (Observer *o : std::vector(up->observers))
			o->progress(p);
	}
	if (on_event) {
		json e = {{"event", "handoff"}, {"time", now_usec(CLOCK_REALTIME)}, {"service", svc.name},
		          {"message", message}, {"handoff", counts}};
		if (svc.upgrade)
			e["generation"] = svc.upgrade->to->number;
		else if (svc.current)
			e["generation"] = svc.current->number;
		on_event(e);
	}
}

void Supervisor::update_service(const config::ServiceConfig &cfg)
{
	if (Service *svc = find_service(cfg.name); svc && !svc->removing)
		svc->cfg = cfg;
}

Instance *Supervisor::find_by_token(std::string_view token)
{
	if (token.empty())
		return nullptr;
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->pid && inst->token == token)
					return inst.get();
	return nullptr;
}

Instance *Supervisor::find_by_pid(pid_t pid)
{
	if (pid <= 0)
		return nullptr;
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->pid && (inst->pid == pid || inst->main_pid == pid))
					return inst.get();
	return nullptr;
}

int Supervisor::pidfd_of(const Instance &inst, pid_t pid) const
{
	if (pid == inst.main_pid || ((inst.external || inst.forked) && pid == inst.pid))
		return inst.pidfd.get();
	if (pid == inst.pid && inst.child_source)
		return sd_event_source_get_child_pidfd(inst.child_source.get());
	return -1;
}

// Registered (external) workers.

Instance *Supervisor::register_external(Service &svc, const std::string &version, proto::UniqueFd pidfd, pid_t pid,
                                        uid_t uid, const std::vector<gid_t> &groups, ControlError &refusal)
{
	auto deny = [&](const std::string &why) -> Instance * {
		log::client(log::Level::Warning, "service " + svc.name + ": registration by pid " + std::to_string(pid) +
		                                     " uid " + std::to_string(uid) + " denied: " + why);
		refusal = {"org.varlink.service.PermissionDenied", json::object()};
		return nullptr;
	};
	if (!svc.cfg.exec.empty())
		return deny("the service is started by brokerd (it has exec)");
	if (svc.removing || svc.stopped || shutting_down_)
		return deny("the service is stopped");

	// Default-deny: the peer must be a listed user or in a listed group.
	bool allowed = false;
	for (const auto &name : svc.cfg.register_users)
		if (passwd *pw = ::getpwnam(name.c_str()); pw && pw->pw_uid == uid)
			allowed = true;
	for (const auto &name : svc.cfg.register_groups)
		if (group *gr = ::getgrnam(name.c_str()); gr && std::find(groups.begin(), groups.end(), gr->gr_gid) != groups.end())
			allowed = true;
	if (!allowed)
		return deny("not allowed by services." + svc.name + ".register");

	// Join the generation of that version, or start a new one that will take over when ready.
	Generation *gen = nullptr;
	for (auto &g : svc.generations)
		if (g->cfg.version == version && (g.get() == svc.current || (svc.upgrade && g.get() == svc.upgrade->to)))
			gen = g.get();
	if (!gen) {
		if (svc.upgrade) {
			refusal = {proto::errors::kUpgradeInProgress,
			           {{"service", svc.name}, {"generation", svc.upgrade->to->number}}};
			log::warning("service " + svc.name + ": registration of version \"" + version +
			             "\" refused: a takeover is in progress");
			return nullptr;
		}
		config::ServiceConfig cfg = svc.cfg;
		cfg.version = version;
		gen = &new_generation(svc, cfg);
		if (!svc.current || svc.current->instances.empty()) {
			svc.current = gen;
		} else {
			// A new version takes over the way an upgrade does, but its instances arrive by Hello.
			unsigned old_total = 0;
			for (const auto &inst : svc.current->instances)
				if (!inst->retired)
					old_total++;
			auto up = std::make_unique<Upgrade>(Rollout(old_total, cfg.instances, cfg.upgrade_batch, false));
			up->from = svc.current;
			up->to = gen;
			up->kind = "takeover";
			up->started = now_usec(CLOCK_MONOTONIC);
			up->service = &svc;
			up->supervisor = this;
			up->last_progress = up->started;
			svc.upgrade = std::move(up);
			std::string what = "takeover of " + svc.name + " by version \"" + version + "\" (gen " +
			                   std::to_string(gen->number) + ")";
			log::notice(what);
			emit_service(svc, "upgrade", what);
			svc.upgrade->rollout.begin();
			check_registrations(*svc.upgrade);
		}
	}

	Instance &inst = add_instance(*gen);
	inst.external = true;
	inst.pid = pid;
	inst.pidfd = std::move(pidfd);
	inst.token = random_token();
	set_state(inst, InstanceState::Starting);
	sd_event_source *s = nullptr;
	if (sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst) >= 0)
		inst.child_source.reset(s);
	log::info("instance " + inst.id + ": registered pid " + std::to_string(pid) + " (version \"" + version + "\")");
	emit(inst, "started");
	if (gen->cfg.ready == config::ReadyMode::Exec)
		instance_ready(inst, "registered");
	else
		arm_timer(inst, static_cast<std::uint64_t>(gen->cfg.start_timeout.count()) * kUsecPerMsec, start_timeout_handler);
	changed();
	return &inst;
}

int Supervisor::registration_handler(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("registration_handler", [&]() -> int {
		auto &up = *static_cast<Upgrade *>(userdata);
		up.supervisor->check_registrations(up);
		return 0;
	});
}

// Called when a takeover begins and then from its timer, four times per start_timeout: the
// takeover fails when it has waited that long for instances that have not registered, while no
// instance was starting or draining. Progress of any kind restarts the wait: its owner may start
// each new worker only once an old one is gone.
void Supervisor::check_registrations(Upgrade &up)
{
	Service &svc = *up.service;
	const Rollout &r = up.rollout;
	up.registration_timer.reset();
	if (r.phase() != RolloutPhase::Rolling || svc.upgrade.get() != &up)
		return;
	std::uint64_t now = now_usec(CLOCK_MONOTONIC);
	std::array<unsigned, 3> seen{up.to->next_index, r.new_ready_count(), r.old_exited_count()};
	if (seen != up.seen) {
		up.seen = seen;
		up.last_progress = now;
	}
	unsigned registered = 0, starting = 0;
	for (const auto &inst : up.to->instances)
		if (!inst->retired) {
			registered++;
			starting += inst->state == InstanceState::Starting;
		}
	bool waiting = registered < r.new_started() && starting == 0 && r.old_exited_count() == r.old_drained();
	const auto timeout = up.to->cfg.start_timeout;
	const std::uint64_t limit = static_cast<std::uint64_t>(std::chrono::microseconds(timeout).count());
	if (waiting && now - up.last_progress >= limit) {
		auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count();
		std::string why = std::to_string(registered) + " of " + std::to_string(r.new_started()) + " instance(s) of version \"" +
		                  up.to->cfg.version + "\" registered, none more within the start timeout (" +
		                  std::to_string(ms) + "ms)";
		log::error("service " + svc.name + ": " + why);
		apply(svc, up.rollout.fail(why));
		return;
	}
	sd_event_source *s = nullptr;
	int rc = sd_event_add_time(event_, &s, CLOCK_MONOTONIC, now + std::max<std::uint64_t>(limit / 4, 1000), 1000,
	                           registration_handler, &up);
	if (rc < 0)
		log::error("service " + svc.name + ": cannot add the takeover's registration timer: " + errno_text(-rc));
	else
		up.registration_timer.reset(s);
}

int Supervisor::external_handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("external_handler", [&]() -> int {
		auto &inst = *static_cast<Instance *>(userdata);
		// Not our child: its exit status belongs to its parent; a readable pidfd means it is gone.
		inst.supervisor->external_exit(inst, "exited");
		return 0;
	});
}

void Supervisor::external_exit(Instance &inst, const std::string &how)
{
	if (!inst.pid)
		return;
	bool expected = inst.retired || shutting_down_;
	if (inst.exit_reason.empty())
		inst.exit_reason = how;
	if (inst.forked)
		::kill(-inst.session, SIGKILL); // what else its session still runs goes with it
	std::string msg = "instance " + inst.id + ": pid " + std::to_string(inst.pid) + " " + how;
	if (expected)
		log::info(msg);
	else
		log::warning(msg + " unexpectedly");
	after_exit(inst, expected);
}

void Supervisor::connection_closed(std::string_view token)
{
	Instance *inst = find_by_token(token);
	if (!inst || !inst->external)
		return;
	// It counts as exited; a process still alive is told to drain, so that nothing serves
	// unsupervised on the service's sockets.
	if (inst->state != InstanceState::Draining)
		signal(*inst, inst->generation->cfg.drain_signal);
	external_exit(*inst, "disconnected");
}

// Upgrades.

std::optional<ControlError> Supervisor::begin_upgrade(Service &svc, UpgradeRequest req, Observer *observer)
{
	if (svc.upgrade)
		return ControlError{proto::errors::kUpgradeInProgress,
		                    {{"service", svc.name}, {"generation", svc.upgrade->to->number}}};
	if (svc.stopped || svc.removing || shutting_down_)
		return ControlError{proto::errors::kServiceStopped, {{"service", svc.name}}};
	// Which kind a service is stays as it was added: the config read now may say otherwise.
	if (svc.cfg.exec.empty())
		return ControlError{proto::errors::kRegisteredService, {{"service", svc.name}}};
	if (req.cfg.exec.empty())
		return ControlError{proto::errors::kInvalidConfig,
		                    {{"message", "services." + svc.name + ": without exec, it would become a registered service, "
		                                 "which a running service cannot; remove it first"}}};
	if (req.cfg.sockets != svc.cfg.sockets)
		return ControlError{proto::errors::kInvalidConfig,
		                    {{"message", "services." + svc.name + ".sockets: changed; a service's sockets change with reload"}}};

	Generation *from = svc.current;
	unsigned old_total = 0;
	if (from)
		for (const auto &inst : from->instances)
			if (!inst->retired)
				old_total++;

	auto up = std::make_unique<Upgrade>(Rollout(old_total, req.cfg.instances, req.cfg.upgrade_batch, req.all_at_once));
	up->from = from;
	up->to = &new_generation(svc, req.cfg);
	up->kind = req.kind;
	up->drain_timeout = req.drain_timeout;
	up->started = now_usec(CLOCK_MONOTONIC);
	if (observer)
		up->observers.push_back(observer);
	Upgrade &ref = *up;
	svc.upgrade = std::move(up);

	std::string what = req.kind + " of " + svc.name + " from gen " + (from ? std::to_string(from->number) : "-") +
	                   " to gen " + std::to_string(ref.to->number);
	log::notice(what + ": " + std::to_string(req.cfg.instances) + " new instance(s), batch " +
	            std::to_string(req.cfg.upgrade_batch) + (req.all_at_once ? ", all at once" : ""));
	emit_service(svc, "upgrade", what);
	for (Observer *o : std::vector(ref.observers))
		o->progress(progress(svc, "accepted", nullptr, what));
	apply(svc, ref.rollout.begin());
	return std::nullopt;
}

std::optional<ControlError> Supervisor::abort_upgrade(Service &svc)
{
	Upgrade *up = svc.upgrade.get();
	if (!up || up->rollout.phase() != RolloutPhase::Rolling)
		return ControlError{proto::errors::kNoUpgradeInProgress, {{"service", svc.name}}};
	log::notice("service " + svc.name + ": upgrade to gen " + std::to_string(up->to->number) + " aborted by the operator");
	apply(svc, up->rollout.fail("aborted by the operator"));
	return std::nullopt;
}

void Supervisor::apply(Service &svc, const RolloutStep &step)
{
	Upgrade *up = svc.upgrade.get();
	if (!up)
		return;

	if (step.stop_new) {
		log::warning("service " + svc.name + ": " + up->kind + " to gen " + std::to_string(up->to->number) +
		             " failed (" + up->rollout.reason() + "), rolling back");
		for (Observer *o : std::vector(up->observers))
			o->progress(progress(svc, "rollback", nullptr, up->rollout.reason()));
		emit_service(svc, "rollback", up->rollout.reason());
		// New instances that serve keep serving until a restored old one replaces each, so
		// capacity never dips; the rest go now.
		for (auto &inst : up->to->instances) {
			inst->retired = true;
			if (inst->state != InstanceState::Ready)
				drain(*inst);
		}
	}
	if (step.drain_replaced && up->rollout.phase() != RolloutPhase::Rolling) {
		for (auto &inst : up->to->instances)
			if (inst->state == InstanceState::Ready) {
				drain(*inst);
				break;
			}
	}
	// Spawning can fail on the spot, which feeds the rollout and may end the upgrade.
	auto still_ours = [&] { return svc.upgrade.get() == up; };
	const bool external = up->to->cfg.exec.empty();
	for (unsigned i = 0; i < step.restore_old && still_ours() && up->from; i++) {
		if (up->from->cfg.exec.empty()) {
			// brokerd cannot start what others started: the rollback ends with what still runs.
			log::warning("service " + svc.name + ": cannot restart a drained registered instance; " +
			             "its owner must register it again");
			apply(svc, up->rollout.restored_ready());
			continue;
		}
		Instance &inst = add_instance(*up->from);
		inst.restored = true;
		spawn(inst);
	}
	// Registered services grow by Hello, not by spawning.
	// A spawn that fails on the spot fails the rollout: no more new instances after that.
	for (unsigned i = 0; i < step.start_new && still_ours() && !external && up->rollout.phase() == RolloutPhase::Rolling;
	     i++)
		spawn(add_instance(*up->to));

	// Drain old instances: those not serving first, then the newest serving ones.
	for (unsigned n = 0; n < step.drain_old && still_ours() && up->from; n++) {
		Instance *pick = nullptr;
		auto rank = [](const Instance &i) { return std::pair(i.state == InstanceState::Ready, -static_cast<int>(i.index)); };
		for (auto &inst : up->from->instances)
			if (!inst->retired && (!pick || rank(*inst) < rank(*pick)))
				pick = inst.get();
		if (!pick)
			break;
		pick->retired = true;
		pick->rollout_drained = true;
		bool running = pick->pid != 0;
		drain(*pick, up->drain_timeout);
		if (!running)
			apply(svc, up->rollout.old_exited()); // nothing to wait for: it counts as exited now
	}

	if (!still_ours())
		return;
	if (step.finished || !up->rollout.active())
		finish_upgrade(svc);
}

void Supervisor::finish_upgrade(Service &svc)
{
	std::unique_ptr<Upgrade> up = std::move(svc.upgrade);
	if (!up)
		return;
	double secs = static_cast<double>(now_usec(CLOCK_MONOTONIC) - up->started) / 1e6;
	char took[32];
	std::snprintf(took, sizeof(took), "%.2fs", secs);
	if (up->rollout.phase() == RolloutPhase::Done) {
		if (up->from)
			svc.previous = up->from->cfg;
		svc.current = up->to;
		log::notice("service " + svc.name + ": now at gen " + std::to_string(up->to->number) + " (" + up->kind +
		            " took " + took + ")");
		emit_service(svc, "done", up->kind + " to gen " + std::to_string(up->to->number) + " done in " + took);
		json p = progress(svc, "done", nullptr, took);
		p["generation"] = up->to->number;
		p["upgrade"] = upgrade_json(*up);
		for (Observer *o : std::vector(up->observers))
			o->finished(p);
	} else {
		log::notice("service " + svc.name + ": rolled back to gen " +
		            (up->from ? std::to_string(up->from->number) : std::string("-")) + " in " + took);
		emit_service(svc, "rolled-back", up->rollout.reason());
		json err = {{"service", svc.name},
		            {"generation", up->to->number},
		            {"reason", up->rollout.reason()},
		            {"output", up->failed_output}};
		if (!up->failed_instance.empty())
			err["instance"] = up->failed_instance;
		for (Observer *o : std::vector(up->observers))
			o->failed(proto::errors::kUpgradeFailed, err);
	}
	// Whatever still runs outside the current generation goes now: a new instance kept serving
	// through a rollback, or an old-version worker that registered during a takeover. A refill is
	// an ordinary instance from now on: a later rollback must not count it as its own.
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			inst->restored = false;
			if (gen.get() == svc.current)
				continue;
			inst->retired = true;
			if (inst->pid && inst->state != InstanceState::Draining)
				drain(*inst);
		}
	schedule_prune();
	changed();
}

json Supervisor::upgrade_json(const Upgrade &up) const
{
	const Rollout &r = up.rollout;
	return {{"generation", up.to->number},
	        {"from", up.from ? up.from->number : 0},
	        {"phase", phase_name(r.phase())},
	        {"started", r.new_started()},
	        {"ready", r.new_ready_count()},
	        {"drained", r.old_exited_count()},
	        {"total_new", r.new_total()},
	        {"total_old", r.old_total()},
	        {"handoff", handoff_json(*up.to->service, up.handoff)}};
}

json Supervisor::progress(const Service &svc, const char *event, const Instance *inst, const std::string &message) const
{
	json p = {{"event", event}, {"service", svc.name}};
	if (svc.upgrade) {
		p["generation"] = svc.upgrade->to->number;
		p["upgrade"] = upgrade_json(*svc.upgrade);
	}
	if (inst) {
		p["instance"] = inst->id;
		p["pid"] = inst->pid;
	}
	if (!message.empty())
		p["message"] = message;
	return p;
}

void Supervisor::detach_observer(Observer *observer)
{
	for (auto &svc : services_) {
		if (svc->upgrade)
			std::erase(svc->upgrade->observers, observer);
		std::erase(svc->start_waiters, observer);
		std::erase(svc->stop_waiters, observer);
	}
}

// Start and stop.

std::optional<ControlError> Supervisor::start_service(Service &svc, Observer *observer)
{
	if (!svc.stopped || svc.removing || shutting_down_)
		return ControlError{proto::errors::kServiceStopped, {{"service", svc.name}}};
	svc.stopped = false;
	if (svc.cfg.exec.empty()) {
		// An external service starts when its workers register again.
		log::notice("service " + svc.name + ": accepting registrations again");
		emit_service(svc, "start", "");
		if (observer)
			observer->finished(json::object());
		changed();
		return std::nullopt;
	}
	const config::ServiceConfig &cfg = svc.current ? svc.current->cfg : svc.cfg;
	Generation &gen = new_generation(svc, cfg);
	svc.current = &gen;
	log::notice("service " + svc.name + ": starting gen " + std::to_string(gen.number));
	emit_service(svc, "start", "gen " + std::to_string(gen.number));
	if (observer)
		svc.start_waiters.push_back(observer);
	for (unsigned i = 0; i < cfg.instances; i++)
		spawn(add_instance(gen));
	check_waiters(svc);
	changed();
	return std::nullopt;
}

std::optional<ControlError> Supervisor::stop_service(Service &svc, Observer *observer)
{
	if (svc.stopped || svc.removing || shutting_down_)
		return ControlError{proto::errors::kServiceStopped, {{"service", svc.name}}};
	if (svc.upgrade)
		return ControlError{proto::errors::kUpgradeInProgress,
		                    {{"service", svc.name}, {"generation", svc.upgrade->to->number}}};
	svc.stopped = true;
	log::notice("service " + svc.name + ": stopping");
	emit_service(svc, "stop", "");
	if (observer)
		svc.stop_waiters.push_back(observer);
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			inst->retired = true;
			drain(*inst);
		}
	check_waiters(svc);
	changed();
	return std::nullopt;
}

void Supervisor::check_waiters(Service &svc)
{
	bool running = false, starting = false, ready = false;
	for (auto &gen : svc.generations)
		for (auto &inst : gen->instances) {
			running = running || inst->pid;
			if (gen.get() == svc.current && !inst->retired) {
				starting = starting || inst->state == InstanceState::Starting;
				ready = ready || inst->state == InstanceState::Ready;
			}
		}
	if (!svc.stop_waiters.empty() && !running) {
		auto waiters = std::exchange(svc.stop_waiters, {});
		for (Observer *o : waiters)
			o->finished(json::object());
	}
	if (!svc.start_waiters.empty() && !starting) {
		auto waiters = std::exchange(svc.start_waiters, {});
		for (Observer *o : waiters) {
			if (ready)
				o->finished(json::object());
			else
				o->failed(proto::errors::kStartFailed, {{"service", svc.name}, {"reason", "no instance became ready"}});
		}
	}
}

void Supervisor::shutdown(config::Duration budget)
{
	if (shutting_down_)
		return;
	shutting_down_ = true;
	shutdown_deadline_ = now_usec(CLOCK_MONOTONIC) + static_cast<std::uint64_t>(budget.count()) * kUsecPerMsec;
	log::notice("shutting down: draining every instance, killing what is left in " + std::to_string(budget.count()) +
	            "ms");
	for (auto &svc : services_) {
		if (svc->upgrade) {
			for (Observer *o : std::vector(svc->upgrade->observers))
				o->failed(proto::errors::kUpgradeFailed, {{"service", svc->name},
				                                               {"generation", svc->upgrade->to->number},
				                                               {"reason", "brokerd is shutting down"},
				                                               {"output", json::array()}});
			svc->upgrade.reset();
		}
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances) {
				// One already draining (an upgrade's old instance, or one that said STOPPING=1)
				// keeps its deadline only if it comes before the budget's end.
				std::uint64_t when = 0;
				if (inst->state != InstanceState::Draining)
					drain(*inst);
				else if (inst->timer && sd_event_source_get_time(inst->timer.get(), &when) >= 0 &&
				         when > shutdown_deadline_)
					sd_event_source_set_time(inst->timer.get(), shutdown_deadline_);
			}
	}
	changed();
}

void Supervisor::kill_all()
{
	for (auto &svc : services_)
		for (auto &gen : svc->generations)
			for (auto &inst : gen->instances)
				if (inst->pid) {
					inst->timer.reset();
					kill_instance(*inst, "killed: brokerd was told to stop again");
				}
}

bool Supervisor::stopped() const
{
	for (const auto &svc : services_)
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances)
				if (inst->pid)
					return false;
	return true;
}

namespace {

bool first_attempt(const Instance &inst)
{
	return inst.state == InstanceState::Starting && !inst.retired && !inst.backoff.has_failed();
}

} // namespace

bool Supervisor::settled() const
{
	for (const auto &svc : services_)
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances)
				if (first_attempt(*inst))
					return false;
	return true;
}

std::uint64_t Supervisor::first_starts_deadline() const
{
	std::uint64_t last = 0;
	for (const auto &svc : services_)
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				std::uint64_t when = 0;
				if (first_attempt(*inst) && inst->pid && inst->timer &&
				    sd_event_source_get_time(inst->timer.get(), &when) >= 0)
					last = std::max(last, when);
			}
	return last;
}

// Instances that are gone for good leave the books; generations are kept as history.
void Supervisor::schedule_prune()
{
	if (prune_source_)
		return;
	sd_event_source *s = nullptr;
	if (sd_event_add_defer(event_, &s, prune_handler, this) >= 0) {
		sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
		prune_source_.reset(s);
	}
}

int Supervisor::prune_handler(sd_event_source *, void *userdata)
{
	return guarded("prune_handler", [&]() -> int {
		auto *sup = static_cast<Supervisor *>(userdata);
		sup->prune_source_.reset();
		sup->prune();
		return 0;
	});
}

void Supervisor::prune()
{
	constexpr std::size_t kKeptGenerations = 8;
	for (auto &svc : services_) {
		for (auto &gen : svc->generations)
			std::erase_if(gen->instances, [](const std::unique_ptr<Instance> &inst) {
				return inst->retired && !inst->pid && inst->state != InstanceState::Starting;
			});
		// Keep the current generation, the one an upgrade uses, and a few of history.
		while (svc->generations.size() > kKeptGenerations) {
			auto it = std::find_if(svc->generations.begin(), svc->generations.end(), [&](const auto &g) {
				return g.get() != svc->current && g->instances.empty() &&
				       (!svc->upgrade || (g.get() != svc->upgrade->from && g.get() != svc->upgrade->to));
			});
			if (it == svc->generations.end())
				break;
			svc->generations.erase(it);
		}
	}
	std::size_t gone = std::erase_if(services_, [](const std::unique_ptr<Service> &svc) {
		if (!svc->removing)
			return false;
		for (auto &gen : svc->generations)
			if (!gen->instances.empty())
				return false;
		return true;
	});
	// A removed service is gone for good now: the sockets only it used may close.
	if (gone > 0)
		changed();
}

// Events and status.

void Supervisor::emit(const Instance &inst, const char *event, const std::string &message)
{
	if (Upgrade *up = inst.service->upgrade.get()) {
		if (inst.generation == up->to || inst.generation == up->from) {
			json p = progress(*inst.service, event, &inst, message);
			for (Observer *o : std::vector(up->observers))
				o->progress(p);
		}
	}
	if (!on_event)
		return;
	json e = {{"event", event},
	          {"time", now_usec(CLOCK_REALTIME)},
	          {"service", inst.service->name},
	          {"generation", inst.generation->number},
	          {"instance", inst.id},
	          {"pid", inst.pid},
	          {"state", state_name(inst.state)}};
	if (!message.empty())
		e["message"] = message;
	on_event(e);
}

void Supervisor::emit_service(const Service &svc, const char *event, const std::string &message)
{
	if (!on_event)
		return;
	json e = {{"event", event}, {"time", now_usec(CLOCK_REALTIME)}, {"service", svc.name}};
	if (svc.upgrade)
		e["generation"] = svc.upgrade->to->number;
	else if (svc.current)
		e["generation"] = svc.current->number;
	if (!message.empty())
		e["message"] = message;
	on_event(e);
}

json Supervisor::services_json(const std::string *only) const
{
	json services = json::array();
	for (const auto &svc : services_) {
		if (only && svc->name != *only)
			continue;
		json gens = json::array();
		bool failed = false;
		for (const auto &gen : svc->generations) {
			if (gen->instances.empty() && gen.get() != svc->current)
				continue;
			json insts = json::array();
			for (const auto &inst : gen->instances) {
				json i = {{"id", inst->id},
				          {"index", inst->index},
				          {"pid", inst->pid},
				          {"state", state_name(inst->state)},
				          {"since", inst->since}};
				if (!inst->status_text.empty())
					i["status"] = inst->status_text;
				if (!inst->handoff.empty())
					i["handoff"] = {{"handed", inst->handoff.handed},
					                {"received", inst->handoff.received},
					                {"returned", inst->handoff.returned}};
				if (gen.get() == svc->current && !inst->retired && inst->state == InstanceState::Failed)
					failed = true;
				insts.push_back(std::move(i));
			}
			gens.push_back({{"number", gen->number},
			                {"version", gen->cfg.version},
			                {"exec", gen->cfg.exec},
			                {"instances", std::move(insts)}});
		}
		json s = {{"name", svc->name},
		          {"sockets", svc->cfg.sockets},
		          {"ready", config::ready_name(svc->cfg.ready)},
		          {"state", svc->stopped ? "stopped" : failed ? "failed" : "running"},
		          {"generations", std::move(gens)}};
		if (svc->upgrade)
			s["upgrade"] = upgrade_json(*svc->upgrade);
		if (!svc->handoff.empty())
			s["handoff"] = handoff_json(*svc, svc->handoff);
		services.push_back(std::move(s));
	}
	if (only && services.empty())
		return nullptr;
	return services;
}

std::string Supervisor::summary() const
{
	constexpr unsigned kNamed = 5; // services named as not ready; the rest are counted
	unsigned ready = 0, total = 0, upgrading = 0, not_ready = 0;
	std::string names;
	for (const auto &svc : services_) {
		if (svc->upgrade)
			upgrading++;
		// What keeps the service short of ready, the worst of its current instances (an
		// upgrade's new ones are the upgrade's business).
		static constexpr const char *kWhy[] = {nullptr, "starting", "restarting", "failed"};
		std::size_t worst = 0;
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				total++;
				if (inst->state == InstanceState::Ready)
					ready++;
				if (inst->retired || svc->stopped || gen.get() != svc->current)
					continue;
				std::size_t why = inst->state == InstanceState::Failed     ? 3
				                  : inst->state != InstanceState::Starting ? 0
				                  : inst->backoff.has_failed()             ? 2
				                                                           : 1;
				worst = std::max(worst, why);
			}
		if (worst && ++not_ready <= kNamed)
			names += (names.empty() ? "" : ", ") + svc->name + " (" + kWhy[worst] + ")";
	}
	std::string s = std::to_string(services_.size()) + " service(s), " + std::to_string(ready) + "/" +
	                std::to_string(total) + " instance(s) ready";
	if (not_ready)
		s += ", not ready: " + names + (not_ready > kNamed ? " and " + std::to_string(not_ready - kNamed) + " more" : "");
	if (upgrading)
		s += ", " + std::to_string(upgrading) + " upgrade(s) in progress";
	if (shutting_down_)
		s += ", shutting down";
	return s;
}

void Supervisor::changed()
{
	if (on_change)
		on_change();
}

// ---- Self-upgrade: the state a re-executed brokerd carries on from ----

bool Supervisor::quiet(std::string &why) const
{
	if (shutting_down_) {
		why = "brokerd is shutting down";
		return false;
	}
	if (router_.batches_in_flight() > 0) {
		why = "connections are being handed off";
		return false;
	}
	for (const auto &svc : services_) {
		if (svc->upgrade) {
			why = "an upgrade of " + svc->name + " is in progress";
			return false;
		}
		if (svc->removing) {
			why = "service " + svc->name + " is being removed";
			return false;
		}
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances) {
				bool running = inst->pid > 0;
				if (inst->state == InstanceState::Starting || inst->state == InstanceState::Draining ||
				    (inst->timer && !running) || inst->exec_source) {
					why = "instance " + inst->id + " is " + (inst->state == InstanceState::Draining ? "draining"
					                                         : running ? "starting" : "waiting to restart");
					return false;
				}
			}
	}
	return true;
}

json Supervisor::save_state(std::vector<int> &keep_fds) const
{
	json services = json::array();
	for (const auto &svc : services_) {
		json gens = json::array();
		for (const auto &gen : svc->generations) {
			json insts = json::array();
			for (const auto &inst : gen->instances) {
				json i = {{"index", inst->index},
				          {"id", inst->id},
				          {"state", state_name(inst->state)},
				          {"since", inst->since},
				          {"pid", inst->pid},
				          {"main_pid", inst->main_pid},
				          {"session", inst->session},
				          {"forked", inst->forked},
				          {"token", inst->token},
				          {"status", inst->status_text},
				          {"exit_reason", inst->exit_reason},
				          {"external", inst->external},
				          {"retired", inst->retired},
				          {"restored", inst->restored},
				          {"restarts", inst->backoff.restarts},
				          {"crash_times", inst->backoff.crash_times},
				          {"ready_since", inst->backoff.ready_since},
				          {"last_lines", inst->last_lines},
				          {"accepts_handoff", inst->accepts_handoff},
				          {"handoff", {inst->handoff.handed, inst->handoff.received, inst->handoff.returned}}};
				// A registered or MAINPID process is not our child: only its pidfd, carried
				// over, keeps naming it (its pid could be reused).
				if (inst->pidfd) {
					i["pidfd"] = inst->pidfd.get();
					keep_fds.push_back(inst->pidfd.get());
				}
				for (auto [pipe, key] : {std::pair{&inst->out, "out"}, std::pair{&inst->err, "err"}}) {
					if (!pipe->fd)
						continue;
					i[key] = {{"fd", pipe->fd.get()}, {"partial", pipe->partial}};
					keep_fds.push_back(pipe->fd.get());
				}
				insts.push_back(std::move(i));
			}
			gens.push_back({{"number", gen->number},
			                {"cfg", state::service_config(gen->cfg)},
			                {"next_index", gen->next_index},
			                {"instances", std::move(insts)}});
		}
		json sv = {{"name", svc->name},
		           {"cfg", state::service_config(svc->cfg)},
		           {"generations", std::move(gens)},
		           {"current", svc->current ? json(svc->current->number) : json()},
		           {"next_generation", svc->next_generation},
		           {"stopped", svc->stopped},
		           {"handoff", {svc->handoff.handed, svc->handoff.received, svc->handoff.returned}}};
		if (svc->previous)
			sv["previous"] = state::service_config(*svc->previous);
		services.push_back(std::move(sv));
	}
	return services;
}

void Supervisor::restore_state(const json &services)
{
	auto counts = [](const json &j) {
		return HandoffCounts{j.at(0).get<std::uint64_t>(), j.at(1).get<std::uint64_t>(), j.at(2).get<std::uint64_t>()};
	};
	for (const json &sv : services) {
		auto svc = std::make_unique<Service>();
		svc->name = sv.at("name").get<std::string>();
		svc->cfg = state::service_config(sv.at("cfg"));
		for (const auto &name : svc->cfg.sockets) {
			const Listener *l = find_listener(name);
			if (!l)
				throw std::runtime_error("re-exec state: service " + svc->name + " uses socket " + name +
				                         ", which was not passed on");
			svc->sockets.push_back(l);
		}
		svc->next_generation = sv.at("next_generation").get<std::uint64_t>();
		svc->stopped = sv.at("stopped").get<bool>();
		svc->handoff = counts(sv.at("handoff"));
		if (sv.contains("previous"))
			svc->previous = state::service_config(sv.at("previous"));
		for (const json &g : sv.at("generations")) {
			auto gen = std::make_unique<Generation>();
			gen->service = svc.get();
			gen->number = g.at("number").get<std::uint64_t>();
			gen->cfg = state::service_config(g.at("cfg"));
			gen->next_index = g.at("next_index").get<unsigned>();
			for (const json &i : g.at("instances")) {
				auto inst = std::make_unique<Instance>();
				inst->supervisor = this;
				inst->service = svc.get();
				inst->generation = gen.get();
				restore_instance(*inst, i);
				gen->instances.push_back(std::move(inst));
			}
			if (!sv.at("current").is_null() && sv.at("current").get<std::uint64_t>() == gen->number)
				svc->current = gen.get();
			svc->generations.push_back(std::move(gen));
		}
		log::info("service " + svc->name + ": carried on" +
		          (svc->current ? " at gen " + std::to_string(svc->current->number) : std::string()));
		services_.push_back(std::move(svc));
	}
	changed();
}

void Supervisor::restore_instance(Instance &inst, const json &i)
{
	inst.index = i.at("index").get<unsigned>();
	inst.id = i.at("id").get<std::string>();
	std::string st = i.at("state").get<std::string>();
	inst.state = st == "ready" ? InstanceState::Ready : st == "exited" ? InstanceState::Exited : InstanceState::Failed;
	inst.since = i.at("since").get<std::uint64_t>();
	inst.pid = i.at("pid").get<pid_t>();
	inst.main_pid = i.at("main_pid").get<pid_t>();
	// Absent from the state of a brokerd that predates them.
	inst.session = i.value("session", inst.pid);
	inst.forked = i.value("forked", false);
	inst.token = i.at("token").get<std::string>();
	inst.status_text = i.at("status").get<std::string>();
	inst.exit_reason = i.at("exit_reason").get<std::string>();
	inst.external = i.at("external").get<bool>();
	inst.retired = i.at("retired").get<bool>();
	inst.restored = i.at("restored").get<bool>();
	inst.backoff.restarts = i.at("restarts").get<unsigned>();
	for (const json &t : i.at("crash_times"))
		inst.backoff.crash_times.push_back(t.get<std::uint64_t>());
	inst.backoff.ready_since = i.at("ready_since").get<std::uint64_t>();
	for (const json &l : i.at("last_lines"))
		inst.last_lines.push_back(l.get<std::string>());
	inst.accepts_handoff = i.at("accepts_handoff").get<bool>();
	const json &h = i.at("handoff");
	inst.handoff = HandoffCounts{h.at(0).get<std::uint64_t>(), h.at(1).get<std::uint64_t>(), h.at(2).get<std::uint64_t>()};

	if (i.contains("pidfd")) {
		inst.pidfd.reset(i.at("pidfd").get<int>());
		state::set_cloexec(inst.pidfd.get(), true);
	}
	sd_event_source *s = nullptr;
	for (auto [pipe, key, target] : {std::tuple{&inst.out, "out", 1}, std::tuple{&inst.err, "err", 2}}) {
		if (!i.contains(key))
			continue;
		pipe->fd.reset(i.at(key).at("fd").get<int>());
		state::set_cloexec(pipe->fd.get(), true);
		pipe->partial = i.at(key).at("partial").get<std::string>();
		pipe->target = target;
		if (sd_event_add_io(event_, &s, pipe->fd.get(), EPOLLIN, output_handler, &inst) >= 0)
			pipe->source.reset(s);
	}
	if (inst.pid <= 0)
		return;

	// Children stay children across execve: a spawned worker is watched as before, and one that
	// exited meanwhile is a zombie that sd-event reaps at once.
	if (!inst.external && !inst.forked) {
		proto::UniqueFd pidfd(pidfd_open(inst.pid));
		int r = pidfd ? sd_event_add_child_pidfd(event_, &s, pidfd.get(), WEXITED, child_handler, &inst) : -errno;
		if (r < 0)
			throw std::runtime_error("instance " + inst.id + ": cannot watch pid " + std::to_string(inst.pid) + ": " +
			                         errno_text(-r));
		sd_event_source_set_child_pidfd_own(s, 1);
		(void)pidfd.release();
		inst.child_source.reset(s);
		if (inst.main_pid > 0 && !inst.pidfd)
			inst.main_pid = 0; // no way to name it safely any more: the session's SIGKILL remains
		return;
	}
	if (!inst.pidfd) {
		// Nothing names it safely any more. A registered worker is never restarted by us anyway.
		log::warning("instance " + inst.id + ": pid " + std::to_string(inst.pid) + " came without its pidfd, forgetting it");
		inst.pid = 0;
		inst.retired = true;
		inst.token.clear();
		set_state(inst, InstanceState::Exited);
		schedule_prune();
		return;
	}
	if (sd_event_add_io(event_, &s, inst.pidfd.get(), EPOLLIN, external_handler, &inst) >= 0)
		inst.child_source.reset(s);
}

} // namespace brokerd
