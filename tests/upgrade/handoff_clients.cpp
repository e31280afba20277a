// Handoff tests' client side: keep-alive connections driven through epoll, and /proc/net/tcp's view of them.
#include "handoff_clients.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace utest::handoff {

const std::string kRequest = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
const std::string kHalfRequest = kRequest.substr(0, 24);
const std::string kRestOfRequest = kRequest.substr(24);

namespace {

constexpr std::size_t kHandshakes = 512; // connections opening at once, well inside the backlog
constexpr auto kPhaseDeadline = 20s;

// "hello from web gen 1 pid 1234 (C)"
void parse_body(const std::string &body, Answer &a)
{
	int gen = -1, pid = 0;
	auto at = body.find(" gen ");
	if (at != std::string::npos && std::sscanf(body.c_str() + at, " gen %d pid %d", &gen, &pid) == 2) {
		a.generation = gen;
		a.pid = pid;
	}
	auto ends_with = [&](const std::string &suffix) {
		return body.size() >= suffix.size() && body.compare(body.size() - suffix.size(), suffix.size(), suffix) == 0;
	};
	a.from_c = ends_with(" (C)\n");
	a.from_python = ends_with(" (python)\n");
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

// The workers' established sockets on `port` whose peers are `clients` (local ports of the test's
// connections: /proc/net/tcp also lists those of tests running beside this one), and how many of
// them hold received bytes the worker has not read yet. /proc/net/tcp is read in pieces while other
// sockets come and go, so an entry may show up twice or not at all: each connection counts once, by
// its client's port, and callers read again until all of them show.
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

} // namespace

std::uint64_t count_of(const json &obj, const char *key)
{
	return obj.is_object() ? obj.value(key, std::uint64_t{0}) : 0;
}

void Tally::note(std::size_t &counter, std::size_t conn, const std::string &what)
{
	counter++;
	if (first_problem.empty())
		first_problem = "connection " + std::to_string(conn) + ": " + what;
}

std::string Tally::describe() const
{
	std::ostringstream s;
	s << resets << " resets, " << eofs << " EOFs, " << connect_errors << " connect errors, " << wrong
	  << " wrong answers, " << timeouts << " timeouts" << (first_problem.empty() ? "" : "; first: ")
	  << first_problem;
	return s.str();
}

Clients::Clients(std::size_t n) : conns_(n)
{
	epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
	REQUIRE(epoll_);
}

void Clients::open_all(std::uint16_t port, Tally &t)
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

void Clients::request(std::size_t i, const std::string &data)
{
	Conn &c = conns_[i];
	REQUIRE(c.phase == Phase::Idle);
	c.out = data;
	c.sent = 0;
	c.answer = Answer{};
	c.phase = Phase::Sending;
	busy_++;
	interest(i, EPOLLOUT);
}

void Clients::send_only(std::size_t i, const std::string &data)
{
	Conn &c = conns_[i];
	REQUIRE(c.phase == Phase::Idle);
	ssize_t n = ::send(c.fd.get(), data.data(), data.size(), MSG_NOSIGNAL);
	REQUIRE_MESSAGE(n == static_cast<ssize_t>(data.size()), "send: ", std::strerror(errno));
}

void Clients::run(Tally &t)
{
	auto deadline = Clock::now() + kPhaseDeadline;
	while (busy_ > 0 && step(deadline, t)) {
	}
	expire(t);
}

std::set<unsigned> Clients::local_ports() const
{
	std::set<unsigned> ports;
	for (const Conn &c : conns_) {
		if (c.phase != Phase::Idle)
			continue;
		sockaddr_in sa{};
		socklen_t len = sizeof sa;
		REQUIRE(::getsockname(c.fd.get(), reinterpret_cast<sockaddr *>(&sa), &len) == 0);
		ports.insert(ntohs(sa.sin_port));
	}
	return ports;
}

void Clients::add(std::size_t i, std::uint32_t events)
{
	epoll_event ev{};
	ev.events = events;
	ev.data.u64 = i;
	REQUIRE(::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, conns_[i].fd.get(), &ev) == 0);
	conns_[i].interest = events;
}

void Clients::interest(std::size_t i, std::uint32_t events)
{
	if (conns_[i].interest == events)
		return;
	epoll_event ev{};
	ev.events = events;
	ev.data.u64 = i;
	REQUIRE(::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, conns_[i].fd.get(), &ev) == 0);
	conns_[i].interest = events;
}

void Clients::drop(std::size_t i)
{
	Conn &c = conns_[i];
	if (c.phase != Phase::Idle && c.phase != Phase::Dead && c.phase != Phase::Unused)
		busy_--;
	c.phase = Phase::Dead;
	c.fd.reset();
}

// Whatever is still busy at the end of a phase timed out.
void Clients::expire(Tally &t)
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
bool Clients::step(Clock::time_point deadline, Tally &t)
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

void Clients::on_event(std::size_t i, Tally &t)
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

std::map<pid_t, std::size_t> answers_by_pid(const Clients &clients, Tally &t, int generation,
                                            const std::function<bool(const Answer &)> &accept)
{
	std::map<pid_t, std::size_t> out;
	for (std::size_t i = 0; i < clients.size(); i++) {
		if (clients[i].phase != Clients::Phase::Idle)
			continue;
		const Answer &a = clients[i].answer;
		if (a.status != 200 || !a.keep_alive || a.generation != generation || !accept(a))
			t.note(t.wrong, i,
			       "status " + std::to_string(a.status) + ", gen " + std::to_string(a.generation) + ", pid " +
			               std::to_string(a.pid) + (a.keep_alive ? "" : ", not keep-alive"));
		else
			out[a.pid]++;
	}
	return out;
}

void take_nofile_limit(std::size_t connections)
{
	rlimit nofile{};
	REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
	REQUIRE_MESSAGE(nofile.rlim_max >= connections + 1000, "RLIMIT_NOFILE hard limit ", nofile.rlim_max,
	                " is too low for ", connections, " connections");
	nofile.rlim_cur = nofile.rlim_max;
	REQUIRE(::setrlimit(RLIMIT_NOFILE, &nofile) == 0);
}

std::uint16_t start_web(TestBroker &tb, const json &others, const std::string &handoff)
{
	json web = http_service(2);
	web["drain"] = {{"timeout", "30s"}};
	web["handoff"] = handoff;
	json services = others;
	services["web"] = web;
	tb.start({{"sockets", {{"http", {{"listen", "tcp://127.0.0.1:0"}, {"backlog", 4096}}}}}, {"services", services}});
	check_serves_alone(tb.b, "web", 1, 2);
	return socket_port(tb.b.status(), "http");
}

std::size_t send_half_requests(std::uint16_t port, Clients &clients, std::size_t every, const std::string &half)
{
	std::size_t halves = 0;
	for (std::size_t i = 0; i < clients.size(); i += every, halves++)
		clients.send_only(i, half);
	std::set<unsigned> ports = clients.local_ports();
	REQUIRE(ports.size() == clients.size());
	ServerSockets server;
	bool all_read = wait_until(
		[&] {
			server = server_sockets(port, ports);
			return server.established == ports.size() && server.unread == 0;
		},
		10s);
	REQUIRE_MESSAGE(all_read, "the workers did not read the half requests: ", server.established,
	                " server sockets seen, ", server.unread, " of them hold unread bytes");
	return halves;
}

Upgraded upgrade(Broker &b, const std::string &service)
{
	auto begin = Clock::now();
	StreamCall up(b.control_path(), "io.brokerd.Control.Upgrade", {{"service", service}});
	StreamCall::Reply end = final_reply(up);
	Upgraded out;
	out.ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - begin).count();
	out.transcript = up.transcript();
	INFO("progress:\n", out.transcript);
	REQUIRE(end.error.empty());
	REQUIRE(member(end.parameters, "progress").value("event", "") == "done");
	for (const auto &r : up.seen())
		if (r.parameters.contains("progress") && r.parameters["progress"].value("event", "") == "handoff")
			out.handoff_events++;
	return out;
}

HandoffCounts handoff_counts(const json &status, const std::string &service)
{
	const json *svc = service_of(status, service);
	REQUIRE(svc != nullptr);
	const json counts = svc->value("handoff", json::object());
	HandoffCounts out;
	out.handed = count_of(counts, "handed");
	out.received = count_of(counts, "received");
	out.returned = count_of(counts, "returned");
	for (const auto &inst : instances(status, service)) {
		out.by_old += count_of(inst.value("handoff", json::object()), "handed");
		out.by_new += count_of(inst.value("handoff", json::object()), "received");
	}
	return out;
}

void print_summary(const std::string &title, std::size_t connections, std::size_t halves,
                   const HandoffCounts &counts, long long upgrade_ms, std::size_t events, std::size_t answered)
{
	char table[512];
	std::snprintf(table, sizeof table,
	              "%-12s %-10s %-8s %-9s %-9s %-11s %-15s %s\n%-12zu %-10zu %-8llu %-9llu %-9llu %-11lld %-15zu %zu",
	              "connections", "half-read", "handed", "received", "returned", "upgrade ms", "handoff events",
	              "answered by gen 2", connections, halves, static_cast<unsigned long long>(counts.handed),
	              static_cast<unsigned long long>(counts.received), static_cast<unsigned long long>(counts.returned),
	              upgrade_ms, events, answered);
	std::printf("%s:\n%s\n", title.c_str(), table);
	std::fflush(stdout);
}

HandoffRun handoff_upgrade(Broker &b, std::uint16_t port, std::size_t connections, std::size_t half_every,
                           const std::function<bool(const Answer &)> &accept, const std::string &title,
                           const std::function<void(const json &)> &upgraded)
{
	// Established and idle at a generation 1 instance, each after one answer.
	Clients clients(connections);
	Tally opening;
	clients.open_all(port, opening);
	auto old_pids = answers_by_pid(clients, opening, 1, accept);
	INFO("opening: ", opening.describe());
	REQUIRE(opening.failures() == 0);
	CHECK(old_pids.size() == 2); // both instances serve

	// Half a request on some: the workers read it, and must hand it over as state.
	std::size_t halves = send_half_requests(port, clients, half_every);

	Upgraded up = upgrade(b, "web");
	INFO("progress:\n", up.transcript);
	CHECK(up.handoff_events >= 1);
	check_serves_alone(b, "web", 2, 2);

	json st = b.status("web");
	INFO("Status: ", st.dump());
	std::set<pid_t> new_pids;
	for (const auto &inst : generation_instances(st, "web", 2))
		new_pids.insert(inst.value("pid", 0));
	if (upgraded)
		upgraded(st);

	// The rest of each request, on the same connections: every one answered by generation 2.
	for (std::size_t i = 0; i < clients.size(); i++)
		clients.request(i, i % half_every == 0 ? kRestOfRequest : kRequest);
	Tally after;
	clients.run(after);
	HandoffRun run;
	run.answering = answers_by_pid(clients, after, 2, [&](const Answer &a) { return new_pids.count(a.pid) > 0 && accept(a); });
	for (const auto &[pid, n] : run.answering)
		run.answered += n;
	run.counts = handoff_counts(st, "web");
	print_summary(title, connections, halves, run.counts, up.ms, up.handoff_events, run.answered);
	INFO("after the upgrade: ", after.describe());
	CHECK(after.failures() == 0);
	return run;
}

SettledSum wait_settled(Broker &b, const std::string &program, std::size_t instances)
{
	const std::string mark = program + ": handoff settled: ";
	auto sum_of = [&](const std::string &log) {
		SettledSum sum;
		for (auto at = log.find(mark); at != std::string::npos; at = log.find(mark, at + mark.size())) {
			Settled s;
			if (std::sscanf(log.c_str() + at + mark.size(),
			                "%zu connections handed, %zu taken by the successor, %zu returned, %zu abandoned",
			                &s.handed, &s.landed, &s.returned, &s.abandoned) != 4)
				continue;
			sum.handed += s.handed;
			sum.landed += s.landed;
			sum.returned += s.returned;
			sum.abandoned += s.abandoned;
			sum.lines++;
		}
		return sum;
	};
	SettledSum sum;
	wait_until(
		[&] {
			sum = sum_of(b.log());
			return sum.lines >= instances;
		},
		10s);
	return sum;
}

} // namespace utest::handoff
