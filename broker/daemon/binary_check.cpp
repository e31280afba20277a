// brokerctl reexec: `binary --check-state` says whether a binary can carry on from this brokerd.
#include "daemon/binary_check.hpp"

#include "daemon/state.hpp"
#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

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

} // namespace brokerd
