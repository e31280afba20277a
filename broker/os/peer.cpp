// Peer: who is at the other end of a control connection, checked against pid reuse.
#include "os/peer.hpp"

#include "proto/limits.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77 // Linux 6.5
#endif

namespace brokerd::peer {

namespace {

// One line of /proc/<pid>/status, after "<key>:".
std::optional<std::string> status_field(pid_t pid, std::string_view key)
{
	std::ifstream in("/proc/" + std::to_string(pid) + "/status");
	std::string line;
	while (std::getline(in, line))
		if (line.size() > key.size() && line.compare(0, key.size(), key) == 0 && line[key.size()] == ':')
			return line.substr(key.size() + 1);
	return std::nullopt;
}

// A numeric field of /proc/<pid>/stat (counted from 1, as proc(5) does; 3 and up).
std::optional<std::uint64_t> stat_field(pid_t pid, int field)
{
	std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
	std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
	// The name (field 2) may hold spaces and parentheses: count fields after its last ')'.
	std::size_t close = stat.rfind(')');
	if (close == std::string::npos)
		return std::nullopt;
	std::istringstream fields(stat.substr(close + 1));
	std::string f;
	for (int n = 3; n <= field && fields >> f; n++)
		if (n == field)
			return std::strtoull(f.c_str(), nullptr, 10);
	return std::nullopt;
}

// Field 22: when the process started, in clock ticks since boot.
std::optional<std::uint64_t> start_ticks(pid_t pid)
{
	return stat_field(pid, 22);
}

} // namespace

bool same_process(int a, int b)
{
	struct stat sa {}, sb{};
	if (::fstat(a, &sa) < 0 || ::fstat(b, &sb) < 0)
		return true;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool alive(int pidfd)
{
	// A pidfd is readable once its process has exited (or was reaped).
	pollfd p{pidfd, POLLIN, 0};
	return ::poll(&p, 1, 0) == 0;
}

Result<proto::UniqueFd> process(int sock, pid_t pid, usec_t connected_boottime)
{
	const std::string name = "pid " + std::to_string(pid);
	if (pid <= 0)
		return Failure{"the peer's pid is not visible from brokerd's pid namespace"};
	int raw = -1;
	socklen_t len = sizeof(raw);
	if (::getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &raw, &len) == 0) {
		proto::UniqueFd fd(raw);
		if (!alive(fd.get()))
			return Failure{name + ", which connected, has exited"};
		return fd;
	}
	if (errno != ENOPROTOOPT) {
		// The kernel has SO_PEERPIDFD but no process to give (before 6.16: it was reaped).
		return Failure{name + ", which connected, has exited (SO_PEERPIDFD: " + std::strerror(errno) + ")"};
	}
	return process_by_pid(pid, connected_boottime);
}

Result<proto::UniqueFd> process_by_pid(pid_t pid, usec_t connected_boottime)
{
	const std::string name = "pid " + std::to_string(pid);
	proto::UniqueFd fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
	if (!fd)
		return Failure{name + ", which connected, has exited (pidfd_open: " + std::strerror(errno) + ")"};
	// The pidfd now holds whichever process has that pid. It is the one that connected if it
	// started before the connection and still runs after its start time was read.
	auto ticks = start_ticks(pid);
	const auto hz = static_cast<std::uint64_t>(::sysconf(_SC_CLK_TCK));
	if (!ticks || hz == 0 || !alive(fd.get()))
		return Failure{name + ", which connected, has exited"};
	if (*ticks * 1000000 / hz > connected_boottime)
		return Failure{name + ", which connected, has exited, and the pid names a process started since"};
	return fd;
}

std::optional<ProcessIdentity> identity(pid_t pid)
{
	if (pid <= 0)
		return std::nullopt;
	auto ticks = start_ticks(pid);
	if (!ticks)
		return std::nullopt;
	return ProcessIdentity{pid, *ticks};
}

Result<proto::UniqueFd> reopen(const ProcessIdentity &id)
{
	const std::string name = "pid " + std::to_string(id.pid);
	if (id.pid <= 0)
		return Failure{name + " names no process"};
	proto::UniqueFd fd(static_cast<int>(::syscall(SYS_pidfd_open, id.pid, 0)));
	if (!fd)
		return Failure{name + " has exited (pidfd_open: " + std::strerror(errno) + ")"};
	auto ticks = start_ticks(id.pid);
	if (!ticks || !alive(fd.get()))
		return Failure{name + " has exited"};
	if (*ticks != id.start_ticks)
		return Failure{name + " names another process by now (started at tick " + std::to_string(*ticks) +
		               ", not " + std::to_string(id.start_ticks) + ")"};
	return fd;
}

std::vector<pid_t> session_members(pid_t session)
{
	std::vector<pid_t> members;
	std::error_code ec;
	for (const auto &entry : std::filesystem::directory_iterator("/proc", ec)) {
		const std::string name = entry.path().filename().string();
		char *end = nullptr;
		long pid = std::strtol(name.c_str(), &end, 10);
		if (pid <= 0 || *end)
			continue;
		// Field 6: the session id.
		if (auto sid = stat_field(static_cast<pid_t>(pid), 6); sid && static_cast<pid_t>(*sid) == session)
			members.push_back(static_cast<pid_t>(pid));
	}
	return members;
}

bool descends_from(pid_t pid, const std::vector<pid_t> &ancestors)
{
	for (std::size_t step = 0; step < proto::limits::kMaxAncestry && pid > 1; step++) {
		if (std::find(ancestors.begin(), ancestors.end(), pid) != ancestors.end())
			return true;
		auto ppid = status_field(pid, "PPid");
		if (!ppid)
			return false;
		pid = static_cast<pid_t>(std::strtol(ppid->c_str(), nullptr, 10));
	}
	return false;
}

std::optional<uid_t> process_uid(pid_t pid)
{
	auto uids = status_field(pid, "Uid");
	if (!uids)
		return std::nullopt;
	return static_cast<uid_t>(std::strtoul(uids->c_str(), nullptr, 10));
}

} // namespace brokerd::peer
