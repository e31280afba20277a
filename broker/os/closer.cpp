// Closer: fds a peer gave brokerd close on a thread of their own, never on the event loop.
//
// A peer decides how long the last close() of what it sends takes: a TCP socket with SO_LINGER
// and unsent data blocks its closer until the data is gone or the linger time is up, and so does
// a unix socket with such fds in flight, or a file on a FUSE mount. On the event loop that would
// stop supervision, drain deadlines and every control call. The thread does nothing but read fd
// numbers from a pipe and close them: no allocation, no lock, as brokerd forks workers while it
// runs.
#include "os/closer.hpp"

#include "proto/unique_fd.hpp"
#include "os/log.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83
#endif

namespace brokerd::closer {

namespace {

int g_pipe = -1; // write end, non-blocking

// Slots brokerd's fd table has from the start: twice the 16 batches of 253 fds one draining
// worker may have in flight through brokerd, rounded to a power of two (the kernel's own steps).
// 64 KiB of kernel memory.
constexpr rlim_t kFdTableReserve = 8192;

void *run(void *arg)
{
	int rd = static_cast<int>(reinterpret_cast<intptr_t>(arg));
	int fds[256];
	for (;;) {
		ssize_t n = ::read(rd, fds, sizeof(fds));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return nullptr;
		// Writes of one int are atomic, so whole numbers arrive.
		for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(int)); i++)
			::close(fds[i]);
	}
}

void close_later(int fd) noexcept
{
	for (;;) {
		if (::write(g_pipe, &fd, sizeof(fd)) == static_cast<ssize_t>(sizeof(fd)))
			return;
		if (errno != EINTR)
			break;
	}
	// The pipe holds as many numbers as brokerd may have fds open, and a number is in it at
	// most once (it stays open until the thread closes it); only a raised fd limit gets here.
	log::warning(std::string("closer: ") + std::strerror(errno) + ", closing fd " + std::to_string(fd) + " inline");
	::close(fd);
}

} // namespace

void start()
{
	int p[2];
	if (::pipe2(p, O_CLOEXEC) < 0)
		throw std::runtime_error(std::string("closer: pipe: ") + std::strerror(errno));
	proto::UniqueFd rd(p[0]), wr(p[1]);
	if (::fcntl(wr.get(), F_SETFL, O_NONBLOCK) < 0)
		throw std::runtime_error(std::string("closer: ") + std::strerror(errno));
	rlimit nofile{};
	::getrlimit(RLIMIT_NOFILE, &nofile);
	rlim_t want = nofile.rlim_cur == RLIM_INFINITY ? rlim_t(1) << 20 : nofile.rlim_cur;
	int size = static_cast<int>(std::min<rlim_t>(want * sizeof(int), rlim_t(1) << 28));
	// As large as allowed: one above /proc/sys/fs/pipe-max-size fails for an unprivileged brokerd.
	while (::fcntl(wr.get(), F_SETPIPE_SZ, size) < 0 && size > 65536)
		size /= 2;

	// brokerd's fd table, grown once while brokerd is still one thread. A process of several
	// threads that outgrows its table waits for an RCU grace period (about 10 ms) before the new
	// one is used, and the first batches of a handoff through brokerd, up to 16 of 253 fds per
	// draining worker, did so each time it doubled. Tables never shrink: one fd at the top
	// number, closed at once, leaves room for that many.
	int top = static_cast<int>(std::min<rlim_t>(want, kFdTableReserve)) - 1;
	if (top > 0) {
		int reserve = ::fcntl(wr.get(), F_DUPFD_CLOEXEC, top);
		if (reserve >= 0)
			::close(reserve);
	}

	// The thread takes no signal: signalfd and sd-event have them blocked on the main thread.
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 * 1024);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_t thread;
	int r = pthread_create(&thread, &attr, run, reinterpret_cast<void *>(static_cast<intptr_t>(rd.get())));
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, nullptr);
	if (r != 0)
		throw std::runtime_error(std::string("closer: pthread_create: ") + std::strerror(r));
	pthread_setname_np(thread, "brokerd-closer");
	(void)rd.release(); // the thread's until brokerd exits or re-executes
	g_pipe = wr.release();
	proto::peer_fd_closer = close_later;
}

bool pass_rights(int fd, bool allow)
{
	int v = allow ? 1 : 0;
	if (::setsockopt(fd, SOL_SOCKET, SO_PASSRIGHTS, &v, sizeof(v)) == 0)
		return true;
	if (errno == ENOPROTOOPT)
		return false;
	throw std::runtime_error(std::string("SO_PASSRIGHTS: ") + std::strerror(errno));
}

} // namespace brokerd::closer
