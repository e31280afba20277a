// brokerctl reexec: brokerd hands its state to a new binary and execs it, in the same process.
#include "daemon/reexec.hpp"

#include "daemon/daemon.hpp"

#include "broker_config.h"
#include "daemon/state.hpp"
#include "os/log.hpp"
#include "supervisor/serialize.hpp"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

namespace brokerd {

namespace {

// The check, its stdin the state and its stdout and stderr `out`, in an empty environment.
pid_t spawn_check(const std::string &binary, int state_fd, int out)
{
	std::string path = binary;
	char arg[] = "--check-state";
	char *argv[] = {path.data(), arg, nullptr};
	char *envp[] = {nullptr};
	pid_t pid = ::fork();
	if (pid < 0)
		throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, nullptr);
		::dup2(state_fd, 0);
		::dup2(out, 1);
		::dup2(out, 2);
		::execve(argv[0], argv, envp);
		::_exit(127);
	}
	return pid;
}

// What the check prints, until it closes its output or the deadline, when it is killed.
std::string read_answer(int rd, pid_t pid, std::uint64_t deadline)
{
	std::string out;
	for (;;) {
		std::uint64_t now = now_usec(CLOCK_MONOTONIC);
		pollfd p{rd, POLLIN, 0};
		int n = now < deadline ? ::poll(&p, 1, static_cast<int>((deadline - now) / 1000) + 1) : 0;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			::kill(pid, SIGKILL);
			break;
		}
		char buf[256];
		ssize_t got = ::read(rd, buf, sizeof(buf));
		if (got <= 0)
			break;
		out.append(buf, static_cast<std::size_t>(got));
		if (out.size() > 1024) {
			::kill(pid, SIGKILL); // the answer is one short line
			break;
		}
	}
	return out;
}

// It closed its output: it exits now, or is made to at the deadline. Returns its wait status.
int reap(pid_t pid, std::uint64_t deadline)
{
	proto::UniqueFd child(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
	std::uint64_t now = now_usec(CLOCK_MONOTONIC);
	pollfd p{child.get(), POLLIN, 0};
	if (child && (now >= deadline || ::poll(&p, 1, static_cast<int>((deadline - now) / 1000) + 1) <= 0))
		::kill(pid, SIGKILL);
	int status = 0;
	while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
	}
	return status;
}

} // namespace

std::string reexec_binary(const std::string &requested)
{
	if (!requested.empty())
		return requested;
	char self[PATH_MAX];
	ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n < 0)
		throw std::runtime_error(std::string("/proc/self/exe: ") + std::strerror(errno));
	std::string binary(self, static_cast<std::size_t>(n));
	// A package upgrade replaced the file we run from: the new one is at the same path.
	const std::string deleted = " (deleted)";
	if (binary.size() > deleted.size() && binary.ends_with(deleted))
		binary.resize(binary.size() - deleted.size());
	return binary;
}

void check_binary(const std::string &binary, int state_fd, std::uint64_t bound_usec)
{
	if (::access(binary.c_str(), X_OK) < 0)
		throw std::runtime_error(binary + ": " + std::strerror(errno));
	int pipefd[2];
	if (::pipe2(pipefd, O_CLOEXEC) < 0)
		throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
	proto::UniqueFd rd(pipefd[0]), wr(pipefd[1]);
	pid_t pid = spawn_check(binary, state_fd, wr.get());
	wr.reset();
	// The answer is one line, printed before anything else happens.
	std::uint64_t deadline = now_usec(CLOCK_MONOTONIC) + bound_usec;
	std::string out = read_answer(rd.get(), pid, deadline);
	int status = reap(pid, deadline);
	out = out.substr(0, out.find('\n')); // its first line says it
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		throw std::runtime_error(binary + " --check-state did not run (" +
		                         (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
		                                            : std::string("killed by a signal")) +
		                         (out.empty() ? std::string() : ": " + out.substr(0, 300)) +
		                         "): not a brokerd that can carry on from this one");
	if (out != std::to_string(state::kFormat))
		throw std::runtime_error(binary + " reads re-exec state format \"" + out.substr(0, 40) +
		                         "\", this brokerd writes format " + std::to_string(state::kFormat));
}

// brokerctl reexec: the state goes into a memfd, every fd the next brokerd needs loses CLOEXEC,
// and brokerd execs itself (the same pid: children stay children, and the service manager
// sees the same main process). Returns only when it could not: everything is as before.
void Daemon::reexec(const std::string &requested, int caller)
{
	std::string why;
	if (!supervisor_->quiet(why))
		throw std::runtime_error("not now: " + why + "; try again once it is done");
	std::string binary = reexec_binary(requested);
	std::vector<int> keep;
	proto::UniqueFd memfd = state::write(save_state(caller, keep));
	// The loop waits meanwhile: bounded by 5 s, and by half the watchdog's feeding period.
	std::uint64_t bound = 5'000'000;
	if (watchdog_period_ > 0) {
		notifier_.send("WATCHDOG=1");
		bound = std::min<std::uint64_t>(bound, watchdog_period_ / 2);
	}
	check_binary(binary, memfd.get(), bound);
	keep.push_back(memfd.get());
	std::string fd_arg = std::to_string(memfd.get());
	std::string config_arg = config_path_;
	std::vector<char *> argv = {binary.data(), const_cast<char *>("--config"), config_arg.data(),
	                            const_cast<char *>("--restore-state"), fd_arg.data(), nullptr};

	log::notice("re-executing " + binary + " (" + std::to_string(keep.size()) + " fds carried over)");
	for (int fd : keep)
		state::set_cloexec(fd, false);
	::execve(binary.c_str(), argv.data(), environ);
	int err = errno;
	for (int fd : keep)
		state::set_cloexec(fd, true);
	throw std::runtime_error("execve " + binary + ": " + std::strerror(err));
}

// Everything the next brokerd carries on with; the fds it needs go to `keep`.
nlohmann::json Daemon::save_state(int caller, std::vector<int> &keep) const
{
	nlohmann::json listeners = nlohmann::json::array();
	for (const auto &l : listeners_) {
		listeners.push_back({{"name", l.name},
		                     {"fd", l.fd.get()},
		                     {"address", l.address},
		                     {"kind", l.kind},
		                     {"origin", l.origin},
		                     {"unlink_path", l.unlink_path}});
		keep.push_back(l.fd.get());
	}
	keep.push_back(notify_->fd());
	return {{"format", state::kFormat},
	        {"version", BROKER_VERSION},
	        {"config_path", config_path_},
	        {"config_text", cfg_text_},
	        {"start_usec", start_usec_},
	        {"nofile", {started_nofile_.rlim_cur, started_nofile_.rlim_max}},
	        {"watchdog_usec", watchdog_usec_},
	        {"announced_ready", announced_ready_},
	        {"last_status", last_status_},
	        {"listeners", std::move(listeners)},
	        {"notify_fd", notify_->fd()},
	        {"services", Serializer::save(*supervisor_, keep)},
	        {"control", control_->save_state(caller, keep)}};
}

} // namespace brokerd
