// broker-loadgen: HTTP/1.1 GET load against a loopback server, counting every failure a client can see.
//
// One process, one epoll loop, --connections slots. Each slot runs one request at a time:
//   close      a new TCP connection per request, sending "Connection: close";
//   keepalive  one persistent connection per slot. It is replaced when the server said
//              "Connection: close" (or answered HTTP/1.0 without keep-alive), or ended it while no
//              request was outstanding (see "Idle connections"). A reset or EOF while a request is
//              outstanding is a failure of that request.
//
// Accounting: every request that starts ends as exactly one ok or one failure, so that
// requests == ok + sum(failures) always holds. A request starts when its slot begins it (the
// connect() in close mode, or on a fresh keep-alive connection; the send() on a reused one), and
// its latency runs from there to the last byte of the response. Failures, one per request:
//   connect_refused  connect() failed with ECONNREFUSED
//   connect_other    any other connect() failure, including socket() running out of fds
//   reset            ECONNRESET or EPIPE (or another socket error) once connected, including a
//                    connection established and reset before its connect() was seen to finish
//   eof              the server closed the connection before the response head was complete
//   timeout          no complete response within --timeout of the start, connect included
//   bad_status       a well-formed response whose status is not 2xx
//   wrong_body       a malformed response, a body cut short by EOF, an unsupported
//                    Transfer-Encoding, or a body without the --expect substring
// Only ok responses enter the latency histograms. The JSON output also counts the errno behind
// each connect_other and reset failure ("errno": {"reset": {"ECONNRESET": 3}}), and, with the
// body's "gen N" and "pid N", the distinct generations and server processes that answered.
//
// Idle connections (keepalive): a server may close a keep-alive connection between requests, and
// a client then opens a new one (RFC 9112 9.3). What decides is whether any byte of the next
// request went out first. Before each reuse the connection is checked (a MSG_PEEK recv), as a
// careful client does, so:
//   idle_closes  a clean FIN on an idle connection, before any byte of the next request: an
//                orderly close, not a failure. The next request opens a new connection.
//   idle_resets  a reset (or another socket error), or bytes nobody asked for, on an idle
//                connection: a failure, of the connection rather than of a request, so it is
//                counted apart from the requests. A real client may have its next request on the
//                way, or its state in the connection; a server that drains resets nothing.
// A close that comes once the next request was sent is that request's eof or reset: a failure.
//
// Phases: SIGUSR1 says an upgrade began, SIGUSR2 that it ended. A request counts as "upgrade" when
// any part of its life overlapped an upgrade window, else as "steady"; its failures are split
// the same way. An idle close or reset counts in the phase it happened in.
//
// Shutdown: when --duration ends, or on the first SIGINT/SIGTERM, no new request starts and the
// requests in flight run to completion, or to their own --timeout, where they count as timeout.
// A second SIGINT/SIGTERM stops at once and counts the requests still in flight as timeout.
// A hard cap of 10 minutes applies when no --duration is given, and to --duration itself.
//
// Exit status: 0 when it ran (the caller judges the numbers), 2 on a usage error, 1 when the
// load could not run at all (e.g. epoll failed).

#include "proto/unique_fd.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace {

using proto::UniqueFd;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int kExitRuntime = 1;
constexpr int kExitUsage = 2;

constexpr std::size_t kMaxConnections = 10000;      // also clipped to RLIMIT_NOFILE
constexpr std::size_t kFdReserve = 16;              // epoll, signalfd, stdio
constexpr std::size_t kMaxHead = 64 * 1024;         // a longer response head is wrong_body
constexpr std::size_t kMaxBody = 1024 * 1024;       // so is a larger body
constexpr std::size_t kRecvChunk = 16 * 1024;
constexpr auto kHardCap = std::chrono::minutes(10); // the run always ends by itself
constexpr auto kTimeoutScan = 10ms;                 // resolution of request timeouts
constexpr auto kMaxRateLag = 100ms;                 // --rate catches up at most this much
constexpr std::size_t kMaxPidsTracked = 100000;
constexpr int kMaxEvents = 256;

// ---- Failures and phases ----

enum Failure { ConnectRefused, ConnectOther, Reset, Eof, Timeout, BadStatus, WrongBody, kFailureCount };
constexpr std::array<const char *, kFailureCount> kFailureNames = {
	"connect_refused", "connect_other", "reset", "eof", "timeout", "bad_status", "wrong_body"};

enum Phase { Steady, Upgrade, kPhaseCount };
constexpr std::array<const char *, kPhaseCount> kPhaseNames = {"steady", "upgrade"};

// ---- Latency histogram: log-linear, exact below 64 us, then 32 buckets per power of two ----

class Histogram {
public:
	void add(std::uint64_t us)
	{
		counts_[index(us)]++;
		count_++;
		sum_ += us;
		max_ = std::max(max_, us);
	}

	std::uint64_t count() const { return count_; }
	std::uint64_t max() const { return max_; }
	double mean() const { return count_ ? static_cast<double>(sum_) / static_cast<double>(count_) : 0; }

	// The highest value of the bucket that holds the q-th sample: at most 1/32 above the truth.
	std::uint64_t percentile(double q) const
	{
		if (count_ == 0)
			return 0;
		auto rank = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(count_)));
		rank = std::clamp<std::uint64_t>(rank, 1, count_);
		std::uint64_t seen = 0;
		for (std::size_t i = 0; i < counts_.size(); i++) {
			seen += counts_[i];
			if (seen >= rank)
				return std::min(upper(i), max_);
		}
		return max_;
	}

private:
	static constexpr int kSubBits = 5;
	static constexpr std::size_t kSub = 1u << kSubBits;   // 32
	static constexpr std::size_t kLinear = 2 * kSub;      // 64 exact buckets

	static std::size_t index(std::uint64_t v)
	{
		if (v < kLinear)
			return static_cast<std::size_t>(v);
		int msb = 63 - std::countl_zero(v); // >= 6
		int shift = msb - kSubBits;
		auto sub = static_cast<std::size_t>(v >> shift) - kSub;
		return kLinear + static_cast<std::size_t>(msb - kSubBits - 1) * kSub + sub;
	}

	static std::uint64_t upper(std::size_t i)
	{
		if (i < kLinear)
			return i;
		int msb = static_cast<int>((i - kLinear) / kSub) + kSubBits + 1;
		std::uint64_t sub = (i - kLinear) % kSub;
		int shift = msb - kSubBits;
		std::uint64_t lower = (kSub + sub) << shift;
		return lower + ((std::uint64_t{1} << shift) - 1);
	}

	std::array<std::uint64_t, kLinear + (64 - kSubBits - 1) * kSub> counts_{};
	std::uint64_t count_ = 0, sum_ = 0, max_ = 0;
};

// ---- Parsing of options ----

struct Options {
	sockaddr_storage addr{};
	socklen_t addr_len = 0;
	std::string host_header;
	bool keepalive = false;
	std::size_t connections = 16;
	std::optional<Clock::duration> duration;
	double rate = 0; // requests/s over all slots; 0: as fast as the server answers
	Clock::duration timeout = 2s;
	std::string expect;
	std::string path = "/";
	bool json = false;
};

// "10s", "250ms", "1m30s", "2h"; a bare number is seconds.
std::optional<Clock::duration> parse_duration(std::string_view s)
{
	if (s.empty())
		return std::nullopt;
	std::chrono::microseconds total{0};
	bool bare = s.find_first_not_of("0123456789.") == std::string_view::npos;
	while (!s.empty()) {
		double value = 0;
		auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
		if (ec != std::errc() || p == s.data() || value < 0 || !std::isfinite(value) || value > 1e9)
			return std::nullopt;
		s.remove_prefix(static_cast<std::size_t>(p - s.data()));
		double scale;
		if (bare) {
			scale = 1e6;
		} else if (s.starts_with("ms")) {
			scale = 1e3;
			s.remove_prefix(2);
		} else if (s.starts_with("us")) {
			scale = 1;
			s.remove_prefix(2);
		} else if (s.starts_with("s")) {
			scale = 1e6;
			s.remove_prefix(1);
		} else if (s.starts_with("m")) {
			scale = 60e6;
			s.remove_prefix(1);
		} else if (s.starts_with("h")) {
			scale = 3600e6;
			s.remove_prefix(1);
		} else {
			return std::nullopt;
		}
		total += std::chrono::microseconds(static_cast<std::int64_t>(value * scale));
	}
	return std::chrono::duration_cast<Clock::duration>(total);
}

// HOST:PORT with a numeric IPv4 address, "localhost", or [IPv6]. Only loopback addresses: this
// tool generates load, and load belongs on this machine.
bool parse_target(const std::string &text, Options &opts, std::string &error)
{
	std::size_t colon = text.rfind(':');
	if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
		error = "--target: expected HOST:PORT, got \"" + text + "\"";
		return false;
	}
	std::string host = text.substr(0, colon);
	std::string port_text = text.substr(colon + 1);
	unsigned port = 0;
	auto [p, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
	if (ec != std::errc() || p != port_text.data() + port_text.size() || port == 0 || port > 65535) {
		error = "--target: invalid port \"" + port_text + "\"";
		return false;
	}
	if (host == "localhost")
		host = "127.0.0.1";
	if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
		auto &sin6 = reinterpret_cast<sockaddr_in6 &>(opts.addr);
		sin6.sin6_family = AF_INET6;
		sin6.sin6_port = htons(static_cast<std::uint16_t>(port));
		if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &sin6.sin6_addr) != 1) {
			error = "--target: invalid IPv6 address " + host;
			return false;
		}
		const auto &a = sin6.sin6_addr;
		bool loopback = IN6_IS_ADDR_LOOPBACK(&a) || (IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127);
		if (!loopback) {
			error = "--target: " + host + " is not a loopback address";
			return false;
		}
		opts.addr_len = sizeof sin6;
	} else {
		auto &sin = reinterpret_cast<sockaddr_in &>(opts.addr);
		sin.sin_family = AF_INET;
		sin.sin_port = htons(static_cast<std::uint16_t>(port));
		if (inet_pton(AF_INET, host.c_str(), &sin.sin_addr) != 1) {
			error = "--target: expected a numeric address, localhost or [IPv6], got \"" + host + "\"";
			return false;
		}
		if ((ntohl(sin.sin_addr.s_addr) >> 24) != 127) {
			error = "--target: " + host + " is not a loopback address (127.0.0.0/8)";
			return false;
		}
		opts.addr_len = sizeof sin;
	}
	opts.host_header = host + ":" + port_text;
	return true;
}

// ---- Parsing of responses ----

char lower(char c)
{
	return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

bool iequals(std::string_view a, std::string_view b)
{
	return a.size() == b.size() &&
	       std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) { return lower(x) == lower(y); });
}

std::string_view trim(std::string_view s)
{
	while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
		s.remove_prefix(1);
	while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
		s.remove_suffix(1);
	return s;
}

bool has_token(std::string_view list, std::string_view token)
{
	while (!list.empty()) {
		std::size_t comma = list.find(',');
		if (iequals(trim(list.substr(0, comma)), token))
			return true;
		if (comma == std::string_view::npos)
			break;
		list.remove_prefix(comma + 1);
	}
	return false;
}

struct Head {
	enum Kind { Incomplete, Complete, Malformed } kind = Incomplete;
	int status = 0;
	bool keep_alive = false;
	std::size_t length = 0;                    // of the head, CRLFCRLF included
	std::optional<std::size_t> content_length; // none: the body runs to EOF
};

Head parse_head(std::string_view in)
{
	Head h;
	std::size_t end = in.find("\r\n\r\n");
	if (end == std::string_view::npos) {
		if (in.size() > kMaxHead)
			h.kind = Head::Malformed;
		return h;
	}
	h.length = end + 4;
	h.kind = Head::Malformed;
	std::string_view head = in.substr(0, end + 2);

	// status-line = HTTP-version SP status-code SP [reason-phrase]
	std::size_t eol = head.find("\r\n");
	std::string_view line = head.substr(0, eol);
	head.remove_prefix(eol + 2);
	if (line.size() < 12 || !line.starts_with("HTTP/1.") || (line[7] != '0' && line[7] != '1') ||
	    line[8] != ' ' || (line.size() > 12 && line[12] != ' '))
		return h;
	for (std::size_t i = 9; i < 12; i++)
		if (line[i] < '0' || line[i] > '9')
			return h;
	h.status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
	if (h.status < 200)
		return h; // 1xx is never sent for a plain GET
	bool http11 = line[7] == '1';

	bool conn_close = false, conn_keep_alive = false;
	while (!head.empty()) {
		eol = head.find("\r\n");
		line = head.substr(0, eol);
		head.remove_prefix(eol + 2);
		std::size_t colon = line.find(':');
		if (colon == std::string_view::npos || colon == 0)
			return h;
		std::string_view name = line.substr(0, colon);
		std::string_view value = trim(line.substr(colon + 1));
		if (iequals(name, "Content-Length")) {
			std::size_t n = 0;
			auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
			if (value.empty() || ec != std::errc() || p != value.data() + value.size())
				return h;
			if (h.content_length && *h.content_length != n)
				return h;
			h.content_length = n;
		} else if (iequals(name, "Connection")) {
			conn_close = conn_close || has_token(value, "close");
			conn_keep_alive = conn_keep_alive || has_token(value, "keep-alive");
		} else if (iequals(name, "Transfer-Encoding")) {
			return h; // chunked bodies are not read: none of the servers measured sends one
		}
	}
	if (h.status == 204 || h.status == 304)
		h.content_length = 0;
	if (h.content_length && *h.content_length > kMaxBody)
		return h;
	h.keep_alive = (http11 ? !conn_close : conn_keep_alive && !conn_close) && h.content_length.has_value();
	h.kind = Head::Complete;
	return h;
}

// The number after "key " in the body, as in "hello from web gen 3 pid 1234".
std::optional<std::uint64_t> number_after(std::string_view body, std::string_view key)
{
	std::size_t at = body.find(key);
	if (at == std::string_view::npos)
		return std::nullopt;
	std::string_view rest = body.substr(at + key.size());
	std::uint64_t n = 0;
	auto [p, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), n);
	if (ec != std::errc() || p == rest.data())
		return std::nullopt;
	return n;
}

// ---- The load ----

enum class State {
	Closed,     // no socket, no request
	Connecting, // request outstanding from here to the end of Receiving
	Sending,
	Receiving,
	Idle,       // keep-alive connection open, no request
};

struct Slot {
	UniqueFd sock;
	State state = State::Closed;
	std::uint32_t tag = 0; // tells this connection's epoll events from a previous one's
	bool queued = false;   // waits in Loadgen::ready_ for its next request
	Clock::time_point start, deadline;
	bool upgrade = false;                // the request overlapped an upgrade window so far
	std::uint64_t upgrades_at_start = 0; // Loadgen::upgrade_windows_ when it started
	std::size_t sent = 0;
	std::string in;

	bool outstanding() const
	{
		return state == State::Connecting || state == State::Sending || state == State::Receiving;
	}
};

class Loadgen {
public:
	Loadgen(const Options &opts, const sigset_t &signals);
	void run();
	void report() const;

private:
	void watch(Slot &slot, std::size_t index);
	void start(std::size_t index);
	void connected(std::size_t index);
	void on_event(std::size_t index, std::uint32_t events);
	void send_request(std::size_t index);
	void receive(std::size_t index);
	void on_idle_event(std::size_t index);
	bool idle_connection_ended(std::size_t index, bool peek);
	void succeed(std::size_t index, const Head &head);
	void fail(std::size_t index, Failure why, int error = 0);
	void finish(std::size_t index, bool keep_connection);
	void close_connection(Slot &slot);
	void on_signals();
	void begin_stop();
	void check_timeouts();
	int wait_ms() const;
	Phase phase_of(const Slot &slot) const;

	const Options &opts_;
	std::string request_;
	UniqueFd epoll_;
	UniqueFd signals_;
	std::vector<Slot> slots_;
	std::deque<std::size_t> ready_; // slots that may start a request
	std::size_t outstanding_ = 0;

	Clock::time_point now_, begin_, end_, stopped_at_, finished_at_;
	Clock::time_point next_start_, next_scan_;
	Clock::duration interval_{};
	bool stopping_ = false, aborted_ = false;
	bool in_upgrade_ = false;
	std::uint64_t upgrade_windows_ = 0;

	// Results.
	std::uint64_t started_ = 0;
	std::array<std::uint64_t, kPhaseCount> ok_{};
	std::array<std::array<std::uint64_t, kFailureCount>, kPhaseCount> failures_{};
	std::array<Histogram, kPhaseCount> latency_;
	std::uint64_t connections_opened_ = 0;
	std::uint64_t reconnects_ = 0;  // keep-alive: a new connection after a clean close
	std::array<std::uint64_t, kPhaseCount> idle_closes_{}; // keep-alive: a clean FIN while idle
	std::array<std::uint64_t, kPhaseCount> idle_resets_{}; // keep-alive: a reset or stray bytes while idle
	std::set<std::uint64_t> generations_;
	std::set<std::uint64_t> pids_;
	std::map<Failure, std::map<int, std::uint64_t>> errors_; // errno behind connect_other and reset
	std::map<int, std::uint64_t> idle_errors_;               // errno behind idle_resets
};

constexpr std::uint64_t kSignalKey = ~std::uint64_t{0};

Loadgen::Loadgen(const Options &opts, const sigset_t &signals) : opts_(opts)
{
	request_ = "GET " + opts.path + " HTTP/1.1\r\nHost: " + opts.host_header +
		   "\r\nUser-Agent: broker-loadgen\r\nAccept: */*\r\nConnection: " +
		   (opts.keepalive ? "keep-alive" : "close") + "\r\n\r\n";
	epoll_ = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
	if (!epoll_)
		throw std::system_error(errno, std::generic_category(), "epoll_create1");
	signals_ = UniqueFd(signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC));
	if (!signals_)
		throw std::system_error(errno, std::generic_category(), "signalfd");
	epoll_event ev{};
	ev.events = EPOLLIN;
	ev.data.u64 = kSignalKey;
	if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, signals_.get(), &ev) < 0)
		throw std::system_error(errno, std::generic_category(), "epoll_ctl");
	slots_.resize(opts.connections);
	if (opts.rate > 0)
		interval_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / opts.rate));
}

Phase Loadgen::phase_of(const Slot &slot) const
{
	bool upgrade = slot.upgrade || in_upgrade_ || upgrade_windows_ != slot.upgrades_at_start;
	return upgrade ? Upgrade : Steady;
}

void Loadgen::watch(Slot &slot, std::size_t index)
{
	// Edge-triggered, registered once per connection: every handler reads or writes until EAGAIN.
	epoll_event ev{};
	ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
	ev.data.u64 = (static_cast<std::uint64_t>(slot.tag) << 32) | index;
	if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, slot.sock.get(), &ev) < 0)
		throw std::system_error(errno, std::generic_category(), "epoll_ctl(ADD)");
}

void Loadgen::start(std::size_t index)
{
	Slot &s = slots_[index];
	started_++;
	outstanding_++;
	s.start = now_;
	s.deadline = now_ + opts_.timeout;
	s.upgrade = in_upgrade_;
	s.upgrades_at_start = upgrade_windows_;
	s.sent = 0;
	s.in.clear();

	if (s.state == State::Idle && !idle_connection_ended(index, true)) {
		s.state = State::Sending;
		return send_request(index);
	}

	s.sock = UniqueFd(socket(opts_.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
	if (!s.sock) {
		s.state = State::Connecting;
		return fail(index, ConnectOther, errno);
	}
	if (opts_.keepalive && connections_opened_ >= opts_.connections)
		reconnects_++;
	connections_opened_++;
	s.tag++;
	int one = 1;
	setsockopt(s.sock.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	s.state = State::Connecting;
	if (connect(s.sock.get(), reinterpret_cast<const sockaddr *>(&opts_.addr), opts_.addr_len) == 0) {
		watch(s, index);
		return connected(index);
	}
	if (errno == EINPROGRESS) {
		watch(s, index);
		return;
	}
	fail(index, errno == ECONNREFUSED ? ConnectRefused : ConnectOther, errno);
}

void Loadgen::connected(std::size_t index)
{
	slots_[index].state = State::Sending;
	send_request(index);
}

void Loadgen::on_event(std::size_t index, std::uint32_t events)
{
	Slot &s = slots_[index];
	switch (s.state) {
	case State::Closed:
		return;
	case State::Connecting: {
		if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		int err = 0;
		socklen_t len = sizeof err;
		if (getsockopt(s.sock.get(), SOL_SOCKET, SO_ERROR, &err, &len) < 0)
			err = errno;
		if (err == 0)
			return connected(index);
		// A reset in SYN_SENT reads as ECONNREFUSED; ECONNRESET means the connection was
		// established (queued on a listener) and reset before this event was handled.
		Failure why = err == ECONNREFUSED ? ConnectRefused : err == ECONNRESET ? Reset : ConnectOther;
		return fail(index, why, err);
	}
	case State::Sending:
		return send_request(index);
	case State::Receiving:
		return receive(index);
	case State::Idle:
		return on_idle_event(index);
	}
}

void Loadgen::send_request(std::size_t index)
{
	Slot &s = slots_[index];
	while (s.sent < request_.size()) {
		ssize_t n = send(s.sock.get(), request_.data() + s.sent, request_.size() - s.sent, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			return fail(index, Reset, errno);
		}
		s.sent += static_cast<std::size_t>(n);
	}
	s.state = State::Receiving;
	receive(index);
}

// Reads until EAGAIN (the connection is edge-triggered), then judges what arrived.
void Loadgen::receive(std::size_t index)
{
	Slot &s = slots_[index];
	bool eof = false;
	int error = 0;
	for (;;) {
		if (s.in.size() > kMaxHead + kMaxBody)
			return fail(index, WrongBody);
		std::size_t old = s.in.size();
		s.in.resize(old + kRecvChunk);
		ssize_t n = recv(s.sock.get(), s.in.data() + old, kRecvChunk, 0);
		s.in.resize(old + static_cast<std::size_t>(std::max<ssize_t>(n, 0)));
		if (n > 0)
			continue;
		if (n == 0)
			eof = true;
		else if (errno == EINTR)
			continue;
		else if (errno != EAGAIN)
			error = errno;
		break;
	}

	Head head = parse_head(s.in);
	if (head.kind == Head::Malformed)
		return fail(index, WrongBody);
	if (head.kind == Head::Complete) {
		std::size_t have = s.in.size() - head.length;
		if (head.content_length && have >= *head.content_length) {
			// Bytes past the response were never asked for: the connection is not reused.
			if (have > *head.content_length || eof || error)
				head.keep_alive = false;
			s.in.resize(head.length + *head.content_length);
			return succeed(index, head);
		}
		if (!head.content_length && eof)
			return succeed(index, head); // delimited by the close
		if (eof)
			return fail(index, WrongBody); // short body
	}
	if (error)
		return fail(index, Reset, error);
	if (eof)
		return fail(index, Eof);
	// Incomplete: wait for more, or for the timeout.
}

// A keep-alive connection between requests: the server may close it with a FIN (see the header).
void Loadgen::on_idle_event(std::size_t index)
{
	idle_connection_ended(index, false);
}

// Whether the server ended an idle connection, which is then closed here and counted as an idle
// close (a clean FIN) or an idle reset (anything else). With `peek`, the check before a reuse:
// it takes nothing off the socket.
bool Loadgen::idle_connection_ended(std::size_t index, bool peek)
{
	Slot &s = slots_[index];
	char buf[512];
	ssize_t n;
	do
		n = recv(s.sock.get(), buf, peek ? 1 : sizeof buf, MSG_DONTWAIT | (peek ? MSG_PEEK : 0));
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == EAGAIN)
		return false;
	// EOF, a reset, or bytes nobody asked for: this connection is done either way.
	Phase phase = in_upgrade_ ? Upgrade : Steady;
	if (n == 0) {
		idle_closes_[phase]++;
	} else {
		idle_resets_[phase]++;
		if (n < 0)
			idle_errors_[errno]++;
	}
	close_connection(s);
	s.state = State::Closed;
	return true;
}

void Loadgen::succeed(std::size_t index, const Head &head)
{
	Slot &s = slots_[index];
	Phase phase = phase_of(s);
	if (head.status < 200 || head.status > 299) {
		failures_[phase][BadStatus]++;
		return finish(index, head.keep_alive);
	}
	std::string_view body = std::string_view(s.in).substr(head.length);
	if (!opts_.expect.empty() && body.find(opts_.expect) == std::string_view::npos) {
		failures_[phase][WrongBody]++;
		return finish(index, head.keep_alive);
	}
	if (auto gen = number_after(body, "gen "))
		generations_.insert(*gen);
	if (auto pid = number_after(body, "pid "); pid && pids_.size() < kMaxPidsTracked)
		pids_.insert(*pid);
	ok_[phase]++;
	latency_[phase].add(static_cast<std::uint64_t>(
		std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - s.start).count()));
	finish(index, head.keep_alive);
}

void Loadgen::fail(std::size_t index, Failure why, int error)
{
	failures_[phase_of(slots_[index])][why]++;
	if (error)
		errors_[why][error]++;
	finish(index, false);
}

// Ends the slot's request, counted already, and queues the slot for its next one.
void Loadgen::finish(std::size_t index, bool keep_connection)
{
	Slot &s = slots_[index];
	outstanding_--;
	s.in.clear();
	if (opts_.keepalive && keep_connection && !stopping_) {
		s.state = State::Idle;
	} else {
		close_connection(s);
		s.state = State::Closed;
	}
	if (!stopping_ && !s.queued) {
		s.queued = true;
		ready_.push_back(index);
	}
}

void Loadgen::close_connection(Slot &slot)
{
	// close() takes the fd out of epoll; an event of it still in this batch is ignored by its tag.
	slot.sock.reset();
	slot.tag++;
}

void Loadgen::on_signals()
{
	signalfd_siginfo si;
	while (read(signals_.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
		switch (si.ssi_signo) {
		case SIGUSR1:
			if (!in_upgrade_) {
				in_upgrade_ = true;
				upgrade_windows_++;
			}
			break;
		case SIGUSR2:
			in_upgrade_ = false;
			break;
		default: // SIGINT, SIGTERM
			if (stopping_)
				aborted_ = true;
			begin_stop();
			break;
		}
	}
}

void Loadgen::begin_stop()
{
	if (stopping_)
		return;
	stopping_ = true;
	stopped_at_ = now_;
	ready_.clear();
	for (Slot &s : slots_) {
		s.queued = false;
		if (s.state == State::Idle) {
			close_connection(s);
			s.state = State::Closed;
		}
	}
}

void Loadgen::check_timeouts()
{
	for (std::size_t i = 0; i < slots_.size(); i++)
		if (slots_[i].outstanding() && (aborted_ || now_ >= slots_[i].deadline))
			fail(i, Timeout);
	next_scan_ = now_ + kTimeoutScan;
}

int Loadgen::wait_ms() const
{
	auto next = Clock::time_point::max();
	if (!stopping_)
		next = std::min(next, end_);
	if (outstanding_ > 0)
		next = std::min(next, next_scan_);
	if (!stopping_ && !ready_.empty())
		next = std::min(next, interval_.count() ? next_start_ : now_);
	if (next == Clock::time_point::max())
		return -1;
	if (next <= now_)
		return 0;
	return static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(next - now_).count());
}

void Loadgen::run()
{
	now_ = Clock::now();
	begin_ = now_;
	end_ = now_ + std::min<Clock::duration>(opts_.duration.value_or(kHardCap), kHardCap);
	next_start_ = now_;
	next_scan_ = now_ + kTimeoutScan;
	for (std::size_t i = 0; i < slots_.size(); i++) {
		slots_[i].queued = true;
		ready_.push_back(i);
	}

	epoll_event events[kMaxEvents];
	for (;;) {
		// Start what may start: each ready slot once per turn (a refused connect fails at once and
		// queues its slot again), or as many as --rate allows by now.
		now_ = Clock::now();
		for (std::size_t turn = ready_.size(); !stopping_ && turn > 0 && !ready_.empty(); turn--) {
			if (interval_.count()) {
				if (now_ < next_start_)
					break;
				next_start_ = std::max(next_start_ + interval_, now_ - kMaxRateLag);
			}
			std::size_t i = ready_.front();
			ready_.pop_front();
			slots_[i].queued = false;
			start(i);
		}
		if (stopping_ && outstanding_ == 0)
			break;

		int n = epoll_wait(epoll_.get(), events, kMaxEvents, wait_ms());
		if (n < 0 && errno != EINTR)
			throw std::system_error(errno, std::generic_category(), "epoll_wait");
		now_ = Clock::now();
		for (int k = 0; k < n; k++) {
			std::uint64_t key = events[k].data.u64;
			if (key == kSignalKey) {
				on_signals();
				continue;
			}
			auto index = static_cast<std::size_t>(key & 0xffffffffu);
			if (index < slots_.size() && slots_[index].tag == static_cast<std::uint32_t>(key >> 32))
				on_event(index, events[k].events);
		}
		if (!stopping_ && now_ >= end_)
			begin_stop();
		if (aborted_ || (outstanding_ > 0 && now_ >= next_scan_))
			check_timeouts();
	}
	finished_at_ = Clock::now();
	if (!stopping_)
		stopped_at_ = finished_at_;
}

std::string errno_name(int err)
{
	const char *name = strerrorname_np(err);
	return name ? name : std::to_string(err);
}

json latency_json(const Histogram &h)
{
	return {{"count", h.count()},
		{"p50", h.percentile(0.50)},
		{"p99", h.percentile(0.99)},
		{"p999", h.percentile(0.999)},
		{"max", h.max()},
		{"mean", std::round(h.mean())}};
}

void Loadgen::report() const
{
	std::uint64_t ok = ok_[Steady] + ok_[Upgrade];
	std::array<std::uint64_t, kFailureCount> failures{};
	std::uint64_t failed = 0;
	for (int f = 0; f < kFailureCount; f++) {
		failures[f] = failures_[Steady][f] + failures_[Upgrade][f];
		failed += failures[f];
	}
	double seconds = std::chrono::duration<double>(finished_at_ - begin_).count();
	double load_seconds = std::chrono::duration<double>(stopped_at_ - begin_).count();
	if (ok + failed != started_ || outstanding_ != 0)
		std::fprintf(stderr, "broker-loadgen: accounting error: %llu started, %llu ok, %llu failed\n",
			     static_cast<unsigned long long>(started_), static_cast<unsigned long long>(ok),
			     static_cast<unsigned long long>(failed));

	if (opts_.json) {
		json out;
		out["mode"] = opts_.keepalive ? "keepalive" : "close";
		out["target"] = opts_.host_header;
		out["connections"] = opts_.connections;
		out["requests"] = started_;
		out["ok"] = ok;
		out["failed"] = failed;
		json by_type = json::object(), by_phase = json::object();
		for (int f = 0; f < kFailureCount; f++)
			by_type[kFailureNames[f]] = failures[f];
		for (int p = 0; p < kPhaseCount; p++) {
			json counts = json::object();
			for (int f = 0; f < kFailureCount; f++)
				counts[kFailureNames[f]] = failures_[p][f];
			by_phase[kPhaseNames[p]] = {{"ok", ok_[p]},
						    {"failures", counts},
						    {"idle_resets", idle_resets_[p]},
						    {"idle_closes", idle_closes_[p]}};
		}
		out["failures"] = by_type;
		json errors = json::object();
		for (const auto &[why, counts] : errors_)
			for (const auto &[err, n] : counts)
				errors[kFailureNames[why]][errno_name(err)] = n;
		for (const auto &[err, n] : idle_errors_)
			errors["idle_reset"][errno_name(err)] = n;
		out["errno"] = errors;
		out["phases"] = by_phase;
		out["latency_us"] = {{"steady", latency_json(latency_[Steady])},
				     {"upgrade", latency_json(latency_[Upgrade])}};
		out["generations_seen"] = generations_;
		out["pids_seen"] = pids_.size();
		out["upgrade_windows"] = upgrade_windows_;
		out["connections_opened"] = connections_opened_;
		out["reconnects"] = reconnects_;
		out["idle_resets"] = idle_resets_[Steady] + idle_resets_[Upgrade];
		out["idle_closes"] = idle_closes_[Steady] + idle_closes_[Upgrade];
		out["duration_s"] = std::round(seconds * 1000) / 1000;
		out["load_duration_s"] = std::round(load_seconds * 1000) / 1000;
		out["requests_per_s"] = load_seconds > 0 ? std::round(static_cast<double>(started_) / load_seconds) : 0;
		std::cout << out.dump() << std::endl;
		return;
	}

	std::printf("broker-loadgen: %s, %zu connections, target %s, %.2f s\n",
		    opts_.keepalive ? "keepalive" : "close", opts_.connections, opts_.host_header.c_str(), seconds);
	std::printf("requests %llu  ok %llu  failed %llu  (%.0f/s)\n", static_cast<unsigned long long>(started_),
		    static_cast<unsigned long long>(ok), static_cast<unsigned long long>(failed),
		    load_seconds > 0 ? static_cast<double>(started_) / load_seconds : 0.0);
	std::printf("\n%-16s %10s %10s\n", "failure", "steady", "upgrade");
	for (int f = 0; f < kFailureCount; f++)
		std::printf("%-16s %10llu %10llu\n", kFailureNames[f],
			    static_cast<unsigned long long>(failures_[Steady][f]),
			    static_cast<unsigned long long>(failures_[Upgrade][f]));
	if (opts_.keepalive) {
		std::printf("%-16s %10llu %10llu   (a connection reset while idle: a failure)\n", "idle_reset",
			    static_cast<unsigned long long>(idle_resets_[Steady]),
			    static_cast<unsigned long long>(idle_resets_[Upgrade]));
		std::printf("%-16s %10llu %10llu   (a clean FIN while idle: orderly, not a failure)\n", "idle_close",
			    static_cast<unsigned long long>(idle_closes_[Steady]),
			    static_cast<unsigned long long>(idle_closes_[Upgrade]));
	}
	std::printf("\n%-10s %10s %10s %10s %10s %10s\n", "latency us", "count", "p50", "p99", "p99.9", "max");
	for (int p = 0; p < kPhaseCount; p++) {
		const Histogram &h = latency_[p];
		std::printf("%-10s %10llu %10llu %10llu %10llu %10llu\n", kPhaseNames[p],
			    static_cast<unsigned long long>(h.count()),
			    static_cast<unsigned long long>(h.percentile(0.50)),
			    static_cast<unsigned long long>(h.percentile(0.99)),
			    static_cast<unsigned long long>(h.percentile(0.999)),
			    static_cast<unsigned long long>(h.max()));
	}
	std::printf("\nupgrade windows %llu, connections opened %llu, reconnects %llu\n",
		    static_cast<unsigned long long>(upgrade_windows_),
		    static_cast<unsigned long long>(connections_opened_), static_cast<unsigned long long>(reconnects_));
	auto print_errors = [](const char *what, const std::map<int, std::uint64_t> &counts) {
		std::printf("%s errors:", what);
		for (const auto &[err, n] : counts)
			std::printf(" %s %llu", errno_name(err).c_str(), static_cast<unsigned long long>(n));
		std::printf("\n");
	};
	for (const auto &[why, counts] : errors_)
		print_errors(kFailureNames[why], counts);
	if (!idle_errors_.empty())
		print_errors("idle_reset", idle_errors_);
	std::printf("generations seen:");
	for (auto g : generations_)
		std::printf(" %llu", static_cast<unsigned long long>(g));
	std::printf("%s\ndistinct server pids: %zu\n", generations_.empty() ? " none" : "", pids_.size());
}

// Raises the soft fd limit to the hard one: each connection is an fd.
std::size_t fd_budget()
{
	rlimit nofile{};
	if (getrlimit(RLIMIT_NOFILE, &nofile) < 0)
		return kMaxConnections;
	if (nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		setrlimit(RLIMIT_NOFILE, &nofile);
		getrlimit(RLIMIT_NOFILE, &nofile);
	}
	if (nofile.rlim_cur == RLIM_INFINITY)
		return kMaxConnections;
	return nofile.rlim_cur > kFdReserve ? static_cast<std::size_t>(nofile.rlim_cur - kFdReserve) : 0;
}

} // namespace

int main(int argc, char **argv)
{
	// Blocked before anything else, so that they queue on the signalfd from the start.
	sigset_t signals;
	sigemptyset(&signals);
	for (int sig : {SIGINT, SIGTERM, SIGUSR1, SIGUSR2})
		sigaddset(&signals, sig);
	sigprocmask(SIG_BLOCK, &signals, nullptr);
	signal(SIGPIPE, SIG_IGN);

	CLI::App app{"broker-loadgen: HTTP/1.1 GET load against a loopback server, counting every failure a "
		     "client can see. SIGUSR1 marks the start of an upgrade window, SIGUSR2 its end."};
	app.footer("Keep-alive connections between requests: a clean FIN before any byte of the next request is an "
		   "orderly close (idle_closes, not a failure; the next request opens a new connection). A reset, "
		   "or bytes nobody asked for, on an idle connection is a failure (idle_resets, counted apart from "
		   "the requests). A close once the next request was sent fails that request (eof or reset).");
	Options opts;
	std::string target, mode = "close", duration_text, timeout_text = "2s";
	app.add_option("--target", target, "HOST:PORT, a loopback address")->required();
	app.add_option("--mode", mode, "close: a connection per request; keepalive: persistent connections")
		->check(CLI::IsMember({"close", "keepalive"}))
		->capture_default_str();
	app.add_option("--connections", opts.connections, "Concurrent requests (and sockets)")
		->check(CLI::Range(std::size_t{1}, kMaxConnections))
		->capture_default_str();
	app.add_option("--duration", duration_text, "How long to run, e.g. 10s (default: until SIGINT, at most 10m)");
	app.add_option("--rate", opts.rate, "Cap on requests per second over all connections (default: none)")
		->check(CLI::Range(0.0, 1e7));
	app.add_option("--timeout", timeout_text, "Per-request timeout, connect included")->capture_default_str();
	app.add_option("--expect", opts.expect, "A substring every response body must contain");
	app.add_option("--path", opts.path, "The request target")->capture_default_str();
	app.add_flag("--json", opts.json, "Print one JSON object instead of tables");
	try {
		app.parse(argc, argv);
	} catch (const CLI::ParseError &e) {
		int r = app.exit(e);
		return r == 0 ? 0 : kExitUsage;
	}

	auto usage = [](const std::string &message) {
		std::cerr << "broker-loadgen: " << message << "\n";
		return kExitUsage;
	};
	std::string error;
	if (!parse_target(target, opts, error))
		return usage(error);
	opts.keepalive = mode == "keepalive";
	if (!duration_text.empty()) {
		opts.duration = parse_duration(duration_text);
		if (!opts.duration || *opts.duration <= Clock::duration::zero())
			return usage("--duration: expected a duration like \"10s\", got \"" + duration_text + "\"");
		if (*opts.duration > kHardCap)
			return usage("--duration: at most 10m");
	}
	auto timeout = parse_duration(timeout_text);
	if (!timeout || *timeout < 1ms || *timeout > kHardCap)
		return usage("--timeout: expected a duration from 1ms to 10m, got \"" + timeout_text + "\"");
	opts.timeout = *timeout;
	if (opts.path.empty() || opts.path.front() != '/' ||
	    opts.path.find_first_of(std::string_view(" \r\n\t\0", 5)) != std::string::npos)
		return usage("--path: expected an absolute path without spaces");
	if (opts.connections > fd_budget())
		return usage("--connections: more than the fd limit (RLIMIT_NOFILE) allows");

	try {
		Loadgen loadgen(opts, signals);
		loadgen.run();
		loadgen.report();
	} catch (const std::exception &e) {
		std::cerr << "broker-loadgen: " << e.what() << "\n";
		return kExitRuntime;
	}
	return 0;
}
