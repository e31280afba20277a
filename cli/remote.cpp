// brokerctl -H: ssh to another host's brokerctl bridge (see remote.hpp).
#include "remote.hpp"

#include "errors.hpp"
#include "format.hpp"

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

extern char **environ;

namespace brokerctl {

namespace {

bool valid_port(std::string_view port)
{
	if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
		return false;
	int n = std::stoi(std::string(port));
	return n >= 1 && n <= 65535;
}

// A user or host name, not an option, and nothing a shell reads specially: ssh may hand the host
// to one (a ProxyCommand's %h). Letters, digits, '.', '_', '-', and for an IPv6 address ':' and
// its zone's '%'.
bool valid_name(std::string_view name)
{
	return !name.empty() && name.front() != '-' && std::all_of(name.begin(), name.end(), [](char c) {
		return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
		       c == '-' || c == ':' || c == '%';
	});
}

} // namespace

std::optional<RemoteTarget> parse_target(std::string_view text)
{
	RemoteTarget t;
	t.given = std::string(text);
	std::string_view user, host = text;
	if (auto at = text.rfind('@'); at != std::string_view::npos) {
		user = text.substr(0, at);
		host = text.substr(at + 1);
		if (!valid_name(user))
			return std::nullopt;
	}
	if (host.starts_with('[')) {
		auto close = host.find(']');
		if (close == std::string_view::npos)
			return std::nullopt;
		std::string_view rest = host.substr(close + 1);
		if (!rest.empty()) {
			if (!rest.starts_with(':') || !valid_port(rest.substr(1)))
				return std::nullopt;
			t.port = std::string(rest.substr(1));
		}
		host = host.substr(1, close - 1);
	} else if (std::count(host.begin(), host.end(), ':') == 1) {
		auto colon = host.find(':');
		if (!valid_port(host.substr(colon + 1)))
			return std::nullopt;
		t.port = std::string(host.substr(colon + 1));
		host = host.substr(0, colon);
	}
	if (!valid_name(host) || (!user.empty() && user.find(':') != std::string_view::npos))
		return std::nullopt;
	t.destination = user.empty() ? std::string(host) : std::string(user) + "@" + std::string(host);
	return t;
}

std::vector<std::string> bridge_command(const RemoteTarget &target, std::string_view ssh_command)
{
	std::vector<std::string> argv;
	for (std::size_t i = 0; i < ssh_command.size();) {
		std::size_t end = ssh_command.find_first_of(" \t\n", i);
		if (end == std::string_view::npos)
			end = ssh_command.size();
		if (end > i)
			argv.emplace_back(ssh_command.substr(i, end - i));
		i = end + 1;
	}
	if (argv.empty())
		argv.emplace_back("ssh");
	// No X11 or agent forwarding asked for, no terminal: the channel carries Varlink bytes only.
	argv.insert(argv.end(), {"-x", "-T"});
	if (target.port)
		argv.insert(argv.end(), {"-p", *target.port});
	std::vector<std::string> remote = {"brokerctl", "bridge"};
	if (target.socket)
		remote.insert(remote.end(), {"--socket", *target.socket});
	argv.insert(argv.end(), {"--", target.destination, shell_join(remote)});
	return argv;
}

Bridge spawn_bridge(const RemoteTarget &target)
{
	const char *ssh_env = std::getenv("BROKERCTL_SSH");
	std::vector<std::string> argv = bridge_command(target, ssh_env ? ssh_env : "");
	int pair[2];
	if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
		throw Failure(kExitFailure, std::string("socketpair: ") + std::strerror(errno));
	proto::UniqueFd ours(pair[0]), theirs(pair[1]);

	// ssh's stdin and stdout are the other end; its stderr stays ours, for its messages and the
	// remote brokerctl's. dup2 clears CLOEXEC on the copies only.
	posix_spawn_file_actions_t actions;
	posix_spawn_file_actions_init(&actions);
	posix_spawn_file_actions_adddup2(&actions, theirs.get(), STDIN_FILENO);
	posix_spawn_file_actions_adddup2(&actions, theirs.get(), STDOUT_FILENO);
	std::vector<char *> args;
	for (std::string &a : argv)
		args.push_back(a.data());
	args.push_back(nullptr);
	pid_t pid = -1;
	int r = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
	posix_spawn_file_actions_destroy(&actions);
	if (r != 0)
		throw Failure(kExitFailure, "cannot run " + printable(argv[0]) + " to reach " + printable(target.given) + ": " +
		                                std::strerror(r) + (ssh_env ? " (see BROKERCTL_SSH)" : ""));
	return {std::move(ours), pid};
}

std::optional<BridgeExit> bridge_exit(int status, const RemoteTarget &target)
{
	std::string host = printable(target.given);
	if (WIFSIGNALED(status))
		return BridgeExit{kExitFailure, "ssh to " + host + " was killed by signal " + std::to_string(WTERMSIG(status))};
	int code = WEXITSTATUS(status);
	switch (code) {
	case 0:
		return std::nullopt;
	case kExitNotRunning:
	case kExitPermissionDenied:
	case kExitNoSuchService:
		return BridgeExit{code, {}};
	case 127:
		return BridgeExit{kExitFailure, "brokerctl was not found on " + host + " (exit status 127)"};
	case 255:
		return BridgeExit{kExitFailure, "ssh to " + host + " failed (exit status 255)"};
	default:
		return BridgeExit{kExitFailure, "brokerctl bridge on " + host + " ended with exit status " + std::to_string(code)};
	}
}

std::optional<BridgeExit> reap_bridge(pid_t ssh, const RemoteTarget &target, std::chrono::milliseconds wait)
{
	int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, ssh, 0));
	if (pidfd >= 0) {
		pollfd p{pidfd, POLLIN, 0};
		int r;
		do
			r = ::poll(&p, 1, static_cast<int>(std::min<std::chrono::milliseconds::rep>(wait.count(), 1 << 30)));
		while (r < 0 && errno == EINTR);
		::close(pidfd);
		if (r == 0)
			::kill(ssh, SIGKILL); // a stuck ssh: it has told all it will
	}
	int status = 0;
	pid_t r;
	do
		r = ::waitpid(ssh, &status, 0);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return BridgeExit{kExitFailure, "ssh to " + printable(target.given) + ": " + std::strerror(errno)};
	return bridge_exit(status, target);
}

} // namespace brokerctl
