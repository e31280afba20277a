// Handoff tests' client side: thousands of keep-alive connections in one epoll, their answers, the server sockets.
#pragma once

#include "support.hpp"

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace utest::handoff {

extern const std::string kRequest;
// The request line and part of a header: a worker that reads it cannot answer yet.
extern const std::string kHalfRequest;
extern const std::string kRestOfRequest;

// What the test saw across the connections: every failure counted by kind, and the first described.
struct Tally {
	std::size_t resets = 0;      // ECONNRESET and other socket errors
	std::size_t eofs = 0;        // the server closed the connection
	std::size_t connect_errors = 0;
	std::size_t wrong = 0;       // not a 200 keep-alive answer from the expected generation
	std::size_t timeouts = 0;    // no answer within the phase's deadline
	std::string first_problem;

	std::size_t failures() const { return resets + eofs + connect_errors + wrong + timeouts; }
	void note(std::size_t &counter, std::size_t conn, const std::string &what);
	std::string describe() const;
};

// One answer: the status, whether the server keeps the connection, and who its body says answered
// ("hello from web gen 1 pid 1234", with " (C)" at the end from broker-example-c and " (python)"
// from broker-example-python-http).
struct Answer {
	int status = 0;
	bool keep_alive = false;
	int generation = -1;
	pid_t pid = 0;
	bool from_c = false;
	bool from_python = false;
};

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

	explicit Clients(std::size_t n);

	Conn &operator[](std::size_t i) { return conns_[i]; }
	const Conn &operator[](std::size_t i) const { return conns_[i]; }
	std::size_t size() const { return conns_.size(); }

	// Opens every connection to 127.0.0.1:port and makes one request (kRequest) on each, a few
	// hundred handshakes at a time so that the listen backlog never overflows.
	void open_all(std::uint16_t port, Tally &t);
	// Sends `data` on idle connection i and waits for one answer there, in run().
	void request(std::size_t i, const std::string &data);
	// Sends `data` on idle connection i and expects nothing back; the connection stays idle.
	void send_only(std::size_t i, const std::string &data);
	// Runs until every requested answer came, or the deadline passed.
	void run(Tally &t);
	// The local ports of the idle connections.
	std::set<unsigned> local_ports() const;

private:
	void add(std::size_t i, std::uint32_t events);
	void interest(std::size_t i, std::uint32_t events);
	void drop(std::size_t i);
	void expire(Tally &t);
	bool step(Clock::time_point deadline, Tally &t);
	void on_event(std::size_t i, Tally &t);

	std::vector<Conn> conns_;
	UniqueFd epoll_;
	std::size_t busy_ = 0; // connecting, sending or waiting for an answer
};

// Every connection is an fd: takes the hard RLIMIT_NOFILE (brokerd and its workers inherit it),
// REQUIREd to leave room for `connections` and a thousand more.
void take_nofile_limit(std::size_t connections);

// Starts `tb` with service "web": 2 instances of the C++ example, a 30 s drain, on socket "http"
// with a backlog of 4096, and `others` beside it, and waits until web's generation 1 serves.
// Returns the port.
// handoff: the service's path, "direct" (the workers' own channels) or "broker".
std::uint16_t start_web(TestBroker &tb, const json &others = json::object(), const std::string &handoff = "direct");

// Checks the answers of the idle connections: each that is not a 200 keep-alive answer from
// `generation` which `accept` (the test's own conditions) also takes is noted in `t` as wrong. The
// rest are counted by the pid that gave them.
std::map<pid_t, std::size_t> answers_by_pid(const Clients &clients, Tally &t, int generation,
                                            const std::function<bool(const Answer &)> &accept);

// Sends half a request (kHalfRequest) on every `every`th connection, for the workers to hand over
// as state, and waits until the workers have read them all (so the bytes live in a worker, not in
// the socket). REQUIREs that every connection's server side showed in /proc/net/tcp, which proves
// its parse. Returns how many connections hold half a request. `half` replaces kHalfRequest.
std::size_t send_half_requests(std::uint16_t port, Clients &clients, std::size_t every,
                               const std::string &half = kHalfRequest);

// One Upgrade of a service, REQUIREd to end "done": how long it took, how many "handoff" progress
// events it streamed, and its transcript for the test's messages.
struct Upgraded {
	long long ms = 0;
	std::size_t handoff_events = 0;
	std::string transcript;
};
Upgraded upgrade(Broker &b, const std::string &service);

// One count of a HandoffInfo (in Status or a Watch event), 0 when absent.
std::uint64_t count_of(const json &obj, const char *key);

// A service's handoff counts in Status, and the instances' sums.
struct HandoffCounts {
	std::uint64_t handed = 0, received = 0, returned = 0;
	std::uint64_t by_old = 0; // "handed" summed over the instances still listed
	std::uint64_t by_new = 0; // "received" summed likewise
};
HandoffCounts handoff_counts(const json &status, const std::string &service);

// The one-table summary of a handoff test, printed apart from doctest's messages (which would
// repeat every INFO of the test).
void print_summary(const std::string &title, std::size_t connections, std::size_t halves,
                   const HandoffCounts &counts, long long upgrade_ms, std::size_t events, std::size_t answered);

// One "handoff settled" line of an example worker's done handler (broker-example-c,
// broker-example-python-http): "PROGRAM: handoff settled: N connections handed, N taken by the
// successor, N returned, N abandoned".
struct Settled {
	std::size_t handed = 0, landed = 0, returned = 0, abandoned = 0;
};
struct SettledSum : Settled {
	std::size_t lines = 0;
};
// The lines of `program` in b's log, summed, once `instances` of them are there (10 s at most).
SettledSum wait_settled(Broker &b, const std::string &program, std::size_t instances);

// The handoff tests' common run, on service "web" (2 instances) listening on `port`: `connections`
// keep-alive connections, each answered once by generation 1 (both instances serving), half a
// request on every `half_every`th, one upgrade with handoff progress, then the rest of each request
// on the same connections. `accept` adds the test's own conditions on every answer; `upgraded`
// sees Status once generation 2 serves alone. Checks that no request failed and prints the summary.
struct HandoffRun {
	std::map<pid_t, std::size_t> answering; // generation 2's answers by pid
	std::size_t answered = 0;
	HandoffCounts counts;
};
HandoffRun handoff_upgrade(Broker &b, std::uint16_t port, std::size_t connections, std::size_t half_every,
                           const std::function<bool(const Answer &)> &accept, const std::string &title,
                           const std::function<void(const json &)> &upgraded = {});

} // namespace utest::handoff
