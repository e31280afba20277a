// Logging for brokerd: stderr lines with "<N>" level prefixes when journald reads them.
#include "os/log.hpp"

#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace brokerd::log {

bool stderr_is_journal()
{
	static const bool journal = [] {
		const char *e = std::getenv("JOURNAL_STREAM");
		if (!e)
			return false;
		unsigned long long dev = 0, ino = 0;
		if (std::sscanf(e, "%llu:%llu", &dev, &ino) != 2)
			return false;
		struct stat st{};
		if (fstat(STDERR_FILENO, &st) < 0)
			return false;
		return st.st_dev == dev && st.st_ino == ino;
	}();
	return journal;
}

namespace {

void write_all(int fd, iovec *iov, int n)
{
	while (n > 0) {
		ssize_t w = ::writev(fd, iov, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return; // nowhere left to report a failing log
		}
		while (n > 0 && static_cast<size_t>(w) >= iov->iov_len) {
			w -= static_cast<ssize_t>(iov->iov_len);
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = static_cast<char *>(iov->iov_base) + w;
			iov->iov_len -= static_cast<size_t>(w);
		}
	}
}

} // namespace

void write(Level level, std::string_view message)
{
	// Not `"<" + std::to_string(...)`: GCC 12 at -O3 warns falsely (-Wrestrict) on it.
	char journal[16];
	std::snprintf(journal, sizeof(journal), "<%d>", static_cast<int>(level));
	std::string_view prefix = stderr_is_journal() ? std::string_view(journal) : std::string_view("brokerd: ");
	iovec iov[3] = {
		{const_cast<char *>(prefix.data()), prefix.size()},
		{const_cast<char *>(message.data()), message.size()},
		{const_cast<char *>("\n"), 1},
	};
	write_all(STDERR_FILENO, iov, 3);
}

namespace {
std::function<void(const EventRecord &)> &event_sink()
{
	static std::function<void(const EventRecord &)> sink;
	return sink;
}
} // namespace

void set_event_sink(std::function<void(const EventRecord &)> sink)
{
	event_sink() = std::move(sink);
}

void event(const EventRecord &record)
{
	if (event_sink())
		event_sink()(record);
	else
		write(record.level, record.message);
}

void client(Level level, std::string_view message)
{
	static std::uint64_t second = 0;
	static int written = 0;
	static unsigned long suppressed = 0;
	timespec ts{};
	::clock_gettime(CLOCK_MONOTONIC, &ts);
	auto now = static_cast<std::uint64_t>(ts.tv_sec);
	if (now != second) {
		second = now;
		written = 0;
		if (suppressed > 0)
			write(Level::Warning, "control: " + std::to_string(suppressed) + " more lines about clients suppressed");
		suppressed = 0;
	}
	if (written >= kClientLinesPerSecond) {
		suppressed++;
		return;
	}
	written++;
	write(level, message);
}

void worker_line(int target_fd, std::string_view prefix, std::string_view line)
{
	iovec iov[4] = {
		{const_cast<char *>(prefix.data()), prefix.size()},
		{const_cast<char *>(": "), 2},
		{const_cast<char *>(line.data()), line.size()},
		{const_cast<char *>("\n"), 1},
	};
	write_all(target_fd, iov, 4);
}

} // namespace brokerd::log
