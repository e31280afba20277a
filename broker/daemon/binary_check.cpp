// brokerctl reexec: `binary --check-state` says whether a binary can carry on from this brokerd;
// the check runs as a child the loop watches, so brokerd serves on while a slow binary starts.
#include "daemon/binary_check.hpp"

#include "daemon/state.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <utility>

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

void check_event(int r, const char *what)
{
	if (r < 0)
		throw std::runtime_error(std::string(what) + ": " + std::strerror(-r));
}

} // namespace

BinaryCheck::BinaryCheck(sd_event *event, std::string binary, int state_fd, usec_t bound, Done done)
	: binary_(std::move(binary)), done_(std::move(done))
{
	if (::access(binary_.c_str(), X_OK) < 0)
		throw std::runtime_error(binary_ + ": " + std::strerror(errno));
	int pipefd[2];
	if (::pipe2(pipefd, O_CLOEXEC) < 0)
		throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
	output_fd_.reset(pipefd[0]);
	proto::UniqueFd wr(pipefd[1]);
	pid_ = spawn_check(binary_, state_fd, wr.get());
	wr.reset();
	// Our own child, not yet reaped: its pid cannot name another process here.
	pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0)));
	if (!pidfd_) {
		int err = errno;
		kill_and_reap();
		throw std::runtime_error(std::string("pidfd_open: ") + std::strerror(err));
	}
	try {
		sd_event_source *s = nullptr;
		check_event(sd_event_add_io(event, &s, output_fd_.get(), EPOLLIN, on_output, this), "watching the check's output");
		output_.reset(s);
		check_event(sd_event_add_io(event, &s, pidfd_.get(), EPOLLIN, on_exit, this), "watching the check");
		exit_.reset(s);
		// The answer is one line, printed before anything else happens.
		check_event(sd_event_add_time_relative(event, &s, CLOCK_MONOTONIC, bound, 0, on_deadline, this),
		            "the check's deadline");
		deadline_.reset(s);
	} catch (...) {
		kill_and_reap();
		throw;
	}
}

BinaryCheck::~BinaryCheck()
{
	if (pid_ > 0 && !exited_)
		kill_and_reap();
}

int BinaryCheck::on_output(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("reexec check output", [&]() -> int {
		auto *c = static_cast<BinaryCheck *>(userdata);
		c->read_output();
		c->maybe_finish(); // its last act: `c` may be gone after it
		return 0;
	});
}

int BinaryCheck::on_exit(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("reexec check exit", [&]() -> int {
		auto *c = static_cast<BinaryCheck *>(userdata);
		c->reap(false);
		c->maybe_finish();
		return 0;
	});
}

// Past the bound: killed, and judged on what it printed (a binary that never answers did not run).
int BinaryCheck::on_deadline(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("reexec check deadline", [&]() -> int {
		auto *c = static_cast<BinaryCheck *>(userdata);
		if (!c->exited_)
			c->kill_and_reap();
		c->output_done_ = true;
		c->maybe_finish();
		return 0;
	});
}

// One read per wake-up: the loop comes back while more is there.
void BinaryCheck::read_output()
{
	char buf[256];
	ssize_t got = ::read(output_fd_.get(), buf, sizeof(buf));
	if (got < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (got > 0)
		out_.append(buf, static_cast<std::size_t>(got));
	if (got <= 0) {
		output_done_ = true;
	} else if (out_.size() > 1024) {
		::kill(pid_, SIGKILL); // the answer is one short line
		output_done_ = true;
	}
	if (output_done_)
		output_.reset();
}

void BinaryCheck::reap(bool wait)
{
	int status = 0;
	pid_t r;
	while ((r = ::waitpid(pid_, &status, wait ? 0 : WNOHANG)) < 0 && errno == EINTR) {
	}
	if (r != pid_)
		return;
	exited_ = true;
	status_ = status;
	exit_.reset();
}

// SIGKILL, then wait: it cannot hold on to its life, so this is its exit, not a block.
void BinaryCheck::kill_and_reap()
{
	::kill(pid_, SIGKILL);
	reap(true);
}

void BinaryCheck::maybe_finish()
{
	if (!exited_ || !output_done_ || !done_)
		return;
	output_.reset();
	deadline_.reset();
	Done done = std::exchange(done_, nullptr);
	done(verdict()); // may destroy *this
}

std::string BinaryCheck::verdict() const
{
	std::string out = out_.substr(0, out_.find('\n')); // its first line says it
	if (!WIFEXITED(status_) || WEXITSTATUS(status_) != 0)
		return binary_ + " --check-state did not run (" +
		       (WIFEXITED(status_) ? "exit " + std::to_string(WEXITSTATUS(status_)) : std::string("killed by a signal")) +
		       (out.empty() ? std::string() : ": " + out.substr(0, 300)) +
		       "): not a brokerd that can carry on from this one";
	if (out != std::to_string(state::kFormat))
		return binary_ + " reads re-exec state format \"" + out.substr(0, 40) + "\", this brokerd writes format " +
		       std::to_string(state::kFormat);
	return {};
}

} // namespace brokerd
