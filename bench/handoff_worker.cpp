// broker-handoff-worker: the worker that bench/handoff migrates, N established connections at once.
//
// Run by brokerd as the service of bench/handoff (see that script's header); it links only the
// public client API, as any worker would. Every instance does the same, whatever its generation:
//   - it accepts on its listeners and greets each new connection with "<generation>\n";
//   - it answers every byte 'q' on a connection with "<generation>\n", so the driver can tell
//     which generation serves a connection after the upgrade;
//   - it takes handed-off connections (ClientOptions::accept_handoff) and serves them the same;
//   - on drain it stops serving and hands every connection it holds to its successor with
//     client.handoff(), then exits once on_handoff_done says each one landed or came back.
//
// Environment (from the service's "env" in the config bench/handoff writes):
//   HANDOFF_BENCH_DIR      where result files go (required)
//   HANDOFF_BENCH_EXPECT   connections a receiver should end up with: it writes its result file
//                          the moment it holds that many (default 0: only at drain)
//   HANDOFF_BENCH_STATE    bytes of state sent with each connection (default 0). The state is the
//                          client's port in decimal, padded with 'x', so that the receiver can check
//                          with getpeername() that each state arrived with its own socket. It
//                          checks them all once it holds every one, outside the handoff's path
//                          and its CPU window, as broker-handoff-raw checks its fds after its stamp.
//   HANDOFF_BENCH_REGISTER "inline" (default): on_connection puts each connection into the epoll
//                          set at once; "deferred": on_connection keeps it, and the loop registers
//                          what it was given once process() has nothing left to do, at most 256
//                          per turn, so that reading (and acknowledging) what comes next is never
//                          held up for long, as a server that hands accepted connections to its
//                          own workers does. Either way it
//                          owns each one from the handler on; deferred, the acknowledgement leaves
//                          first.
//
// Result files, one JSON object each, written atomically (rename) into HANDOFF_BENCH_DIR:
//   sender-<pid>.json    the drained instance: when handoff() was called (t0), how long the call
//                        took, when the first batch's "handoff" event came back, when
//                        on_handoff_done ran (t1), landed/returned counts, its own CPU time from t0
//                        to t1, and brokerd's (its parent's /proc/<pid>/schedstat) over the same
//                        window.
//   receiver-<pid>.json  the successor: connections received, bad states, when the first and last
//                        arrived, CPU time from the wakeup that brought the first to the end of the
//                        one that brought the last, and the CPU time spent in its on_connection
//                        handler (inline: its epoll_ctl), estimated from 1 call in 64, and
//                        deferred, in the turns that register what it was given (measured, per
//                        turn).
// All times are CLOCK_MONOTONIC nanoseconds, one clock for every process on the machine.
//
// Exit status: 0 after a drain (or when brokerd closes the connection while idle), 1 on errors.

#include <broker/client.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace {

constexpr int kMaxEvents = 256;
constexpr int kAcceptBatch = 256;   // per listener per wakeup
constexpr int kProcessBatch = 64;   // client.process() calls per wakeup
constexpr std::size_t kRegisterPerTurn = 256; // deferred: connections registered per loop turn
constexpr std::size_t kMaxState = broker::Client::kMaxHandoffState;
constexpr std::size_t kHandlerSample = 64; // 1 in 64 on_connection calls timed, see Worker::adopt()
constexpr std::uint64_t kClientTag = UINT64_MAX;      // epoll data of the broker connection
constexpr std::uint64_t kListenerTag = 1ull << 32;    // | listener fd

__attribute__((format(printf, 1, 2))) void log(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	std::vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	std::fprintf(stderr, "broker-handoff-worker: %s\n", line);
}

[[noreturn]] void fail(const char *what)
{
	throw std::system_error(errno, std::generic_category(), what);
}

std::int64_t clock_ns(clockid_t clock)
{
	timespec ts{};
	clock_gettime(clock, &ts);
	return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

std::int64_t now_ns()
{
	return clock_ns(CLOCK_MONOTONIC);
}

std::int64_t cpu_ns()
{
	return clock_ns(CLOCK_PROCESS_CPUTIME_ID);
}

// The CPU time a process has run, in ns (first field of /proc/<pid>/schedstat), or -1.
std::int64_t schedstat_ns(pid_t pid)
{
	char path[64];
	std::snprintf(path, sizeof path, "/proc/%d/schedstat", static_cast<int>(pid));
	FILE *f = std::fopen(path, "re");
	if (!f)
		return -1;
	long long ns = -1;
	if (std::fscanf(f, "%lld", &ns) != 1)
		ns = -1;
	std::fclose(f);
	return ns;
}

// Owns one fd; the library's UniqueFd is private to the project.
class Fd {
public:
	Fd() = default;
	explicit Fd(int fd) : fd_(fd) {}
	Fd(Fd &&o) noexcept : fd_(o.release()) {}
	Fd &operator=(Fd &&o) noexcept
	{
		if (this != &o) {
			reset();
			fd_ = o.release();
		}
		return *this;
	}
	Fd(const Fd &) = delete;
	Fd &operator=(const Fd &) = delete;
	~Fd() { reset(); }
	int get() const { return fd_; }
	[[nodiscard]] int release()
	{
		int fd = fd_;
		fd_ = -1;
		return fd;
	}
	void reset()
	{
		if (fd_ >= 0)
			::close(fd_);
		fd_ = -1;
	}

private:
	int fd_ = -1;
};

std::size_t env_size(const char *name, std::size_t fallback, std::size_t max)
{
	const char *v = std::getenv(name);
	if (!v || !*v)
		return fallback;
	char *end = nullptr;
	errno = 0;
	unsigned long long n = std::strtoull(v, &end, 10);
	if (errno || *end || n > max)
		throw std::runtime_error(std::string(name) + ": expected a count up to " + std::to_string(max));
	return static_cast<std::size_t>(n);
}

// The soft fd limit up to the hard one: brokerd gives workers the limit it was started with, and
// this worker holds every connection of the benchmark at once.
void raise_fd_limit()
{
	rlimit nofile{};
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &nofile) < 0)
			log("cannot raise RLIMIT_NOFILE: %s, ignoring", std::strerror(errno));
	}
}

// What the sender attaches to a connection: its client's port, padded to `size` bytes.
std::string state_for(int fd, std::size_t size)
{
	if (size == 0)
		return {};
	sockaddr_storage ss{};
	socklen_t len = sizeof ss;
	unsigned port = 0;
	if (getpeername(fd, reinterpret_cast<sockaddr *>(&ss), &len) == 0) {
		if (ss.ss_family == AF_INET)
			port = ntohs(reinterpret_cast<sockaddr_in *>(&ss)->sin_port);
		else if (ss.ss_family == AF_INET6)
			port = ntohs(reinterpret_cast<sockaddr_in6 *>(&ss)->sin6_port);
	}
	std::string s = std::to_string(port);
	s.resize(std::max(size, s.size()), 'x');
	s.resize(size);
	return s;
}

// Written to a temporary name and renamed, so the driver never reads half a file.
void write_result(const std::string &dir, const char *role, const std::string &body)
{
	std::string name = dir + "/" + role + "-" + std::to_string(getpid()) + ".json";
	std::string tmp = name + ".tmp";
	FILE *f = std::fopen(tmp.c_str(), "we");
	if (!f)
		fail("fopen(result)");
	std::fputs(body.c_str(), f);
	bool ok = std::fflush(f) == 0;
	ok = std::fclose(f) == 0 && ok;
	if (!ok || std::rename(tmp.c_str(), name.c_str()) < 0)
		fail("write result");
}

struct SenderStats {
	std::size_t handed = 0;
	std::int64_t prep_ns = 0;         // leaving the event loop and building the list, before t0
	std::int64_t t0 = 0;              // just before client.handoff()
	std::int64_t call_ns = 0;         // client.handoff() itself: queueing, the first batches sent
	std::int64_t first_landed = 0;    // the process() that brought the first "handoff" event
	std::int64_t t1 = 0;              // on_handoff_done
	std::int64_t cpu0 = 0, cpu1 = 0;
	std::int64_t broker0 = -1, broker1 = -1;
	std::size_t wakeups = 0;
	broker::HandoffSummary summary;
};

struct ReceiverStats {
	std::size_t received = 0;
	std::size_t bad_state = 0;
	std::size_t failed = 0;           // could not be watched; closed
	std::int64_t first = 0, last = 0; // CLOCK_MONOTONIC at the first and last on_connection
	std::int64_t cpu_first = -1, cpu_last = 0;
	std::int64_t handler_ns = 0;      // CPU time in on_connection, estimated from a sample
	std::int64_t register_ns = 0;     // deferred: CPU time of the turns that register (and check)
	std::size_t wakeups = 0;
	bool written = false;
};

class Worker {
public:
	Worker();
	int run();

private:
	void watch(int fd, std::uint64_t data, std::uint32_t events, int op = EPOLL_CTL_ADD);
	void update_broker_events();
	void on_accept(int listener);
	void on_readable(int fd);
	void close_connection(int fd);
	void adopt(int fd, std::string state);
	void serve(int fd);
	void keep_for_check(int fd, std::string state);
	void check_states();
	void begin_handoff();
	void finish();
	std::string sender_json() const;
	std::string receiver_json() const;

	broker::Client client_;
	std::string dir_;
	std::size_t expect_ = 0;
	std::size_t state_bytes_ = 0;
	bool deferred_ = false;
	std::deque<std::pair<int, std::string>> given_; // deferred: handed to on_connection, not registered yet
	std::vector<std::pair<int, std::string>> unchecked_; // registered, their states not checked yet
	std::string greeting_;
	Fd epoll_;
	std::uint32_t broker_events_ = 0;
	std::vector<int> listeners_;
	std::vector<char> open_; // by fd: a connection this instance serves
	std::size_t open_count_ = 0;
	std::int64_t clock_cost_ = 0; // of one CPU clock read, taken out of each handler sample

	bool draining_ = false;
	bool handing_ = false;
	bool done_ = false;
	SenderStats sent_;
	ReceiverStats recv_;
};

Worker::Worker() : client_(broker::Client::from_env(broker::ClientOptions{.accept_handoff = true}))
{
	const char *dir = std::getenv("HANDOFF_BENCH_DIR");
	if (!dir || !*dir)
		throw std::runtime_error("HANDOFF_BENCH_DIR is not set");
	dir_ = dir;
	expect_ = env_size("HANDOFF_BENCH_EXPECT", 0, 10000000);
	state_bytes_ = env_size("HANDOFF_BENCH_STATE", 0, kMaxState);
	if (const char *reg = std::getenv("HANDOFF_BENCH_REGISTER"); reg && *reg) {
		if (std::string(reg) != "inline" && std::string(reg) != "deferred")
			throw std::runtime_error("HANDOFF_BENCH_REGISTER must be inline or deferred");
		deferred_ = std::string(reg) == "deferred";
	}
	greeting_ = std::to_string(client_.generation()) + "\n";

	epoll_ = Fd(epoll_create1(EPOLL_CLOEXEC));
	if (epoll_.get() < 0)
		fail("epoll_create1");
	for (const broker::Listener &l : client_.listeners()) {
		// O_NONBLOCK is shared with brokerd and every other instance, which all expect EAGAIN
		// from accept() anyway (see examples/http_worker.cpp).
		int flags = fcntl(l.fd, F_GETFL);
		if (flags < 0 || fcntl(l.fd, F_SETFL, flags | O_NONBLOCK) < 0)
			fail("fcntl(O_NONBLOCK)");
		listeners_.push_back(l.fd);
		watch(l.fd, kListenerTag | static_cast<unsigned>(l.fd), EPOLLIN);
	}
	update_broker_events();

	client_.on_drain([this](const broker::DrainRequest &) { draining_ = true; });
	client_.on_connection([this](int fd, std::string state) { adopt(fd, std::move(state)); });
	// Nobody took it: the driver will count it as lost when this instance exits.
	client_.on_returned([](int fd, std::string) { ::close(fd); });
	client_.on_handoff_done([this](const broker::HandoffSummary &s) {
		sent_.t1 = now_ns();
		sent_.cpu1 = cpu_ns();
		sent_.summary = s;
		done_ = true;
	});

	constexpr int kCalibrate = 256;
	std::int64_t start = now_ns();
	for (int i = 0; i < kCalibrate; i++)
		clock_ns(CLOCK_THREAD_CPUTIME_ID);
	clock_cost_ = (now_ns() - start) / kCalibrate;

	rlimit nofile{};
	getrlimit(RLIMIT_NOFILE, &nofile);
	open_.assign(nofile.rlim_cur == RLIM_INFINITY ? 1u << 20 : static_cast<std::size_t>(nofile.rlim_cur), 0);
	client_.ready();
}

void Worker::watch(int fd, std::uint64_t data, std::uint32_t events, int op)
{
	epoll_event ev{};
	ev.events = events;
	ev.data.u64 = data;
	if (epoll_ctl(epoll_.get(), op, fd, &ev) < 0)
		fail("epoll_ctl");
}

void Worker::update_broker_events()
{
	short want = client_.events();
	std::uint32_t events = (want & POLLIN ? EPOLLIN : 0u) | (want & POLLOUT ? EPOLLOUT : 0u);
	if (broker_events_ == 0)
		watch(client_.fd(), kClientTag, events);
	else if (events != broker_events_)
		watch(client_.fd(), kClientTag, events, EPOLL_CTL_MOD);
	broker_events_ = events;
}

void Worker::on_accept(int listener)
{
	for (int i = 0; i < kAcceptBatch; i++) {
		int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EAGAIN)
				return;
			log("accept4: %s, ignoring", std::strerror(errno));
			return;
		}
		if (static_cast<std::size_t>(fd) >= open_.size()) {
			::close(fd);
			continue;
		}
		epoll_event ev{};
		ev.events = EPOLLIN;
		ev.data.u64 = static_cast<unsigned>(fd);
		if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0 ||
		    send(fd, greeting_.data(), greeting_.size(), MSG_NOSIGNAL | MSG_DONTWAIT) !=
		            static_cast<ssize_t>(greeting_.size())) {
			::close(fd);
			continue;
		}
		open_[fd] = 1;
		open_count_++;
	}
}

// Each 'q' gets one answer. MSG_DONTWAIT: a handed-off socket is blocking or not as its first
// owner made it, and this loop must not block either way.
void Worker::on_readable(int fd)
{
	char buf[256];
	ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0)
		return close_connection(fd);
	for (ssize_t i = 0; i < n; i++) {
		if (buf[i] != 'q')
			continue;
		if (send(fd, greeting_.data(), greeting_.size(), MSG_NOSIGNAL | MSG_DONTWAIT) !=
		    static_cast<ssize_t>(greeting_.size()))
			return close_connection(fd);
	}
}

void Worker::close_connection(int fd)
{
	if (!open_[fd])
		return;
	open_[fd] = 0;
	open_count_--;
	::close(fd); // leaves the epoll set with its last reference
}

void Worker::adopt(int fd, std::string state)
{
	// The handler's own CPU time, sampled: a CPU clock read is a system call, and reading it
	// twice for every connection would add a visible share to what it measures.
	// The first call, with its one-time costs, is not one of them.
	bool sample = recv_.received % kHandlerSample == kHandlerSample / 2;
	std::int64_t cpu_start = sample ? clock_ns(CLOCK_THREAD_CPUTIME_ID) : 0;
	if (recv_.received == 0)
		recv_.first = now_ns();
	recv_.received++;
	if (deferred_) {
		given_.emplace_back(fd, std::move(state));
	} else {
		serve(fd);
		keep_for_check(fd, std::move(state));
	}
	if (sample)
		recv_.handler_ns += std::max<std::int64_t>(clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_start - clock_cost_, 0) *
		                    kHandlerSample;
}

// The bench's own check that each state came with its own socket (getpeername: a system call,
// about 0.7 us), made once the receiver holds them all: outside the path of the handoff, as the
// raw receiver checks its fds after its stamp.
void Worker::keep_for_check(int fd, std::string state)
{
	if (state_bytes_ > 0)
		unchecked_.emplace_back(fd, std::move(state));
}

void Worker::check_states()
{
	for (const auto &[fd, state] : unchecked_)
		if (state != state_for(fd, state_bytes_))
			recv_.bad_state++;
	unchecked_.clear();
}

// Into the epoll set, to be served.
void Worker::serve(int fd)
{
	epoll_event ev{};
	ev.events = EPOLLIN;
	ev.data.u64 = static_cast<unsigned>(fd);
	if (static_cast<std::size_t>(fd) >= open_.size() || epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0) {
		::close(fd);
		recv_.failed++;
	} else {
		open_[fd] = 1;
		open_count_++;
	}
	recv_.last = now_ns();
}

// Off the event loop, then everything to the successor. Only the client's fd is watched from
// here on: a fresh epoll set drops the N connections at once instead of one epoll_ctl each.
void Worker::begin_handoff()
{
	handing_ = true;
	std::int64_t prep = now_ns();
	Fd quiet(epoll_create1(EPOLL_CLOEXEC));
	if (quiet.get() < 0)
		fail("epoll_create1");
	epoll_ = std::move(quiet);
	broker_events_ = 0;
	update_broker_events();

	std::vector<std::string> states;
	std::vector<broker::Connection> conns;
	states.reserve(open_count_);
	conns.reserve(open_count_);
	for (std::size_t fd = 0; fd < open_.size(); fd++)
		if (open_[fd])
			states.push_back(state_for(static_cast<int>(fd), state_bytes_));
	std::size_t k = 0;
	for (std::size_t fd = 0; fd < open_.size(); fd++)
		if (open_[fd])
			conns.push_back({static_cast<int>(fd), states[k++]});

	sent_.handed = conns.size();
	sent_.broker0 = schedstat_ns(getppid());
	sent_.cpu0 = cpu_ns();
	sent_.t0 = now_ns();
	sent_.prep_ns = sent_.t0 - prep;
	if (conns.empty()) {
		sent_.t1 = sent_.t0;
		sent_.cpu1 = sent_.cpu0;
		done_ = true;
	} else {
		client_.handoff(conns); // the library owns every one of them now
	}
	sent_.call_ns = now_ns() - sent_.t0;
	std::fill(open_.begin(), open_.end(), 0);
	open_count_ = 0;
	update_broker_events();
}

void Worker::finish()
{
	sent_.broker1 = schedstat_ns(getppid());
	write_result(dir_, "sender", sender_json());
	if (recv_.received > 0 && !recv_.written) {
		check_states();
		write_result(dir_, "receiver", receiver_json());
	}
}

std::string Worker::sender_json() const
{
	char buf[1024];
	const SenderStats &s = sent_;
	std::snprintf(buf, sizeof buf,
	              "{\"role\":\"sender\",\"pid\":%d,\"generation\":%" PRIu64 ",\"handed\":%zu,\"landed\":%zu,"
	              "\"returned\":%zu,\"prep_ns\":%" PRId64 ",\"t0_ns\":%" PRId64 ",\"call_ns\":%" PRId64
	              ",\"first_landed_ns\":%" PRId64 ",\"t1_ns\":%" PRId64 ",\"cpu_ns\":%" PRId64
	              ",\"broker_cpu_ns\":%" PRId64 ",\"wakeups\":%zu,\"state_bytes\":%zu}\n",
	              static_cast<int>(getpid()), client_.generation(), s.handed, s.summary.landed, s.summary.returned,
	              s.prep_ns, s.t0, s.call_ns, s.first_landed, s.t1, s.cpu1 - s.cpu0,
	              s.broker0 >= 0 && s.broker1 >= 0 ? s.broker1 - s.broker0 : -1, s.wakeups, state_bytes_);
	return buf;
}

std::string Worker::receiver_json() const
{
	char buf[1024];
	const ReceiverStats &r = recv_;
	std::snprintf(buf, sizeof buf,
	              "{\"role\":\"receiver\",\"pid\":%d,\"generation\":%" PRIu64 ",\"received\":%zu,"
	              "\"bad_state\":%zu,\"failed\":%zu,\"first_ns\":%" PRId64 ",\"last_ns\":%" PRId64
	              ",\"cpu_ns\":%" PRId64 ",\"handler_ns\":%" PRId64 ",\"register_ns\":%" PRId64
	              ",\"wakeups\":%zu}\n",
	              static_cast<int>(getpid()), client_.generation(), r.received, r.bad_state, r.failed, r.first,
	              r.last, r.cpu_first >= 0 ? r.cpu_last - r.cpu_first : 0, r.handler_ns, r.register_ns,
	              r.wakeups);
	return buf;
}

int Worker::run()
{
	epoll_event events[kMaxEvents];
	for (;;) {
		int n = epoll_wait(epoll_.get(), events, kMaxEvents, given_.empty() ? -1 : 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fail("epoll_wait");
		}
		std::int64_t cpu_wake = cpu_ns();
		std::size_t received_before = recv_.received;
		std::size_t open_before = open_count_;
		std::size_t landed_before = client_.handoff_summary().landed + client_.handoff_summary().returned;
		for (int i = 0; i < n; i++) {
			std::uint64_t data = events[i].data.u64;
			if (data == kClientTag) {
				try {
					for (int k = 0; k < kProcessBatch && client_.process(); k++) {
					}
				} catch (const broker::Error &e) {
					if (!handing_ && e.code() == ECONNRESET) {
						log("brokerd closed the connection, exiting");
						return 0;
					}
					throw;
				}
			} else if (data & kListenerTag) {
				if (!draining_)
					on_accept(static_cast<int>(data & 0xffffffffu));
			} else if (!handing_) {
				on_readable(static_cast<int>(data));
			}
		}
		if (!given_.empty()) {
			std::int64_t cpu_start = clock_ns(CLOCK_THREAD_CPUTIME_ID);
			for (std::size_t k = 0; k < kRegisterPerTurn && !given_.empty(); k++) {
				serve(given_.front().first);
				keep_for_check(given_.front().first, std::move(given_.front().second));
				given_.pop_front();
			}
			recv_.register_ns += clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
		}
		// Deferred, the wakeups that register what came count too.
		if (recv_.received != received_before || (recv_.received > 0 && open_count_ != open_before)) {
			recv_.wakeups++;
			if (recv_.cpu_first < 0)
				recv_.cpu_first = cpu_wake;
			recv_.cpu_last = cpu_ns();
		}
		if (handing_) {
			sent_.wakeups++;
			const broker::HandoffSummary &s = client_.handoff_summary();
			if (sent_.first_landed == 0 && s.landed + s.returned != landed_before)
				sent_.first_landed = now_ns();
		}
		if (expect_ > 0 && !recv_.written && recv_.received >= expect_ && given_.empty()) {
			check_states();
			write_result(dir_, "receiver", receiver_json());
			recv_.written = true;
		}
		if (draining_ && !handing_)
			begin_handoff();
		if (done_) {
			finish();
			return 0;
		}
		update_broker_events();
	}
}

} // namespace

int main()
{
	signal(SIGPIPE, SIG_IGN);
	raise_fd_limit();
	try {
		Worker w;
		return w.run();
	} catch (const std::exception &e) {
		log("%s", e.what());
		return 1;
	}
}
