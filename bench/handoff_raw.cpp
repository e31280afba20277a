// broker-handoff-raw: the kernel's own speed at passing established TCP connections to another process.
//
//   broker-handoff-raw [--counts 1000,4000,15000] [--repeat 3] [--batch 253] [--register] [--json]
//
// The baseline that a connection handoff through brokerd is measured against: no broker, no JSON,
// nothing but SCM_RIGHTS. For each N, one process sends N accepted loopback TCP connections to
// another over an AF_UNIX SOCK_STREAM socketpair, --batch fds (SCM_MAX_FD, 253, by default) and one
// payload byte per sendmsg. The receiver takes them with MSG_CMSG_CLOEXEC, rejects MSG_CTRUNC and
// any count but N, and stamps the moment it holds all N. The time reported runs from just before
// the first sendmsg (the sender's CLOCK_MONOTONIC) to that stamp (the receiver's, the same clock),
// which the receiver returns in its acknowledgement.
//
// --register: the receiver also puts each fd into an epoll set (EPOLL_CTL_ADD, EPOLLIN) as it
// arrives, before its stamp, as a server that goes on serving the connections must. The baseline
// for a handoff whose receiver registers each connection in its handler.
//
// CPU: each process's CLOCK_PROCESS_CPUTIME_ID over its part of the timed window (the sender from
// just before the first sendmsg to the receiver's acknowledgement, the receiver from just before
// its first recvmsg to its stamp), summed per connection: what passing costs all processes.
//
// Three processes, each forked before any connection exists, so that none inherits another's fds:
//   sender    this process: the listener on 127.0.0.1:0 and the server side of every connection.
//   receiver  receives each run's N fds, and only after its stamp checks that every one is an
//             ESTABLISHED TCP socket, closes them and acknowledges. Closing is thus outside the
//             timed window, and the next run starts with an empty fd table.
//   holder    connects the client sides and keeps them open until the end, so the fds passed are
//             established connections, as in a real handoff, and not half-closed ones. Holding them
//             here instead of in the sender keeps each process at about N fds rather than 2N:
//             15000 connections fit under a hard RLIMIT_NOFILE of 20000.
// The sender keeps its references across runs (SCM_RIGHTS passes new references, it does not move
// them), so one set of max(--counts) connections serves every run and every N; N below the maximum
// sends the first N. A real handoff's close in the old process is not on the path to the receiver
// holding the fds, so leaving it out changes nothing measured.
//
// Bounds: each process needs N plus a small reserve of fds, and the kernel also caps fds in flight
// per user at RLIMIT_NOFILE, so an N above the hard limit minus that reserve is refused before any
// work. Every blocking call has a deadline, both children die with the sender (PR_SET_PDEATHSIG),
// and the client sides close with a reset (SO_LINGER 0) so that no run leaves TIME_WAIT behind.
//
// Exit status: 0 once the table is printed (times are never judged), 1 when a run failed (an fd
// missing, surplus or not an established TCP socket, a truncated control message, a timeout),
// 2 on a usage error or an N the fd limit cannot hold.

#include "proto/limits.hpp"
#include "proto/unique_fd.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using proto::UniqueFd;
using json = nlohmann::json;

constexpr int kExitRuntime = 1;
constexpr int kExitUsage = 2;

constexpr std::size_t kMaxBatch = proto::limits::kMaxFdsPerMessage; // SCM_MAX_FD
constexpr std::size_t kFdReserve = 32;       // stdio, listener, socketpairs, slack
constexpr std::size_t kMaxCount = 1000000;   // --counts sanity cap; RLIMIT_NOFILE is the real one
constexpr unsigned kMaxRepeat = 100;
constexpr std::size_t kConnectChunk = 128;   // connects ahead of accept: within any somaxconn
constexpr int kIoTimeoutSeconds = 60;        // any single wait; loopback setup of 15000 takes ~1 s
constexpr char kPayload = 'F';               // the byte each fd-carrying message rides on
constexpr char kChunkConnected = 'C';
constexpr char kChunkAccepted = 'A';
constexpr char kReady = 'R';

struct Options {
	std::vector<std::size_t> counts{1000, 4000, 15000};
	unsigned repeat = 3;
	std::size_t batch = kMaxBatch;
	bool register_fds = false;
	bool json = false;
};

// Sender -> receiver before each run, outside the timed window.
struct RunHeader {
	std::uint64_t count;
	std::uint64_t batch;
	std::uint64_t register_fds; // 1: into an epoll set as they arrive
};

// Receiver -> sender after each run.
struct RunAck {
	std::int64_t done_ns;       // CLOCK_MONOTONIC when the receiver held all fds
	std::uint64_t received;     // fds received
	std::uint64_t established;  // of those, ESTABLISHED TCP sockets
	std::int64_t cpu_ns;        // the receiver's CPU time from its first recvmsg to done_ns
};

struct Run {
	double ms;                  // from the first sendmsg to the receiver holding all
	double cpu_us_per_fd;       // sender's and receiver's CPU time in that window, per fd
};

struct Result {
	std::size_t count;
	std::vector<double> ms;     // one per run, in run order
	std::vector<double> cpu_us; // the same runs' CPU per fd
};

[[noreturn]] void fail(const std::string &what)
{
	throw std::runtime_error(what);
}

[[noreturn]] void fail_errno(const std::string &what)
{
	int e = errno;
	if (e == EAGAIN || e == EWOULDBLOCK)
		fail(what + ": timed out after " + std::to_string(kIoTimeoutSeconds) + " s");
	fail(what + ": " + std::strerror(e));
}

std::int64_t clock_ns(clockid_t clock)
{
	timespec ts{};
	clock_gettime(clock, &ts);
	return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

std::int64_t monotonic_ns()
{
	return clock_ns(CLOCK_MONOTONIC);
}

std::int64_t cpu_ns()
{
	return clock_ns(CLOCK_PROCESS_CPUTIME_ID);
}

void set_io_timeouts(int fd)
{
	timeval tv{kIoTimeoutSeconds, 0};
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
		fail_errno("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO)");
}

void write_all(int fd, const void *data, std::size_t size, const char *what)
{
	const char *p = static_cast<const char *>(data);
	while (size > 0) {
		ssize_t n = send(fd, p, size, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail_errno(what);
		p += n;
		size -= static_cast<std::size_t>(n);
	}
}

// False on EOF before the first byte; EOF within the object is an error.
bool read_all(int fd, void *data, std::size_t size, const char *what)
{
	char *p = static_cast<char *>(data);
	std::size_t got = 0;
	while (got < size) {
		ssize_t n = recv(fd, p + got, size - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail_errno(what);
		if (n == 0) {
			if (got == 0)
				return false;
			fail(std::string(what) + ": peer closed mid-message");
		}
		got += static_cast<std::size_t>(n);
	}
	return true;
}

void expect_byte(int fd, char want, const char *what)
{
	char c = 0;
	if (!read_all(fd, &c, 1, what))
		fail(std::string(what) + ": peer exited (see its error above)");
	if (c != want)
		fail(std::string(what) + ": unexpected byte");
}

// A child never returns into the sender's code, and never outlives the sender.
template <typename Fn>
pid_t fork_child(const char *name, Fn &&body)
{
	std::fflush(nullptr);
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid < 0)
		fail_errno("fork");
	if (pid > 0)
		return pid;
	int status = kExitRuntime;
	try {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
			fail_errno("prctl(PR_SET_PDEATHSIG)");
		if (getppid() != parent) // the sender died before the prctl
			_exit(kExitRuntime);
		status = body();
	} catch (const std::exception &e) {
		std::fprintf(stderr, "broker-handoff-raw: %s: %s\n", name, e.what());
	}
	std::fflush(nullptr);
	_exit(status);
}

// Owns a child's pid: reaped on success, killed and reaped when the sender gives up.
class Child {
public:
	Child(const char *name, pid_t pid) : name_(name), pid_(pid) {}
	Child(const Child &) = delete;
	Child &operator=(const Child &) = delete;
	~Child()
	{
		if (pid_ > 0) {
			kill(pid_, SIGKILL);
			waitpid(pid_, nullptr, 0);
		}
	}

	// Called once the child was told to finish (its socket closed): it exits at once.
	void reap()
	{
		int status = 0;
		pid_t r;
		do
			r = waitpid(pid_, &status, 0);
		while (r < 0 && errno == EINTR);
		if (r < 0)
			fail_errno(std::string("waitpid(") + name_ + ")");
		pid_ = -1;
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
			fail(std::string(name_) + " failed (status " + std::to_string(status) + ")");
	}

private:
	const char *name_;
	pid_t pid_;
};

// ---- Receiver ----

// One recvmsg: appends the fds it carried (owned from here on) and returns the payload bytes read.
std::size_t receive_some(int sock, std::vector<UniqueFd> &fds)
{
	char data[256];
	iovec iov{data, sizeof data};
	union {
		cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * kMaxBatch)];
	} control;
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = sizeof control.buf;

	ssize_t n;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		fail_errno("recvmsg");
	for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		std::size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		const unsigned char *p = CMSG_DATA(c);
		for (std::size_t i = 0; i < k; i++) {
			int fd;
			std::memcpy(&fd, p + i * sizeof(int), sizeof fd);
			fds.emplace_back(fd);
		}
	}
	// Checked after taking ownership, so that what did arrive is closed with the vector.
	if (msg.msg_flags & MSG_CTRUNC)
		fail("recvmsg: MSG_CTRUNC, fds were lost");
	if (n == 0)
		fail("the sender closed mid-run");
	for (ssize_t i = 0; i < n; i++)
		if (data[i] != kPayload)
			fail("unexpected payload byte");
	return static_cast<std::size_t>(n);
}

bool is_established_tcp(int fd)
{
	tcp_info info{};
	socklen_t len = sizeof info;
	return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 && info.tcpi_state == TCP_ESTABLISHED;
}

int run_receiver(int sock, std::size_t max_count)
{
	std::vector<UniqueFd> fds;
	fds.reserve(max_count + kMaxBatch);
	RunHeader header{};
	while (read_all(sock, &header, sizeof header, "read run header")) {
		if (header.count == 0 || header.count > max_count || header.batch == 0 || header.batch > kMaxBatch)
			fail("bad run header");
		std::size_t messages = (header.count + header.batch - 1) / header.batch;
		UniqueFd epoll;
		if (header.register_fds) {
			epoll = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
			if (!epoll)
				fail_errno("epoll_create1");
		}
		write_all(sock, &kReady, 1, "send ready");

		std::int64_t cpu_start = cpu_ns();
		std::size_t bytes = 0;
		while (fds.size() < header.count) {
			std::size_t from = fds.size();
			bytes += receive_some(sock, fds);
			for (std::size_t i = from; epoll && i < fds.size(); i++) {
				epoll_event ev{};
				ev.events = EPOLLIN;
				ev.data.fd = fds[i].get();
				if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fds[i].get(), &ev) < 0)
					fail_errno("epoll_ctl");
			}
		}
		std::int64_t done = monotonic_ns();
		RunAck ack{done, fds.size(), 0, cpu_ns() - cpu_start};

		// Outside the timed window: an fd too many, or a byte without its fds, is an error all the same.
		if (fds.size() != header.count)
			fail("received " + std::to_string(fds.size()) + " fds, expected " + std::to_string(header.count));
		if (bytes != messages)
			fail("received " + std::to_string(bytes) + " messages, expected " + std::to_string(messages));
		for (const UniqueFd &fd : fds)
			ack.established += is_established_tcp(fd.get());
		fds.clear();
		write_all(sock, &ack, sizeof ack, "send ack");
	}
	return 0;
}

// ---- Holder ----

UniqueFd connect_client(const sockaddr_in &addr)
{
	UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	if (!fd)
		fail_errno("socket");
	// A reset on close instead of a FIN: no TIME_WAIT left behind, run after run.
	linger lg{1, 0};
	if (setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg) < 0)
		fail_errno("setsockopt(SO_LINGER)");
	set_io_timeouts(fd.get()); // SO_SNDTIMEO bounds a blocking connect
	int r;
	do
		r = connect(fd.get(), reinterpret_cast<const sockaddr *>(&addr), sizeof addr);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		fail_errno(errno == EADDRNOTAVAIL ? "connect (out of ephemeral ports? see ip_local_port_range)"
						  : "connect");
	return fd;
}

// Connects in chunks that the sender accepts before the next, so the accept queue never overflows
// (an overflow costs a 1 s SYN retransmit, not an error, but it would skew nothing but the setup).
int run_holder(int ctl, const sockaddr_in &addr, std::size_t count)
{
	std::vector<UniqueFd> clients;
	clients.reserve(count);
	while (clients.size() < count) {
		std::size_t chunk = std::min(kConnectChunk, count - clients.size());
		for (std::size_t i = 0; i < chunk; i++)
			clients.push_back(connect_client(addr));
		write_all(ctl, &kChunkConnected, 1, "report chunk");
		expect_byte(ctl, kChunkAccepted, "wait for accept");
	}
	// Hold until the sender closes its end; its death kills us anyway.
	timeval forever{0, 0};
	setsockopt(ctl, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof forever);
	char c;
	for (;;) {
		ssize_t n = recv(ctl, &c, 1, 0);
		if (n < 0 && errno == EINTR)
			continue;
		return n == 0 ? 0 : kExitRuntime; // anything but EOF is a protocol slip
	}
}

// ---- Sender ----

UniqueFd accept_one(int listener)
{
	for (;;) {
		int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
		if (fd >= 0)
			return UniqueFd(fd);
		if (errno == EINTR || errno == ECONNABORTED)
			continue;
		if (errno != EAGAIN)
			fail_errno("accept4");
		pollfd p{listener, POLLIN, 0};
		int r = poll(&p, 1, kIoTimeoutSeconds * 1000);
		if (r == 0)
			fail("accept: timed out after " + std::to_string(kIoTimeoutSeconds) + " s");
		if (r < 0 && errno != EINTR)
			fail_errno("poll");
	}
}

void send_fds(int sock, const int *fds, std::size_t count)
{
	char byte = kPayload;
	iovec iov{&byte, 1};
	union {
		cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * kMaxBatch)];
	} control;
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
	cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int) * count);
	std::memcpy(CMSG_DATA(c), fds, sizeof(int) * count);
	ssize_t n;
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		fail_errno(errno == ETOOMANYREFS ? "sendmsg (fds in flight exceed RLIMIT_NOFILE)" : "sendmsg");
	if (n != 1)
		fail("sendmsg: short write");
}

// One timed run: the first `count` fds to the receiver.
Run run_once(int sock, const std::vector<int> &fds, std::size_t count, std::size_t batch, bool register_fds)
{
	RunHeader header{count, batch, register_fds ? 1u : 0u};
	write_all(sock, &header, sizeof header, "send run header");
	expect_byte(sock, kReady, "wait for receiver");

	std::int64_t cpu_start = cpu_ns();
	std::int64_t start = monotonic_ns();
	for (std::size_t sent = 0; sent < count; sent += batch)
		send_fds(sock, fds.data() + sent, std::min(batch, count - sent));

	RunAck ack{};
	if (!read_all(sock, &ack, sizeof ack, "read ack"))
		fail("the receiver exited mid-run (any error of its own is above)");
	if (ack.received != count || ack.established != count)
		fail("receiver got " + std::to_string(ack.received) + " fds of " + std::to_string(count) + ", " +
		     std::to_string(ack.established) + " of them established TCP sockets");
	if (ack.done_ns < start)
		fail("receiver's timestamp precedes the first sendmsg");
	std::int64_t cpu = cpu_ns() - cpu_start + ack.cpu_ns;
	return {static_cast<double>(ack.done_ns - start) / 1e6, static_cast<double>(cpu) / 1e3 / static_cast<double>(count)};
}

// Soft RLIMIT_NOFILE up to the hard one; returns the limit each process then has.
std::size_t raise_fd_limit()
{
	rlimit nofile{};
	if (getrlimit(RLIMIT_NOFILE, &nofile) < 0)
		fail_errno("getrlimit(RLIMIT_NOFILE)");
	if (nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &nofile) < 0)
			fail_errno("setrlimit(RLIMIT_NOFILE)");
	}
	return nofile.rlim_cur == RLIM_INFINITY ? SIZE_MAX : static_cast<std::size_t>(nofile.rlim_cur);
}

std::vector<Result> run(const Options &opts)
{
	std::size_t max_count = *std::max_element(opts.counts.begin(), opts.counts.end());

	UniqueFd listener(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!listener)
		fail_errno("socket");
	sockaddr_in addr{};
	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t addr_len = sizeof addr;
	if (bind(listener.get(), reinterpret_cast<const sockaddr *>(&addr), sizeof addr) < 0 ||
	    getsockname(listener.get(), reinterpret_cast<sockaddr *>(&addr), &addr_len) < 0)
		fail_errno("bind 127.0.0.1:0");
	if (listen(listener.get(), static_cast<int>(kConnectChunk * 2)) < 0)
		fail_errno("listen");

	int pair[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
		fail_errno("socketpair");
	UniqueFd data(pair[0]), data_peer(pair[1]);
	Child receiver("receiver", fork_child("receiver", [&] {
		listener.reset();
		data.reset();
		set_io_timeouts(data_peer.get());
		return run_receiver(data_peer.get(), max_count);
	}));
	data_peer.reset();
	set_io_timeouts(data.get());

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
		fail_errno("socketpair");
	UniqueFd ctl(pair[0]), ctl_peer(pair[1]);
	Child holder("holder", fork_child("holder", [&] {
		listener.reset();
		data.reset();
		ctl.reset();
		set_io_timeouts(ctl_peer.get());
		return run_holder(ctl_peer.get(), addr, max_count);
	}));
	ctl_peer.reset();
	set_io_timeouts(ctl.get());

	std::vector<UniqueFd> accepted;
	accepted.reserve(max_count);
	while (accepted.size() < max_count) {
		std::size_t chunk = std::min(kConnectChunk, max_count - accepted.size());
		expect_byte(ctl.get(), kChunkConnected, "wait for holder");
		for (std::size_t i = 0; i < chunk; i++)
			accepted.push_back(accept_one(listener.get()));
		write_all(ctl.get(), &kChunkAccepted, 1, "tell holder");
	}
	listener.reset();
	std::vector<int> raw;
	raw.reserve(accepted.size());
	for (const UniqueFd &fd : accepted)
		raw.push_back(fd.get());

	std::vector<Result> results;
	for (std::size_t count : opts.counts) {
		Result r{count, {}, {}};
		for (unsigned i = 0; i < opts.repeat; i++) {
			Run one = run_once(data.get(), raw, count, opts.batch, opts.register_fds);
			r.ms.push_back(one.ms);
			r.cpu_us.push_back(one.cpu_us_per_fd);
		}
		results.push_back(std::move(r));
	}

	data.reset();
	receiver.reap();
	ctl.reset();
	holder.reap();
	return results;
}

// ---- Output ----

double median(std::vector<double> v)
{
	std::sort(v.begin(), v.end());
	std::size_t m = v.size() / 2;
	return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

double best(const std::vector<double> &v)
{
	return *std::min_element(v.begin(), v.end());
}

void print_table(const Options &opts, std::size_t fd_limit, const std::vector<Result> &results)
{
	std::printf("broker-handoff-raw: accepted TCP connections over AF_UNIX SOCK_STREAM with SCM_RIGHTS, "
		    "%zu fds per sendmsg, %u run%s each, RLIMIT_NOFILE %zu%s\n",
		    opts.batch, opts.repeat, opts.repeat == 1 ? "" : "s", fd_limit,
		    opts.register_fds ? ", the receiver registering each fd in an epoll set" : "");
	std::printf("%8s %6s %6s %10s %10s %14s %14s %12s\n", "N", "batch", "msgs", "best ms", "median ms",
		    "fds/s best", "fds/s median", "cpu us/fd");
	for (const Result &r : results) {
		double b = best(r.ms), m = median(r.ms);
		std::printf("%8zu %6zu %6zu %10.3f %10.3f %14.0f %14.0f %12.3f\n", r.count, opts.batch,
			    (r.count + opts.batch - 1) / opts.batch, b, m, static_cast<double>(r.count) / b * 1e3,
			    static_cast<double>(r.count) / m * 1e3, median(r.cpu_us));
	}
}

void print_json(const Options &opts, std::size_t fd_limit, const std::vector<Result> &results)
{
	json out{{"batch", opts.batch}, {"repeat", opts.repeat}, {"rlimit_nofile", fd_limit},
		 {"register", opts.register_fds}, {"results", json::array()}};
	for (const Result &r : results) {
		double b = best(r.ms), m = median(r.ms);
		out["results"].push_back({{"n", r.count},
					  {"messages", (r.count + opts.batch - 1) / opts.batch},
					  {"runs_ms", r.ms},
					  {"runs_cpu_us_per_fd", r.cpu_us},
					  {"cpu_us_per_fd_median", median(r.cpu_us)},
					  {"best_ms", b},
					  {"median_ms", m},
					  {"fds_per_s_best", static_cast<double>(r.count) / b * 1e3},
					  {"fds_per_s_median", static_cast<double>(r.count) / m * 1e3}});
	}
	std::cout << out.dump(2) << std::endl;
}

} // namespace

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);

	CLI::App app{"broker-handoff-raw: how fast the kernel passes N established TCP connections to another "
		     "process with SCM_RIGHTS; the baseline for brokerd's connection handoff."};
	Options opts;
	app.add_option("--counts", opts.counts, "Numbers of connections to pass, e.g. 1000,4000,15000")
		->delimiter(',')
		->check(CLI::Range(std::size_t{1}, kMaxCount))
		->capture_default_str();
	app.add_option("--repeat", opts.repeat, "Runs per count")
		->check(CLI::Range(1u, kMaxRepeat))
		->capture_default_str();
	app.add_option("--batch", opts.batch, "Fds per sendmsg (SCM_MAX_FD is 253)")
		->check(CLI::Range(std::size_t{1}, kMaxBatch))
		->capture_default_str();
	app.add_flag("--register", opts.register_fds,
		     "The receiver puts each fd into an epoll set as it arrives, before its stamp");
	app.add_flag("--json", opts.json, "Print one JSON object instead of a table");
	try {
		app.parse(argc, argv);
	} catch (const CLI::ParseError &e) {
		int r = app.exit(e);
		return r == 0 ? 0 : kExitUsage;
	}

	try {
		std::size_t fd_limit = raise_fd_limit();
		for (std::size_t count : opts.counts) {
			if (fd_limit < kFdReserve || count > fd_limit - kFdReserve) {
				std::fprintf(stderr,
					     "broker-handoff-raw: --counts %zu: each process holds N fds plus %zu, but "
					     "RLIMIT_NOFILE's hard limit is %zu (at most %zu connections); raise it "
					     "(ulimit -Hn, LimitNOFILE=) or pass a smaller N\n",
					     count, kFdReserve, fd_limit, fd_limit > kFdReserve ? fd_limit - kFdReserve : 0);
				return kExitUsage;
			}
		}
		std::vector<Result> results = run(opts);
		if (opts.json)
			print_json(opts, fd_limit, results);
		else
			print_table(opts, fd_limit, results);
	} catch (const std::exception &e) {
		std::fprintf(stderr, "broker-handoff-raw: %s\n", e.what());
		return kExitRuntime;
	}
	return 0;
}
