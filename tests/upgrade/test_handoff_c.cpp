// Connection handoff through the C API: broker-example-c's keep-alive connections, some holding half a request, carry on in the new generation.
#include "support.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

using namespace utest;

// The client side is test_handoff.cpp's (the C++ worker's test), the same load for either worker;
// here it also checks the C worker's body, and counts server sockets robustly beside other tests.
namespace {

constexpr std::size_t kConnections = 2000;
constexpr std::size_t kHalfEvery = 10;         // every 10th connection holds half a request: 200
constexpr std::size_t kHandshakes = 512;       // connections opening at once, well inside the backlog
constexpr auto kPhaseDeadline = 20s;
// The soft fd limit a service manager starts services with (select()'s FD_SETSIZE). brokerd
// passes the limit it was started with to its workers, and a worker holding thousands of
// connections has to raise it itself.
constexpr rlim_t kServiceSoftLimit = 1024;

const std::string kRequest = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
// The request line and part of a header: a worker that reads it cannot answer yet.
const std::string kHalfRequest = kRequest.substr(0, 24);
const std::string kRestOfRequest = kRequest.substr(24);

// What the test saw across the connections: every failure counted by kind, and the first described.
struct Tally {
	std::size_t resets = 0;      // ECONNRESET and other socket errors
	std::size_t eofs = 0;        // the server closed the connection
	std::size_t connect_errors = 0;
	std::size_t wrong = 0;       // not a 200 keep-alive answer from the expected generation
	std::size_t timeouts = 0;    // no answer within the phase's deadline
	std::string first_problem;

	std::size_t failures() const { return resets + eofs + connect_errors + wrong + timeouts; }
	void note(std::size_t &counter, std::size_t conn, const std::string &what)
	{
		counter++;
		if (first_problem.empty())
			first_problem = "connection " + std::to_string(conn) + ": " + what;
	}
	std::string describe() const
	{
		std::ostringstream s;
		s << resets << " resets, " << eofs << " EOFs, " << connect_errors << " connect errors, " << wrong
		  << " wrong answers, " << timeouts << " timeouts" << (first_problem.empty() ? "" : "; first: ")
		  << first_problem;
		return s.str();
	}
};

// One answer: the status, whether the server keeps the connection, and who its body says answered.
struct Answer {
	int status = 0;
	bool keep_alive = false;
	int generation = -1;
	pid_t pid = 0;
	bool from_c = false; // the body ends in " (C)"
};

// "hello from web gen 1 pid 1234 (C)"
void parse_body(const std::string &body, Answer &a)
{
	int gen = -1, pid = 0;
	auto at = body.find(" gen ");
	if (at != std::string::npos && std::sscanf(body.c_str() + at, " gen %d pid %d", &gen, &pid) == 2) {
		a.generation = gen;
		a.pid = pid;
	}
	const std::string suffix = " (C)\n";
	a.from_c = body.size() >= suffix.size() && body.compare(body.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Takes one whole response off the front of `in`; false while it is incomplete.
bool take_response(std::string &in, Answer &a)
{
	auto end = in.find("\r\n\r\n");
	if (end == std::string::npos)
		return false;
	std::string head = in.substr(0, end);
	std::size_t length = 0;
	a = Answer{};
	std::istringstream lines(head);
	std::string line;
	bool first = true;
	while (std::getline(lines, line)) {
		if (!line.empty() && line.back() == '\r')
			line.pop_back();
		if (first) {
			first = false;
			if (line.rfind("HTTP/1.1 ", 0) == 0)
				a.status = std::atoi(line.c_str() + 9);
			continue;
		}
		auto colon = line.find(':');
		if (colon == std::string::npos)
			continue;
		std::string name = line.substr(0, colon);
		for (char &c : name)
			c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
		std::string value = line.substr(colon + 1);
		value.erase(0, value.find_first_not_of(' '));
		if (name == "content-length")
			length = std::stoul(value);
		else if (name == "connection")
			a.keep_alive = value == "keep-alive";
	}
	if (in.size() < end + 4 + length)
		return false;
	parse_body(in.substr(end + 4, length), a);
	in.erase(0, end + 4 + length);
	return true;
}

// Many client connections in one epoll, each driven through connect, send and one answer at a
// time, with a deadline per phase and no thread per connection.
class Clients {
public:
	enum class Phase { Unused, Connecting, Sending, Waiting, Idle, Dead };
	struct Conn {
		UniqueFd fd;
		Phase phase = Phase::Unused;
		std::string out;
		std::size_t sent = 0;
		std::string in;
		Answer answer;
		std::uint32_t interest = 0;
	};

	explicit Clients(std::size_t n) : conns_(n)
	{
		epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
		REQUIRE(epoll_);
	}

	Conn &operator[](std::size_t i) { return conns_[i]; }
	std::size_t size() const { return conns_.size(); }

	// Opens every connection and makes one request on each, at most kHandshakes at a time.
	void open_all(std::uint16_t port, Tally &t)
	{
		sockaddr_in sa{};
		sa.sin_family = AF_INET;
		sa.sin_port = htons(port);
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		std::size_t next = 0;
		auto deadline = Clock::now() + kPhaseDeadline;
		while (next < conns_.size() || busy_ > 0) {
			while (next < conns_.size() && busy_ < kHandshakes) {
				Conn &c = conns_[next];
				c.fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
				REQUIRE_MESSAGE(c.fd, "socket: ", std::strerror(errno));
				c.out = kRequest;
				c.sent = 0;
				busy_++;
				if (::connect(c.fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0) {
					c.phase = Phase::Sending;
				} else if (errno == EINPROGRESS) {
					c.phase = Phase::Connecting;
				} else {
					t.note(t.connect_errors, next, std::string("connect: ") + std::strerror(errno));
					drop(next);
					next++;
					continue;
				}
				add(next, EPOLLOUT);
				next++;
			}
			if (!step(deadline, t))
				break;
		}
		expire(t);
	}

	// Sends `data` on connection i and waits for one answer there, in run().
	void request(std::size_t i, const std::string &data)
	{
		Conn &c = conns_[i];
		REQUIRE(c.phase == Phase::Idle);
		c.out = data;
		c.sent = 0;
		c.phase = Phase::Sending;
		busy_++;
		interest(i, EPOLLOUT);
	}

	// Sends `data` on connection i and expects nothing back; the connection stays idle.
	void send_only(std::size_t i, const std::string &data)
	{
		Conn &c = conns_[i];
		REQUIRE(c.phase == Phase::Idle);
		ssize_t n = ::send(c.fd.get(), data.data(), data.size(), MSG_NOSIGNAL);
		REQUIRE_MESSAGE(n == static_cast<ssize_t>(data.size()), "send: ", std::strerror(errno));
	}

	// Runs until every requested answer came, or the deadline passed.
	void run(Tally &t)
	{
		auto deadline = Clock::now() + kPhaseDeadline;
		while (busy_ > 0 && step(deadline, t)) {
		}
		expire(t);
	}

private:
	void add(std::size_t i, std::uint32_t events)
	{
		epoll_event ev{};
		ev.events = events;
		ev.data.u64 = i;
		REQUIRE(::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, conns_[i].fd.get(), &ev) == 0);
		conns_[i].interest = events;
	}

	void interest(std::size_t i, std::uint32_t events)
	{
		if (conns_[i].interest == events)
			return;
		epoll_event ev{};
		ev.events = events;
		ev.data.u64 = i;
		REQUIRE(::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, conns_[i].fd.get(), &ev) == 0);
		conns_[i].interest = events;
	}

	void drop(std::size_t i)
	{
		Conn &c = conns_[i];
		if (c.phase != Phase::Idle && c.phase != Phase::Dead && c.phase != Phase::Unused)
			busy_--;
		c.phase = Phase::Dead;
		c.fd.reset();
	}

	// Whatever is still busy at the end of a phase timed out.
	void expire(Tally &t)
	{
		for (std::size_t i = 0; i < conns_.size(); i++) {
			Phase p = conns_[i].phase;
			if (p == Phase::Connecting || p == Phase::Sending || p == Phase::Waiting) {
				t.note(t.timeouts, i, "no answer within the deadline");
				drop(i);
			}
		}
	}

	// One epoll_wait; false once the deadline has passed.
	bool step(Clock::time_point deadline, Tally &t)
	{
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
		if (left <= 0)
			return false;
		epoll_event events[256];
		int n = ::epoll_wait(epoll_.get(), events, 256, static_cast<int>(left));
		if (n < 0 && errno != EINTR)
			REQUIRE_MESSAGE(false, "epoll_wait: ", std::strerror(errno));
		for (int k = 0; k < n; k++)
			on_event(static_cast<std::size_t>(events[k].data.u64), t);
		return true;
	}

	void on_event(std::size_t i, Tally &t)
	{
		Conn &c = conns_[i];
		if (c.phase == Phase::Connecting) {
			int err = 0;
			socklen_t len = sizeof err;
			::getsockopt(c.fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
			if (err != 0) {
				t.note(t.connect_errors, i, std::string("connect: ") + std::strerror(err));
				return drop(i);
			}
			c.phase = Phase::Sending;
		}
		if (c.phase == Phase::Sending) {
			while (c.sent < c.out.size()) {
				ssize_t n = ::send(c.fd.get(), c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
				if (n < 0 && errno == EAGAIN)
					return;
				if (n < 0) {
					t.note(t.resets, i, std::string("send: ") + std::strerror(errno));
					return drop(i);
				}
				c.sent += static_cast<std::size_t>(n);
			}
			c.phase = Phase::Waiting;
			interest(i, EPOLLIN);
			return;
		}
		if (c.phase != Phase::Waiting && c.phase != Phase::Idle)
			return;
		char buf[4096];
		ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, 0);
		if (n < 0 && errno == EAGAIN)
			return;
		if (n < 0) {
			t.note(t.resets, i, std::string("recv: ") + std::strerror(errno));
			return drop(i);
		}
		if (n == 0) {
			t.note(t.eofs, i, "end of stream");
			return drop(i);
		}
		if (c.phase == Phase::Idle) {
			t.note(t.wrong, i, "bytes nobody asked for: " + std::string(buf, static_cast<std::size_t>(n)));
			return drop(i);
		}
		c.in.append(buf, static_cast<std::size_t>(n));
		if (!take_response(c.in, c.answer))
			return;
		if (!c.in.empty()) {
			t.note(t.wrong, i, "more than one answer: " + c.in);
			return drop(i);
		}
		// Still watched for input: an idle connection that the server closes shows up at once.
		c.phase = Phase::Idle;
		busy_--;
	}

	std::vector<Conn> conns_;
	UniqueFd epoll_;
	std::size_t busy_ = 0; // connecting, sending or waiting for an answer
};

// The workers' established sockets on `port` whose peers are `clients` (the local ports of this
// test's connections: /proc/net/tcp also lists the sockets of tests running beside this one), and
// how many of them hold received bytes the worker has not read yet. /proc/net/tcp is read in
// pieces while other sockets come and go, so an entry may show up twice or not at all: each
// connection counts once, by its client's port, and callers read again until all of them show.
struct ServerSockets {
	std::size_t established = 0;
	std::size_t unread = 0;
};

ServerSockets server_sockets(std::uint16_t port, const std::set<unsigned> &clients)
{
	std::ifstream f("/proc/net/tcp");
	std::string line;
	std::getline(f, line); // the header
	std::map<unsigned, bool> unread_by_client;
	while (std::getline(f, line)) {
		unsigned local_port = 0, remote_port = 0, state = 0, rx = 0, tx = 0;
		// "  12: 0100007F:1F90 0100007F:C350 01 00000000:00000000 ..."
		if (std::sscanf(line.c_str(), " %*u: %*x:%x %*x:%x %x %x:%x", &local_port, &remote_port, &state, &tx,
		                &rx) != 5)
			continue;
		if (local_port != port || state != 0x01 || !clients.count(remote_port)) // TCP_ESTABLISHED
			continue;
		unread_by_client[remote_port] = rx > 0;
	}
	ServerSockets out;
	out.established = unread_by_client.size();
	for (const auto &[client, unread] : unread_by_client)
		out.unread += unread;
	return out;
}

// The local ports of the connections that are open.
std::set<unsigned> local_ports(Clients &clients)
{
	std::set<unsigned> ports;
	for (std::size_t i = 0; i < clients.size(); i++) {
		if (clients[i].phase != Clients::Phase::Idle)
			continue;
		sockaddr_in sa{};
		socklen_t len = sizeof sa;
		REQUIRE(::getsockname(clients[i].fd.get(), reinterpret_cast<sockaddr *>(&sa), &len) == 0);
		ports.insert(ntohs(sa.sin_port));
	}
	return ports;
}

std::uint64_t count_of(const json &obj, const char *key)
{
	return obj.is_object() ? obj.value(key, std::uint64_t{0}) : 0;
}

// A process's RLIMIT_NOFILE from /proc/<pid>/limits: soft and hard, "unlimited" as RLIM_INFINITY.
std::optional<std::pair<rlim_t, rlim_t>> fd_limits(pid_t pid)
{
	std::ifstream f("/proc/" + std::to_string(pid) + "/limits");
	std::string line;
	while (std::getline(f, line)) {
		if (line.rfind("Max open files", 0) != 0)
			continue;
		std::istringstream in(line.substr(std::strlen("Max open files")));
		std::string soft, hard;
		if (!(in >> soft >> hard))
			return std::nullopt;
		auto value = [](const std::string &s) {
			return s == "unlimited" ? RLIM_INFINITY : static_cast<rlim_t>(std::stoull(s));
		};
		return std::make_pair(value(soft), value(hard));
	}
	return std::nullopt;
}

// Every instance of the generation runs with its soft fd limit raised to the hard one.
void check_fd_limits_raised(const json &status, int generation)
{
	for (const auto &inst : generation_instances(status, "web", generation)) {
		pid_t pid = inst.value("pid", 0);
		auto limits = fd_limits(pid);
		INFO("instance ", inst.value("id", ""), " pid ", pid);
		REQUIRE(limits);
		CHECK(limits->first == limits->second);
		CHECK(limits->first > kServiceSoftLimit);
	}
}

// One "handoff settled" line of broker-example-c's done handler.
struct Settled {
	std::size_t handed = 0, landed = 0, returned = 0, abandoned = 0;
};

std::vector<Settled> settled_lines(const std::string &log)
{
	const std::string mark = "broker-example-c: handoff settled: ";
	std::vector<Settled> out;
	for (auto at = log.find(mark); at != std::string::npos; at = log.find(mark, at + mark.size())) {
		Settled s;
		if (std::sscanf(log.c_str() + at + mark.size(),
		                "%zu connections handed, %zu taken by the successor, %zu returned, %zu abandoned", &s.handed,
		                &s.landed, &s.returned, &s.abandoned) == 4)
			out.push_back(s);
	}
	return out;
}

} // namespace

TEST_CASE("handoff: 2000 keep-alive connections of the C worker move to the new generation in one upgrade")
{
	// brokerd and its workers start with the soft limit of a service; the test holds every
	// client connection itself and takes the hard limit once they run.
	rlimit nofile{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
	REQUIRE_MESSAGE(nofile.rlim_max >= kConnections + 1000, "RLIMIT_NOFILE hard limit ", nofile.rlim_max,
	                " is too low for ", kConnections, " connections");
	rlimit service_nofile = nofile;
	service_nofile.rlim_cur = std::min(kServiceSoftLimit, nofile.rlim_max);
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &service_nofile) == 0);

	TestBroker tb;
	Broker &b = tb.b;
	BROKER_CONTEXT(b);
	json web = service({env("EXAMPLE_C")}, {"http"}, 2, "broker");
	web["drain"] = {{"timeout", "30s"}};
	tb.start({{"sockets", {{"http", {{"listen", "tcp://127.0.0.1:0"}, {"backlog", 4096}}}}}, {"services", {{"web", web}}}});
	nofile.rlim_cur = nofile.rlim_max;
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &nofile) == 0);
	json st = b.status();
	std::uint16_t port = socket_port(st, "http");
	check_serves_alone(b, "web", 1, 2);
	// With 1024 fds, one instance could not hold what it is handed below.
	check_fd_limits_raised(b.status("web"), 1);

	// Established and idle at a generation 1 instance, each after one answer.
	Clients clients(kConnections);
	Tally opening;
	clients.open_all(port, opening);
	std::set<pid_t> old_pids;
	for (std::size_t i = 0; i < clients.size(); i++) {
		const Answer &a = clients[i].answer;
		if (clients[i].phase == Clients::Phase::Idle &&
		    (a.status != 200 || !a.keep_alive || a.generation != 1 || !a.from_c))
			opening.note(opening.wrong, i, "status " + std::to_string(a.status) + ", gen " +
			                                       std::to_string(a.generation) + (a.keep_alive ? "" : ", not keep-alive"));
		old_pids.insert(a.pid);
	}
	INFO("opening: ", opening.describe());
	REQUIRE(opening.failures() == 0);
	CHECK(old_pids.size() == 2); // both instances serve

	// Half a request on some: the workers read it, and must hand it over as state.
	std::size_t halves = 0;
	for (std::size_t i = 0; i < clients.size(); i += kHalfEvery, halves++)
		clients.send_only(i, kHalfRequest);
	// Wait until the workers have read them (so the bytes live in a worker, not in the socket),
	// and count the server sides, which proves the parse of /proc/net/tcp.
	std::set<unsigned> ports = local_ports(clients);
	REQUIRE(ports.size() == kConnections);
	ServerSockets server;
	bool all_read = wait_until(
		[&] {
			server = server_sockets(port, ports);
			return server.established == kConnections && server.unread == 0;
		},
		10s);
	REQUIRE_MESSAGE(all_read, "the workers did not read the half requests: ", server.established,
	                " server sockets seen, ", server.unread, " of them hold unread bytes");

	auto begin = Clock::now();
	StreamCall up(b.control_path(), "io.brokerd.Control.Upgrade", {{"service", "web"}});
	StreamCall::Reply end = final_reply(up);
	auto upgrade_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - begin).count();
	INFO("progress:\n", up.transcript());
	REQUIRE(end.error.empty());
	REQUIRE(member(end.parameters, "progress").value("event", "") == "done");
	std::size_t handoff_events = 0;
	for (const auto &r : up.seen())
		if (r.parameters.contains("progress") && r.parameters["progress"].value("event", "") == "handoff")
			handoff_events++;
	CHECK(handoff_events >= 1);
	check_serves_alone(b, "web", 2, 2);

	st = b.status("web");
	INFO("Status: ", st.dump());
	std::set<pid_t> new_pids;
	for (const auto &inst : generation_instances(st, "web", 2))
		new_pids.insert(inst.value("pid", 0));
	check_fd_limits_raised(st, 2);

	// The rest of each request, on the same connections: every one answered by generation 2.
	for (std::size_t i = 0; i < clients.size(); i++)
		clients.request(i, i % kHalfEvery == 0 ? kRestOfRequest : kRequest);
	Tally after;
	clients.run(after);
	std::size_t answered = 0;
	std::set<pid_t> answering;
	for (std::size_t i = 0; i < clients.size(); i++) {
		const auto &c = clients[i];
		if (c.phase != Clients::Phase::Idle)
			continue;
		const Answer &a = c.answer;
		if (a.status != 200 || !a.keep_alive || a.generation != 2 || !new_pids.count(a.pid) || !a.from_c) {
			after.note(after.wrong, i,
			           "status " + std::to_string(a.status) + ", gen " + std::to_string(a.generation) + ", pid " +
			                   std::to_string(a.pid) + (a.keep_alive ? "" : ", not keep-alive"));
		} else {
			answered++;
			answering.insert(a.pid);
		}
	}

	const json *svc = service_of(st, "web");
	REQUIRE(svc != nullptr);
	const json counts = svc->value("handoff", json::object());
	std::uint64_t handed = count_of(counts, "handed"), received = count_of(counts, "received"),
		      returned = count_of(counts, "returned");
	std::uint64_t by_old = 0, by_new = 0;
	for (const auto &inst : instances(st, "web")) {
		by_old += count_of(inst.value("handoff", json::object()), "handed");
		by_new += count_of(inst.value("handoff", json::object()), "received");
	}

	// Printed apart from doctest's messages, which would repeat every INFO above.
	char table[512];
	std::snprintf(table, sizeof table,
	              "%-12s %-10s %-8s %-9s %-9s %-11s %-15s %s\n%-12zu %-10zu %-8llu %-9llu %-9llu %-11lld %-15zu %zu",
	              "connections", "half-read", "handed", "received", "returned", "upgrade ms", "handoff events",
	              "answered by gen 2", kConnections, halves, static_cast<unsigned long long>(handed),
	              static_cast<unsigned long long>(received), static_cast<unsigned long long>(returned),
	              static_cast<long long>(upgrade_ms), handoff_events, answered);
	std::printf("connection handoff of the C worker in one upgrade:\n%s\n", table);
	std::fflush(stdout);

	INFO("after the upgrade: ", after.describe());
	CHECK(after.failures() == 0);
	CHECK(answered == kConnections);
	CHECK(answering.size() == 2); // the connections were split between the new instances
	CHECK(handed == kConnections);
	CHECK(received == handed);
	CHECK(returned == 0);
	// The new instances account for every connection received (the old ones may be gone from Status).
	CHECK(by_new == received);
	CHECK(by_old <= handed);
	// Each old instance said where its connections went (its done handler) before it exited.
	std::vector<Settled> settled;
	bool logged = wait_until(
		[&] {
			settled = settled_lines(b.log());
			return settled.size() >= 2;
		},
		10s);
	CHECK_MESSAGE(logged, "the old instances logged ", settled.size(), " handoff summaries");
	Settled sum;
	for (const Settled &s : settled) {
		sum.handed += s.handed;
		sum.landed += s.landed;
		sum.returned += s.returned;
		sum.abandoned += s.abandoned;
	}
	CHECK(settled.size() == 2);
	CHECK(sum.handed == kConnections);
	CHECK(sum.landed == kConnections);
	CHECK(sum.returned == 0);
	CHECK(sum.abandoned == 0);
	b.stop();
}
