// Starting the brokerd binary again as one of brokerd's helpers (daemon/helper.hpp).
#include "daemon/helper.hpp"

#include "proto/unique_fd.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

namespace brokerd {

pid_t spawn_helper(const std::vector<std::string> &args, const std::vector<std::pair<int, int>> &fds)
{
	// Above the numbers they go to, so that each dup2 clears CLOEXEC.
	int above = 3;
	for (const auto &[fd, target] : fds)
		above = std::max(above, target + 1);
	std::vector<proto::UniqueFd> high;
	for (const auto &[fd, target] : fds) {
		high.emplace_back(::fcntl(fd, F_DUPFD_CLOEXEC, above));
		if (!high.back())
			return -errno;
	}
	posix_spawn_file_actions_t actions;
	posix_spawn_file_actions_init(&actions);
	posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
	for (std::size_t i = 0; i < fds.size(); ++i)
		posix_spawn_file_actions_adddup2(&actions, high[i].get(), fds[i].second);
	posix_spawnattr_t attr;
	posix_spawnattr_init(&attr);
	sigset_t none, all;
	sigemptyset(&none);
	sigfillset(&all);
	posix_spawnattr_setsigmask(&attr, &none);
	posix_spawnattr_setsigdefault(&attr, &all);
	posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	std::string journal;
	if (const char *j = std::getenv("JOURNAL_STREAM"))
		journal = std::string("JOURNAL_STREAM=") + j;
	std::vector<std::string> words{"brokerd"};
	words.insert(words.end(), args.begin(), args.end());
	std::vector<char *> argv;
	for (auto &w : words)
		argv.push_back(w.data());
	argv.push_back(nullptr);
	char *envp[] = {journal.empty() ? nullptr : journal.data(), nullptr};
	pid_t pid = 0;
	int r = ::posix_spawn(&pid, "/proc/self/exe", &actions, &attr, argv.data(), envp);
	posix_spawnattr_destroy(&attr);
	posix_spawn_file_actions_destroy(&actions);
	return r == 0 ? pid : -r;
}

} // namespace brokerd
