// Process figures from /proc: CPU time, memory, start time and fds.
#include "os/process_stats.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace brokerd {

namespace {

std::optional<std::string> read_small(const char *path)
{
	int fd = ::open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return std::nullopt;
	std::string text;
	char buf[4096];
	for (;;) {
		ssize_t n = ::read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		text.append(buf, static_cast<std::size_t>(n));
	}
	::close(fd);
	return text;
}

// The entries of /proc/self/fd but the one listing it.
std::optional<std::uint64_t> count_fds()
{
	DIR *dir = ::opendir("/proc/self/fd");
	if (!dir)
		return std::nullopt;
	std::uint64_t n = 0;
	int own = ::dirfd(dir);
	while (dirent *e = ::readdir(dir)) {
		if (e->d_name[0] == '.')
			continue;
		n += std::atoi(e->d_name) != own;
	}
	::closedir(dir);
	return n;
}

} // namespace

std::optional<ProcessStats> process_stats()
{
	auto stat = read_small("/proc/self/stat");
	auto system = read_small("/proc/stat");
	if (!stat || !system)
		return std::nullopt;
	// The command name may hold spaces and parentheses: the fields start after the last ')'.
	std::size_t close = stat->rfind(')');
	if (close == std::string::npos)
		return std::nullopt;
	std::istringstream fields(stat->substr(close + 2));
	std::vector<std::string> f; // f[0] is field 3 (state)
	for (std::string word; fields >> word;)
		f.push_back(word);
	if (f.size() < 22)
		return std::nullopt;
	std::size_t btime_at = system->find("\nbtime ");
	if (btime_at == std::string::npos)
		return std::nullopt;
	double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
	double page = static_cast<double>(::sysconf(_SC_PAGESIZE));
	ProcessStats p;
	p.cpu_seconds = (std::strtod(f[11].c_str(), nullptr) + std::strtod(f[12].c_str(), nullptr)) / ticks; // 14, 15
	p.start_time_seconds = std::strtod(system->c_str() + btime_at + 7, nullptr) +
	                       std::strtod(f[19].c_str(), nullptr) / ticks;                                // 22
	p.virtual_bytes = std::strtoull(f[20].c_str(), nullptr, 10);                                      // 23
	p.resident_bytes = static_cast<std::uint64_t>(std::strtod(f[21].c_str(), nullptr) * page);        // 24
	auto fds = count_fds();
	if (!fds)
		return std::nullopt;
	p.open_fds = *fds;
	rlimit limit{};
	if (::getrlimit(RLIMIT_NOFILE, &limit) == 0)
		p.max_fds = limit.rlim_cur;
	return p;
}

} // namespace brokerd
