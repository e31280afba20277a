// broker-example-http: a single-threaded epoll HTTP/1.1 server, the reference worker for libbroker-client.
//
// It serves every stream listener the broker hands it, with keep-alive and pipelining, and drains
// gracefully: on a drain request from brokerd, or on SIGTERM/SIGINT (the drain signal for workers under
// plain systemd), it stops accepting, finishes the requests it has, and exits 0.
//
// Under brokerd it also hands its established connections to the next generation when it drains, and
// takes those its predecessors hand to it (connection handoff, see Server::hand_off()):
//   - a keep-alive connection between requests moves at once, with the part of a request it has read
//     so far as its state; the successor parses that state first, then reads the rest from the socket.
//     The client sees one TCP connection throughout, answered by the new generation from then on.
//   - a connection with a response in flight moves once the response is out.
//   - a connection that nobody could take comes back (on_returned) and is served to its end with
//     "Connection: close", as every connection is when draining under plain systemd.
// The instance exits once it holds no connection and has no handoff unanswered, or at the deadline.
// If brokerd goes away (killed, crashed), it keeps serving and the library reconnects; it drains only
// if a brokerd refuses it (the link is Rejected), as nothing would ever ask it to otherwise.
//
// Routes: GET or HEAD of "/" (any query string) answers 200 with one line,
// "hello from web gen 1 pid 1234"; any other path answers 404 and any other method 405, so a load
// test aimed at a wrong URL fails visibly instead of counting as success.
//
// Without brokerd:  systemd-socket-activate -l 127.0.0.1:9090 broker-example-http
//                   curl -v http://127.0.0.1:9090/

#include <broker/client.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <list>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Limits on what one client controls, and on the work done per wakeup.
constexpr std::size_t kMaxConnections = 16384;        // also clipped to RLIMIT_NOFILE; see adopt()
constexpr std::size_t kMaxHeadBytes = 8 * 1024;       // request line and headers; more is 431
constexpr std::size_t kMaxBodyBytes = 8 * 1024;       // a larger request body is 413
constexpr std::size_t kInputBuffer = kMaxHeadBytes + kMaxBodyBytes; // one request always fits
// A partly read request travels with its connection as handoff state, so it must fit.
static_assert(kInputBuffer <= broker::Client::kMaxHandoffState);
constexpr std::size_t kMaxPendingOutput = 64 * 1024;  // pipelined requests wait past this
constexpr int kAcceptBatch = 64;                      // per listener per wakeup
constexpr int kProcessBatch = 64;                     // client.process() calls per wakeup
constexpr int kMaxEvents = 128;
constexpr auto kIdleTimeout = 30s;                    // a connection that does nothing
constexpr auto kRequestTimeout = 15s;                 // a whole request, head and body; see sweep()
constexpr auto kDrainIdleGrace = 250ms;               // without handoff, see Server::sweep()
constexpr auto kLingerTimeout = 2s;                   // after our FIN, waiting for the client's
constexpr auto kSweepInterval = 1s;
constexpr auto kDrainSweepInterval = 50ms;
constexpr auto kDefaultDrainTimeout = 30s;            // a signal carries no deadline
constexpr auto kDeadlineMargin = 200ms;               // exit before the SIGKILL, not with it
constexpr auto kAcceptRetry = 100ms;                  // after EMFILE and friends

__attribute__((format(printf, 1, 2))) void log(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	std::vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	std::fprintf(stderr, "broker-example-http: %s\n", line);
}

[[noreturn]] void fail(const char *what)
{
	throw std::system_error(errno, std::generic_category(), what);
}

// Owns one file descriptor (the library's UniqueFd is private to the project; workers bring their own).
class Fd {
public:
	explicit Fd(int fd = -1) noexcept : fd_(fd) {}
	Fd(Fd &&o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
	Fd &operator=(Fd &&o) noexcept
	{
		reset(std::exchange(o.fd_, -1));
		return *this;
	}
	~Fd() { reset(); }
	int get() const noexcept { return fd_; }
	[[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
	void reset(int fd = -1) noexcept
	{
		if (fd_ >= 0)
			::close(fd_);
		fd_ = fd;
	}

private:
	int fd_;
};

// ---- HTTP/1.1 request parsing (RFC 9112), strict where it matters for framing ----

bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

bool is_tchar(char c)
{
	return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

bool is_token(std::string_view s)
{
	return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c != '\0' && is_tchar(c); });
}

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

// Whether a comma-separated header value such as "keep-alive, Upgrade" holds token.
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

// Splits a head into lines. They end in CRLF, or in a bare LF, which RFC 9112 lets a server accept.
struct LineReader {
	std::string_view in;
	std::size_t pos = 0;

	std::optional<std::string_view> next()
	{
		std::size_t nl = in.find('\n', pos);
		if (nl == std::string_view::npos)
			return std::nullopt;
		std::string_view line = in.substr(pos, nl - pos);
		pos = nl + 1;
		if (!line.empty() && line.back() == '\r')
			line.remove_suffix(1);
		return line;
	}
};

struct Request {
	std::string_view method;
	std::string_view target;
	bool keep_alive = false; // what the client asked for, by version and Connection header
};

// The outcome of parsing the front of a connection's input.
struct Parsed {
	enum Kind { Incomplete, Complete, Invalid } kind = Incomplete;
	Request request;
	std::size_t length = 0; // head and body, when Complete
	int status = 0;         // the error to answer, when Invalid

	static Parsed invalid(int status) { return {Invalid, {}, 0, status}; }
};

Parsed parse_request(std::string_view in)
{
	LineReader lines{in};
	// A head that has not ended within the limit is rejected now, not buffered further.
	auto incomplete = [&](int status) { return in.size() >= kMaxHeadBytes ? Parsed::invalid(status) : Parsed{}; };

	// request-line = method SP request-target SP HTTP-version
	auto line = lines.next();
	if (!line)
		return incomplete(414);
	std::size_t sp1 = line->find(' ');
	std::size_t sp2 = sp1 == std::string_view::npos ? sp1 : line->find(' ', sp1 + 1);
	if (sp2 == std::string_view::npos || line->find(' ', sp2 + 1) != std::string_view::npos)
		return Parsed::invalid(400);
	Request req;
	req.method = line->substr(0, sp1);
	req.target = line->substr(sp1 + 1, sp2 - sp1 - 1);
	std::string_view version = line->substr(sp2 + 1);
	if (!is_token(req.method) || req.target.empty() ||
	    std::any_of(req.target.begin(), req.target.end(), [](char c) { return c <= ' ' || c == 0x7f; }))
		return Parsed::invalid(400);
	if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || !is_digit(version[5]) ||
	    version[6] != '.' || !is_digit(version[7]))
		return Parsed::invalid(400);
	if (version[5] != '1')
		return Parsed::invalid(505);
	bool http11 = version[7] != '0';

	bool conn_close = false, conn_keep_alive = false, transfer_encoding = false;
	int hosts = 0;
	std::optional<std::size_t> content_length;
	for (;;) {
		line = lines.next();
		if (!line)
			return incomplete(431);
		if (lines.pos > kMaxHeadBytes)
			return Parsed::invalid(431);
		if (line->empty())
			break;
		// Obsolete line folding, and whitespace before the colon, are how requests get smuggled.
		if (line->front() == ' ' || line->front() == '\t')
			return Parsed::invalid(400);
		std::size_t colon = line->find(':');
		if (colon == std::string_view::npos || !is_token(line->substr(0, colon)))
			return Parsed::invalid(400);
		std::string_view name = line->substr(0, colon);
		std::string_view value = trim(line->substr(colon + 1));
		if (std::any_of(value.begin(), value.end(),
				[](char c) { return (c >= 0 && c < ' ' && c != '\t') || c == 0x7f; }))
			return Parsed::invalid(400);

		if (iequals(name, "Host")) {
			hosts++;
		} else if (iequals(name, "Connection")) {
			conn_close = conn_close || has_token(value, "close");
			conn_keep_alive = conn_keep_alive || has_token(value, "keep-alive");
		} else if (iequals(name, "Transfer-Encoding")) {
			transfer_encoding = true;
		} else if (iequals(name, "Content-Length")) {
			if (value.empty() || !std::all_of(value.begin(), value.end(), is_digit))
				return Parsed::invalid(400);
			if (value.size() > 9)
				return Parsed::invalid(413);
			std::size_t n = 0;
			for (char c : value)
				n = n * 10 + static_cast<std::size_t>(c - '0');
			if (content_length && *content_length != n)
				return Parsed::invalid(400);
			content_length = n;
		}
	}

	// This server reads no chunked bodies, so it cannot find where such a request ends.
	if (transfer_encoding)
		return Parsed::invalid(501);
	if (hosts > 1 || (http11 && hosts == 0))
		return Parsed::invalid(400);
	std::size_t body = content_length.value_or(0);
	if (body > kMaxBodyBytes)
		return Parsed::invalid(413);
	if (lines.pos + body > in.size())
		return {}; // the body is still arriving; kInputBuffer has room for it

	req.keep_alive = http11 ? !conn_close : conn_keep_alive && !conn_close;
	return {Parsed::Complete, req, lines.pos + body, 0};
}

const char *reason(int status)
{
	switch (status) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 413: return "Content Too Large";
	case 414: return "URI Too Long";
	case 431: return "Request Header Fields Too Large";
	case 501: return "Not Implemented";
	case 505: return "HTTP Version Not Supported";
	default: return "Error";
	}
}

// Every response carries Content-Length and an explicit Connection header: HTTP/1.0 clients need
// "keep-alive" spelled out, and "close" tells any client to open a new connection for its next request.
void append_response(std::string &out, int status, std::string_view body, bool head_only, bool keep_alive)
{
	char head[256];
	int n = std::snprintf(head, sizeof head,
			      "HTTP/1.1 %d %s\r\n"
			      "Content-Type: text/plain; charset=utf-8\r\n"
			      "Content-Length: %zu\r\n"
			      "%s"
			      "Connection: %s\r\n\r\n",
			      status, reason(status), body.size(), status == 405 ? "Allow: GET, HEAD\r\n" : "",
			      keep_alive ? "keep-alive" : "close");
	out.append(head, static_cast<std::size_t>(n));
	if (!head_only)
		out.append(body);
}

// ---- The server ----

// What an epoll event points at.
enum class Kind { Listener, Signal, Broker, Connection };

struct Source {
	Kind kind;
	int fd;
};

struct Connection : Source {
	explicit Connection(int fd) : Source{Kind::Connection, fd}, sock(fd) {}

	Fd sock;
	std::string in;            // received, not yet answered (bounded by kInputBuffer)
	std::string out;           // answered, not yet sent
	std::size_t out_sent = 0;
	std::uint32_t interest = 0;
	bool peer_eof = false;     // the client shut down its side: answer what came, then close
	bool close_after = false;  // the last queued response says "Connection: close"
	bool lingering = false;    // we sent our FIN and discard input until the client's
	bool closed = false;       // waiting to be freed after this batch of events (or handed off)
	bool returned = false;     // a handoff nobody took: served to its end with "Connection: close"
	Clock::time_point last_active;
	Clock::time_point request_start; // since when we wait for the rest of the request at the front of in
	Clock::time_point linger_until;
	std::list<Connection>::iterator self;

	std::size_t pending() const { return out.size() - out_sent; }
};

class Server {
public:
	Server(broker::Client &client, const sigset_t &signals);
	int run();

private:
	void watch(int fd, std::uint32_t events, Source *src);
	void set_interest(Connection &c, std::uint32_t events);

	void pause_accepting(Clock::time_point resume_at);
	void resume_accepting();
	void accept_from(const Source &listener);

	void on_connection(Connection &c, std::uint32_t events);
	bool receive(Connection &c);
	void serve(Connection &c);
	bool answer(Connection &c);
	void respond(Connection &c, const Request &req);
	bool flush(Connection &c);
	void begin_close(Connection &c);
	void discard_input(Connection &c);
	void close_connection(Connection &c);
	void sweep();

	bool may_hand_off(const Connection &c) const;
	bool between_responses(const Connection &c) const;
	void hand_off(Connection &c);
	void send_handoffs();
	void adopt(int fd, std::string state, bool returned);

	void on_signal();
	void process_broker();
	void watch_broker();
	void start_drain(const char *why, Clock::time_point deadline);
	Clock::time_point broker_timeout() const;
	int timeout_ms() const;

	broker::Client &client_;
	Fd epoll_;
	Fd signals_;
	std::vector<Source> listeners_; // not resized after start: epoll points into it
	Source signal_source_{Kind::Signal, -1};
	Source broker_source_{Kind::Broker, -1};
	std::uint32_t broker_interest_ = 0;
	bool broker_lost_ = false;

	std::list<Connection> connections_;
	std::vector<std::list<Connection>::iterator> dead_;
	std::size_t open_ = 0;
	std::size_t max_connections_ = kMaxConnections;
	// Connections taken off epoll in this wakeup, with their state, for one client.handoff() call.
	std::vector<std::pair<int, std::string>> outgoing_;

	std::string body_;
	Clock::time_point now_;
	bool accepting_ = false;
	bool accept_error_logged_ = false;
	Clock::time_point resume_at_;
	bool draining_ = false;
	Clock::time_point deadline_;
	std::string stop_reason_ = "drain deadline reached";
	Clock::time_point next_sweep_;
};

Server::Server(broker::Client &client, const sigset_t &signals)
	: client_(client), now_(Clock::now())
{
	epoll_ = Fd(epoll_create1(EPOLL_CLOEXEC));
	if (epoll_.get() < 0)
		fail("epoll_create1");
	signals_ = Fd(signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC));
	if (signals_.get() < 0)
		fail("signalfd");

	for (const broker::Listener &l : client_.listeners()) {
		int type = 0, listening = 0;
		socklen_t len = sizeof type;
		if (getsockopt(l.fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
			fail("getsockopt(SO_TYPE)");
		len = sizeof listening;
		if (getsockopt(l.fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0)
			fail("getsockopt(SO_ACCEPTCONN)");
		if (type != SOCK_STREAM || !listening) {
			log("socket %s (fd %d) is not a listening stream socket, ignoring", l.name.c_str(), l.fd);
			continue;
		}
		// O_NONBLOCK lives on the open file description, which this worker shares with brokerd and
		// with every other worker of the service: setting it here sets it for all of them. That is
		// harmless because every worker must already expect EAGAIN from accept(): another worker
		// may take the connection that woke us. Never clear the flag again.
		int flags = fcntl(l.fd, F_GETFL);
		if (flags < 0 || fcntl(l.fd, F_SETFL, flags | O_NONBLOCK) < 0)
			fail("fcntl(O_NONBLOCK)");
		listeners_.push_back({Kind::Listener, l.fd});
	}
	if (listeners_.empty())
		throw std::runtime_error("no listening stream socket to serve");

	// A service manager starts services with a soft fd limit of 1024 (for select()); a server
	// that holds thousands of connections raises it to the hard limit itself. Keep fds for the
	// listeners, epoll, signalfd, the broker connection and stdio.
	rlimit nofile{};
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		setrlimit(RLIMIT_NOFILE, &nofile);
		getrlimit(RLIMIT_NOFILE, &nofile);
	}
	if (nofile.rlim_cur != RLIM_INFINITY && nofile.rlim_cur > 0) {
		rlim_t reserved = listeners_.size() + 16;
		max_connections_ = nofile.rlim_cur > reserved
					   ? std::min<std::size_t>(kMaxConnections, nofile.rlim_cur - reserved)
					   : 1;
	}

	std::string service = client_.service().empty() ? "standalone" : client_.service();
	body_ = "hello from " + service + " gen " + std::to_string(client_.generation()) + " pid " +
		std::to_string(getpid()) + "\n";
}

void Server::watch(int fd, std::uint32_t events, Source *src)
{
	epoll_event ev{};
	ev.events = events;
	ev.data.ptr = src;
	if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0)
		fail("epoll_ctl(ADD)");
}

void Server::set_interest(Connection &c, std::uint32_t events)
{
	if (events == c.interest)
		return;
	epoll_event ev{};
	ev.events = events;
	ev.data.ptr = &c;
	if (epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd, &ev) < 0)
		fail("epoll_ctl(MOD)");
	c.interest = events;
}

// Pausing takes the listeners out of epoll; their queues stay with the kernel, for the other
// workers of the service or for us once we resume.
void Server::pause_accepting(Clock::time_point resume_at)
{
	resume_at_ = resume_at;
	if (!accepting_)
		return;
	for (const Source &l : listeners_)
		if (epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, l.fd, nullptr) < 0)
			fail("epoll_ctl(DEL)");
	accepting_ = false;
}

void Server::resume_accepting()
{
	if (accepting_ || draining_)
		return;
	for (Source &l : listeners_)
		watch(l.fd, EPOLLIN, &l);
	accepting_ = true;
}

void Server::accept_from(const Source &listener)
{
	for (int i = 0; i < kAcceptBatch && accepting_; i++) {
		if (open_ >= max_connections_) {
			pause_accepting(now_); // until a connection closes
			return;
		}
		int fd = accept4(listener.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			switch (errno) {
			case EAGAIN: // the queue is empty, or another worker of the service was faster
				return;
			case EINTR:
			case ECONNABORTED: // the client gave up while queued
			case EPROTO:
			case ENETDOWN:
			case ENOPROTOOPT:
			case EHOSTDOWN:
			case ENONET:
			case EHOSTUNREACH:
			case EOPNOTSUPP:
			case ENETUNREACH:
				continue;
			case EMFILE:
			case ENFILE:
			case ENOBUFS:
			case ENOMEM:
				if (!accept_error_logged_)
					log("accept: %s, pausing accept", std::strerror(errno));
				accept_error_logged_ = true;
				pause_accepting(now_ + kAcceptRetry);
				return;
			default:
				fail("accept4");
			}
		}
		accept_error_logged_ = false;
		Connection &c = connections_.emplace_back(fd);
		c.self = std::prev(connections_.end());
		c.last_active = now_;
		c.interest = EPOLLIN;
		open_++;
		watch(fd, EPOLLIN, &c);
	}
}

void Server::on_connection(Connection &c, std::uint32_t events)
{
	if (events & EPOLLERR)
		return close_connection(c);
	if (c.lingering)
		return discard_input(c);
	if ((events & (EPOLLIN | EPOLLHUP)) && !receive(c))
		return;
	serve(c);
}

// One read per wakeup, into a bounded buffer: epoll is level-triggered and calls again for the rest.
bool Server::receive(Connection &c)
{
	std::size_t room = kInputBuffer - c.in.size();
	if (room == 0)
		return true;
	char buf[16 * 1024];
	ssize_t n = recv(c.fd, buf, std::min(room, sizeof buf), 0);
	if (n > 0) {
		if (c.in.empty())
			c.request_start = now_;
		c.in.append(buf, static_cast<std::size_t>(n));
		c.last_active = now_;
	} else if (n == 0) {
		c.peer_eof = true;
	} else if (errno != EAGAIN && errno != EINTR) {
		close_connection(c);
		return false;
	}
	return true;
}

// Answers what can be answered, sends what the socket takes, then decides what to wait for.
void Server::serve(Connection &c)
{
	for (;;) {
		bool output_full = answer(c);
		if (!flush(c))
			return;
		// Pipelined requests held back by a full output buffer go on only once it has drained.
		if (!output_full || c.pending() > 0)
			break;
	}
	if (c.pending() == 0) {
		if (c.close_after)
			return begin_close(c);
		if (c.peer_eof)
			return close_connection(c);
		// Draining: the response in flight is out, so the connection can move now.
		if (draining_ && may_hand_off(c))
			return hand_off(c);
	}
	std::uint32_t want = 0;
	if (c.pending() > 0)
		want |= EPOLLOUT;
	if (!c.peer_eof && !c.close_after && c.in.size() < kInputBuffer && c.pending() < kMaxPendingOutput)
		want |= EPOLLIN;
	set_interest(c, want);
}

// Answers the complete requests at the front of the input, in order. Returns true when it stopped
// because kMaxPendingOutput is queued.
bool Server::answer(Connection &c)
{
	std::size_t used = 0;
	bool output_full = false;
	while (!c.close_after) {
		if (c.pending() >= kMaxPendingOutput) {
			output_full = true;
			break;
		}
		// RFC 9112 2.2: a server should ignore empty lines received before a request line.
		while (used < c.in.size() && (c.in[used] == '\r' || c.in[used] == '\n'))
			used++;
		Parsed p = parse_request(std::string_view(c.in).substr(used));
		if (p.kind == Parsed::Incomplete)
			break;
		if (p.kind == Parsed::Invalid) {
			// The framing is lost: answer, and read nothing more from this connection.
			std::string body = std::string(reason(p.status)) + "\n";
			append_response(c.out, p.status, body, false, false);
			c.close_after = true;
			used = c.in.size();
			break;
		}
		respond(c, p.request);
		used += p.length;
	}
	c.in.erase(0, used);
	return output_full;
}

void Server::respond(Connection &c, const Request &req)
{
	// While draining, an answer on a connection that cannot move to the successor closes it, so the
	// client's next request opens a new one, which lands on a listener that another worker still
	// serves. A connection that can move stays alive and is handed off once the answer is out.
	bool keep_alive = req.keep_alive && (!draining_ || may_hand_off(c));
	bool head = req.method == "HEAD";
	std::string_view path = req.target.substr(0, req.target.find('?'));
	if (req.method != "GET" && !head)
		append_response(c.out, 405, "method not allowed\n", false, keep_alive);
	else if (path == "/")
		append_response(c.out, 200, body_, head, keep_alive);
	else
		append_response(c.out, 404, "not found\n", head, keep_alive);
	if (!keep_alive)
		c.close_after = true;
}

// Sends queued output until the socket is full; false when the connection is gone.
bool Server::flush(Connection &c)
{
	bool had_output = c.pending() > 0;
	while (c.pending() > 0) {
		ssize_t n = send(c.fd, c.out.data() + c.out_sent, c.pending(), MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			close_connection(c);
			return false;
		}
		c.out_sent += static_cast<std::size_t>(n);
		c.last_active = now_;
	}
	if (c.pending() == 0) {
		c.out.clear();
		c.out_sent = 0;
		// What is left of the input waited for us, not for the client: its time starts now.
		if (had_output)
			c.request_start = now_;
	}
	return true;
}

// A lingering close: our FIN goes out after the last response, then we read and discard until the
// client's FIN. Closing with unread input would send a reset instead, and a reset can destroy the
// response still on its way to the client.
void Server::begin_close(Connection &c)
{
	if (shutdown(c.fd, SHUT_WR) < 0)
		return close_connection(c);
	c.lingering = true;
	c.in.clear();
	c.linger_until = now_ + kLingerTimeout;
	set_interest(c, EPOLLIN);
}

void Server::discard_input(Connection &c)
{
	char buf[4096];
	for (int i = 0; i < 4; i++) {
		ssize_t n = recv(c.fd, buf, sizeof buf, 0);
		if (n > 0)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		return close_connection(c);
	}
}

// The object lives until the end of this batch of events, which may still point at it.
void Server::close_connection(Connection &c)
{
	if (c.closed)
		return;
	// Closing our fd alone does not end its epoll registration while another process holds the same
	// socket: after a handoff, the sender keeps its copy until the broker confirms that we took it.
	// Events for a freed Connection would follow.
	epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd, nullptr);
	c.sock.reset();
	c.closed = true;
	dead_.push_back(c.self);
	open_--;
}

// Closes connections that have done nothing for kIdleTimeout, and answers 408 and closes those that
// took kRequestTimeout to send one request: the idle timer restarts with every byte, so without a
// deadline per request a client trickling a byte every few seconds would hold its connection for
// ever, and enough of them would fill max_connections_. The request clock runs only while we wait for
// the client (no output pending), from the request's first byte or from the end of the response
// before it. While draining, a connection that can move to the successor is handed off (start_drain()
// and serve() hand them as they become free; this is the safety net), and any other is closed once it
// has had nothing in progress for kDrainIdleGrace. The grace is for keep-alive clients whose next
// request may already be on the wire: closing right after a response would race that request, while
// a request that comes within the grace is answered with "Connection: close" and lets the client move
// to another worker without an error. A handoff has no such race: bytes the client sends meanwhile
// wait in the socket for the successor.
void Server::sweep()
{
	for (Connection &c : connections_) {
		if (c.closed)
			continue;
		if (c.lingering) {
			if (now_ >= c.linger_until)
				close_connection(c);
			continue;
		}
		if (draining_ && may_hand_off(c) && between_responses(c)) {
			hand_off(c);
			continue;
		}
		if (!c.in.empty() && c.pending() == 0 && !c.close_after && !c.peer_eof &&
		    now_ - c.request_start >= kRequestTimeout) {
			c.in.clear();
			append_response(c.out, 408, "request timeout\n", false, false);
			c.close_after = true;
			serve(c); // sends it and begins the close
			continue;
		}
		auto quiet = now_ - c.last_active;
		bool idle = c.in.empty() && c.pending() == 0;
		if (quiet >= kIdleTimeout || (draining_ && idle && quiet >= kDrainIdleGrace))
			begin_close(c);
	}
	next_sweep_ = now_ + (draining_ ? kDrainSweepInterval : kSweepInterval);
}

// ---- Connection handoff (brokered only) ----

// Whether c may go to the successor generation: only under brokerd, while it is still reachable, and
// never a connection that already came back once (nobody takes it; it is served to its end here).
bool Server::may_hand_off(const Connection &c) const
{
	return client_.brokered() && client_.link() == broker::Link::Connected && !c.returned;
}

// Nothing of ours in flight on c: no unsent response, no close under way. Its input holds at most a
// partly received request (answer() answered every complete one), which is exactly its state.
bool Server::between_responses(const Connection &c) const
{
	return !c.closed && !c.lingering && !c.close_after && !c.peer_eof && c.pending() == 0;
}

// Takes c out of this server and queues it for the successor; send_handoffs() gives the whole
// wakeup's worth to the library in one call, which batches them 253 to a message.
void Server::hand_off(Connection &c)
{
	// Out of epoll before the fd leaves us: the registration would outlive our fd, since the
	// socket stays open in the successor (see close_connection()).
	if (epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd, nullptr) < 0)
		fail("epoll_ctl(DEL)");
	outgoing_.emplace_back(c.sock.release(), std::move(c.in));
	c.closed = true;
	dead_.push_back(c.self);
	open_--;
}

void Server::send_handoffs()
{
	if (outgoing_.empty())
		return;
	auto batch = std::move(outgoing_);
	outgoing_.clear();
	std::vector<broker::Connection> conns;
	conns.reserve(batch.size());
	for (const auto &[fd, state] : batch)
		conns.push_back({fd, state});
	try {
		// From here the library owns the fds. It closes each one the successor takes, and gives
		// back through on_returned those nobody could take.
		client_.handoff(conns);
	} catch (const broker::Error &e) {
		// It took none of them (a state too large, say): they are still ours to serve.
		log("cannot hand off %zu connections: %s, serving them here", batch.size(), e.what());
		for (auto &[fd, state] : batch)
			adopt(fd, std::move(state), true);
	}
}

// A connection handed to us by a predecessor (returned: false), or one of ours that came back
// (returned: true). Either way it is served as if freshly accepted, with its state already read.
// It is taken even past max_connections_: refusing it would fail a client that did nothing wrong,
// while the limit still pauses accepting until we are below it again.
void Server::adopt(int fd, std::string state, bool returned)
{
	Connection &c = connections_.emplace_back(fd);
	c.self = std::prev(connections_.end());
	c.last_active = now_;
	// A partial request in the state gets a fresh kRequestTimeout here: the state carries no
	// timestamp, and each handoff follows an upgrade, so a slow client gains at most one period per
	// generation, which it does not choose.
	c.request_start = now_;
	c.in = std::move(state);
	c.returned = returned;
	open_++;
	// The socket comes blocking or not as its sender had it, and this loop must never block.
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
		log("handed-off connection: fcntl(O_NONBLOCK): %s, closing it", std::strerror(errno));
		c.closed = true; // not in epoll yet
		c.sock.reset();
		dead_.push_back(c.self);
		open_--;
		return;
	}
	c.interest = EPOLLIN;
	watch(fd, EPOLLIN, &c);
	// The state may hold a whole request, and while draining the connection may move on at once.
	serve(c);
}

void Server::on_signal()
{
	signalfd_siginfo si;
	while (read(signals_.get(), &si, sizeof si) == sizeof si) {
		std::string name = std::string("SIG") + sigabbrev_np(static_cast<int>(si.ssi_signo));
		if (!draining_) {
			start_drain(name.c_str(), now_ + kDefaultDrainTimeout);
		} else if (deadline_ > now_) {
			// A signal during a drain is brokerd escalating at its deadline, or an impatient operator.
			stop_reason_ = name + " while draining";
			deadline_ = now_;
		}
	}
}

void Server::process_broker()
{
	try {
		for (int i = 0; i < kProcessBatch && client_.process(); i++) {
		}
		watch_broker();
	} catch (const broker::Error &e) {
		// The link ended for good (a brokerd refused this instance, see on_link in run()): nothing
		// would ever tell it to drain, so it retires now, gracefully.
		log("the broker connection ended: %s", e.what());
		if (broker_source_.fd >= 0)
			epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, broker_source_.fd, nullptr);
		broker_source_.fd = -1;
		broker_lost_ = true;
		start_drain("the broker connection ended", now_ + kDefaultDrainTimeout);
	}
}

// The library's fd and the events it wants can change after any call into it.
void Server::watch_broker()
{
	int fd = client_.fd();
	short want = client_.events();
	std::uint32_t events = ((want & POLLIN) ? EPOLLIN : 0u) | ((want & POLLOUT) ? EPOLLOUT : 0u);
	if (fd != broker_source_.fd) {
		if (broker_source_.fd >= 0)
			epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, broker_source_.fd, nullptr); // may be closed already
		broker_source_.fd = -1;
		if (fd >= 0)
			watch(fd, events, &broker_source_);
		broker_source_.fd = fd;
		broker_interest_ = events;
	} else if (fd >= 0 && events != broker_interest_) {
		epoll_event ev{};
		ev.events = events;
		ev.data.ptr = &broker_source_;
		if (epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) < 0)
			fail("epoll_ctl(MOD)");
		broker_interest_ = events;
	}
}

// deadline is when SIGKILL comes, or time_point::max() when the broker named none.
void Server::start_drain(const char *why, Clock::time_point deadline)
{
	bool known = deadline != Clock::time_point::max();
	Clock::time_point target = known ? deadline - kDeadlineMargin : deadline;
	if (draining_) {
		deadline_ = std::min(deadline_, target);
		return;
	}
	pause_accepting(now_);
	draining_ = true;
	deadline_ = target;
	next_sweep_ = now_;
	// Every connection between responses moves now; those with a response in flight follow from
	// serve() once it is out.
	std::size_t open = open_;
	for (Connection &c : connections_)
		if (may_hand_off(c) && between_responses(c))
			hand_off(c);
	// From the clock now, not now_: the library took the deadline after the loop last read it.
	std::string left = "no deadline";
	if (known)
		left = "deadline in " +
		       std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()) + " ms";
	std::string handed;
	if (client_.brokered())
		handed = ", " + std::to_string(outgoing_.size()) + " of them handed off";
	log("draining (%s): stopped accepting, %zu connections open%s, %s", why, open, handed.c_str(), left.c_str());
	if (!broker_lost_ && client_.brokered()) {
		try {
			client_.status("draining");
		} catch (const broker::Error &) {
			// Only a status text; the drain goes on.
		}
	}
}

// When the library wants process() called even without input.
Clock::time_point Server::broker_timeout() const
{
	// client.timeout() is CLOCK_MONOTONIC in microseconds, the clock behind steady_clock.
	std::uint64_t t = client_.timeout();
	if (t == UINT64_MAX)
		return Clock::time_point::max();
	return Clock::time_point(std::chrono::microseconds(t));
}

int Server::timeout_ms() const
{
	auto next = Clock::time_point::max();
	if (open_ > 0 || draining_)
		next = std::min(next, next_sweep_);
	if (draining_)
		next = std::min(next, deadline_);
	if (!accepting_ && !draining_ && open_ < max_connections_)
		next = std::min(next, resume_at_);
	if (!broker_lost_)
		next = std::min(next, broker_timeout());
	if (next == Clock::time_point::max())
		return -1;
	if (next <= now_)
		return 0;
	auto ms = std::chrono::ceil<std::chrono::milliseconds>(next - now_).count();
	return static_cast<int>(std::min<long long>(ms, 60 * 1000));
}

int Server::run()
{
	watch(signals_.get(), EPOLLIN, &signal_source_);
	signal_source_.fd = signals_.get();
	client_.on_drain([this](const broker::DrainRequest &req) { start_drain("requested by brokerd", req.deadline); });
	if (client_.brokered()) {
		client_.on_connection([this](int fd, std::string state) { adopt(fd, std::move(state), false); });
		client_.on_returned([this](int fd, std::string state) { adopt(fd, std::move(state), true); });
		client_.on_handoff_done([](const broker::HandoffSummary &s) {
			log("handoff settled: %zu connections handed, %zu taken by the successor, %zu returned", s.handed,
			    s.landed, s.returned);
		});
		// Lost: serve on while the library finds brokerd again. Rejected: process_broker() drains.
		client_.on_link([](broker::Link link, const broker::Error *why) {
			if (link == broker::Link::Lost)
				log("lost the broker connection: %s; serving on, reconnecting", why ? why->what() : "");
			else if (link == broker::Link::Connected)
				log("reconnected to the broker");
		});
	}
	watch_broker();
	resume_accepting();

	client_.ready();
	try {
		client_.status("serving on " + std::to_string(listeners_.size()) + " sockets");
	} catch (const broker::Error &e) {
		// Only a status text: serving matters more.
		log("cannot set status: %s, ignoring", e.what());
	}
	std::string who = client_.service().empty() ? "standalone" : client_.service();
	log("listening on %zu sockets (%s gen %llu pid %d, at most %zu connections)", listeners_.size(),
	    who.c_str(), static_cast<unsigned long long>(client_.generation()), getpid(), max_connections_);

	epoll_event events[kMaxEvents];
	while (!(draining_ && open_ == 0 && client_.handoff_pending() == 0)) {
		int n = epoll_wait(epoll_.get(), events, kMaxEvents, timeout_ms());
		if (n < 0 && errno != EINTR)
			fail("epoll_wait");
		now_ = Clock::now();

		bool broker_ready = false;
		for (int i = 0; i < n; i++) {
			auto *src = static_cast<Source *>(events[i].data.ptr);
			switch (src->kind) {
			case Kind::Listener:
				accept_from(*src);
				break;
			case Kind::Signal:
				on_signal();
				break;
			case Kind::Broker:
				broker_ready = true;
				break;
			case Kind::Connection:
				if (auto &c = static_cast<Connection &>(*src); !c.closed)
					on_connection(c, events[i].events);
				break;
			}
		}
		if (!broker_lost_ && (broker_ready || now_ >= broker_timeout()))
			process_broker();
		if (now_ >= next_sweep_)
			sweep();
		if (!accepting_ && !draining_ && open_ < max_connections_ && now_ >= resume_at_)
			resume_accepting();
		if (!outgoing_.empty()) {
			send_handoffs();
			watch_broker();
		}

		for (auto it : dead_)
			connections_.erase(it);
		dead_.clear();

		if (draining_ && (open_ > 0 || client_.handoff_pending() > 0) && now_ >= deadline_) {
			log("%s, closing %zu connections (%zu handed off and not yet taken)", stop_reason_.c_str(), open_,
			    client_.handoff_pending());
			break;
		}
	}
	return 0;
}

} // namespace

int main()
{
	// The drain signals must be blocked before anything else, so that they queue on the signalfd.
	sigset_t signals;
	sigemptyset(&signals);
	sigaddset(&signals, SIGTERM);
	sigaddset(&signals, SIGINT);
	if (sigprocmask(SIG_BLOCK, &signals, nullptr) < 0) {
		log("sigprocmask: %s", std::strerror(errno));
		return 1;
	}
	// A client that went away is an error from send(), not a signal that kills us. MSG_NOSIGNAL
	// covers our own sends; this covers the library's.
	signal(SIGPIPE, SIG_IGN);

	try {
		// Under plain systemd there is no broker to tell, and the option changes nothing.
		broker::Client client = broker::Client::from_env(broker::ClientOptions{.accept_handoff = true});
		Server server(client, signals);
		return server.run();
	} catch (const broker::Error &e) {
		if (e.varlink_error().empty())
			log("%s", e.what());
		else
			log("%s (%s)", e.what(), e.varlink_error().c_str());
	} catch (const std::exception &e) {
		log("%s", e.what());
	}
	return 1;
}
