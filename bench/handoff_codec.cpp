// broker-handoff-codec: what one 253-connection handoff batch costs in JSON, base64 and framing.
//
//   broker-handoff-codec [--state 0,64] [--iterations 2000] [--json]
//
// The CPU side of bench/handoff's analysis, one step at a time, with the project's own code where
// it is reachable (handoff::Sender, base64, varlink::Stream, count_fd_refs, make_call/make_reply)
// and, for the broker's per-call checks that live inside its control server, the same work
// written out here (marked "as in" below). Each step runs --iterations times on one full batch
// (253 connections, each with --state bytes of opaque state) and reports microseconds per batch
// and nanoseconds per connection. Steps, in the order a batch meets them:
//   sender.build      handoff::Sender::next(): the Handoff parameters, base64 of every state
//   sender.encode     make_call() and the dump that Stream::enqueue does (count_fd_refs included)
//   broker.parse      depth check, json::parse and count_fd_refs of that text (Stream::next)
//   broker.check      as in worker_handoff(): each connection's members and base64 validated, each
//                     state copied
//   broker.forward    as in HandoffRouter::send() and Connection::send_event(): the "connections"
//                     event built and dumped inside its reply (Stream::enqueue_reply, no copy)
//   receiver.parse    the event parsed (Stream::next) and every state base64-decoded
//   receiver.ack      the Received call built and dumped
//   broker.ack        the Received call parsed; the "handoff" event built and dumped (settle)
//   sender.ack        the "handoff" event parsed (Stream::next)
// and then whole hops over a socketpair, with real fds (dups of one socket), each includes the
// receiving side closing its copies as brokerd does:
//   hop.raw           one sendmsg of 253 fds and one byte, one recvmsg, the fds closed
//   hop.varlink       the Handoff call through varlink::Stream: enqueue_borrowed, flush, receive,
//                     next (parse and fd matching), the fds closed
// Exit status 0 (times are never judged), 1 on an error, 2 on a usage error.

#include "proto/handoff.hpp"
#include "proto/limits.hpp"
#include "proto/unique_fd.hpp"
#include "proto/varlink.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using proto::UniqueFd;
using json = nlohmann::json;
namespace vl = proto::varlink;
namespace ho = proto::handoff;

constexpr std::size_t kBatch = proto::limits::kMaxFdsPerMessage;
constexpr unsigned kMaxIterations = 1000000;

std::int64_t now_ns()
{
	timespec ts{};
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

[[noreturn]] void fail(const std::string &what)
{
	throw std::runtime_error(what + ": " + std::strerror(errno));
}

struct Step {
	std::string name;
	double us_per_batch;
};

// Runs body `iterations` times after one warm-up call; setup runs before each, untimed.
double time_step(unsigned iterations, const std::function<void()> &setup, const std::function<void()> &body)
{
	setup();
	body();
	std::int64_t total = 0;
	for (unsigned i = 0; i < iterations; i++) {
		setup();
		std::int64_t t = now_ns();
		body();
		total += now_ns() - t;
	}
	return static_cast<double>(total) / iterations / 1e3;
}

// The text a Stream sends for a message: what Stream::queue() does, without the queue.
std::string encode(const json &body)
{
	if (vl::count_fd_refs(body) < 0)
		throw std::runtime_error("bad fd references");
	return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

// What Stream::next() does with one message's text.
json decode(const std::string &text)
{
	json body = vl::parse(text);
	if (body.is_discarded() || vl::count_fd_refs(body) < 0)
		throw std::runtime_error("bad message");
	return body;
}

std::vector<Step> run(std::size_t state_bytes, unsigned iterations, const std::vector<int> &fds)
{
	std::vector<Step> steps;
	auto add = [&](const char *name, double us) { steps.push_back({name, us}); };
	std::string state(state_bytes, 's');
	for (std::size_t i = 0; i < state.size(); i++)
		state[i] = static_cast<char>('0' + i % 10);

	// The sender's batch: Items own their fds, so each iteration hands dups that the batch
	// completion closes again (untimed).
	ho::Sender sender;
	std::optional<ho::Sender::Batch> batch;
	auto fill = [&] {
		if (batch) {
			ho::Sender::Completion done;
			sender.complete(batch->id, batch->fds.size(), {}, {}, done);
			batch.reset();
		}
		for (int fd : fds)
			sender.add(ho::Item{UniqueFd(fcntl(fd, F_DUPFD_CLOEXEC, 3)), state});
	};
	add("sender.build", time_step(iterations, fill, [&] { batch = sender.next(); }));
	json params = batch->parameters;

	std::string call_text;
	add("sender.encode", time_step(iterations, [] {}, [&] {
		    call_text = encode(vl::make_call("io.brokerd.Worker.Handoff", params, false, true));
	    }));

	json call;
	add("broker.parse", time_step(iterations, [] {}, [&] { call = decode(call_text); }));

	std::vector<ho::Item> items;
	add("broker.check", time_step(iterations, [] {}, [&] {
		    const json &conns = call.at("parameters").at("connections");
		    items.clear();
		    items.resize(conns.size());
		    for (std::size_t i = 0; i < conns.size(); i++) {
			    const json &c = conns[i];
			    std::size_t fd = c.at("fd").get<std::size_t>();
			    if (auto st = c.find("state"); st != c.end() && !st->is_null()) {
				    if (!st->is_string() ||
				        !ho::base64_valid(st->get_ref<const std::string &>(), ho::kMaxState))
					    throw std::runtime_error("bad state");
				    items[fd].state = st->get<std::string>();
			    }
			    for (auto m = c.begin(); m != c.end(); ++m)
				    if (m.key() != "fd" && m.key() != "state")
					    throw std::runtime_error("unknown member");
		    }
	    }));

	std::string event_text;
	add("broker.forward", time_step(iterations, [] {}, [&] {
		    json conns = json::array();
		    for (std::size_t i = 0; i < items.size(); i++) {
			    json conn = {{"fd", i}};
			    if (!items[i].state.empty())
				    conn["state"] = items[i].state;
			    conns.push_back(std::move(conn));
		    }
		    json event = {{"event", "connections"}, {"batch", 1}, {"connections", std::move(conns)}};
		    event_text = "{\"parameters\":" + event.dump(-1, ' ', false, json::error_handler_t::replace) +
		                 ",\"continues\":true}";
	    }));

	std::size_t decoded = 0;
	add("receiver.parse", time_step(iterations, [] {}, [&] {
		    json e = decode(event_text);
		    const json &conns = e.at("parameters").at("connections");
		    for (const json &c : conns)
			    if (auto st = c.find("state"); st != c.end() && st->is_string())
				    decoded += ho::base64_decode(st->get<std::string>())->size();
	    }));

	std::string ack_text;
	add("receiver.ack", time_step(iterations, [] {}, [&] {
		    ack_text = encode(vl::make_call("io.brokerd.Worker.Received", json{{"batch", 1}}, false, true));
	    }));

	std::string done_text;
	add("broker.ack", time_step(iterations, [] {}, [&] {
		    json ack = decode(ack_text);
		    std::vector<std::uint64_t> returned;
		    json event = {{"event", "handoff"}, {"batch", ack.at("parameters").at("batch")}, {"landed", kBatch},
		                  {"returned", returned}};
		    done_text = encode(vl::make_reply(event, true));
	    }));

	add("sender.ack", time_step(iterations, [] {}, [&] { (void)decode(done_text); }));

	// Whole hops with real fds.
	int pair[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
		fail("socketpair");
	UniqueFd a(pair[0]), b(pair[1]);
	int sndbuf = 4 << 20;
	setsockopt(a.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
	add("hop.raw", time_step(iterations, [] {}, [&] {
		    char byte = 'F';
		    iovec iov{&byte, 1};
		    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kBatch)];
		    msghdr msg{};
		    msg.msg_iov = &iov;
		    msg.msg_iovlen = 1;
		    msg.msg_control = control;
		    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
		    cmsghdr *c = CMSG_FIRSTHDR(&msg);
		    c->cmsg_level = SOL_SOCKET;
		    c->cmsg_type = SCM_RIGHTS;
		    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
		    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
		    if (sendmsg(a.get(), &msg, MSG_NOSIGNAL) != 1)
			    fail("sendmsg");
		    msg.msg_controllen = sizeof control;
		    if (recvmsg(b.get(), &msg, MSG_CMSG_CLOEXEC) != 1 || (msg.msg_flags & MSG_CTRUNC))
			    fail("recvmsg");
		    c = CMSG_FIRSTHDR(&msg);
		    std::size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		    for (std::size_t i = 0; i < k; i++) {
			    int fd;
			    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
			    ::close(fd);
		    }
	    }));

	vl::Stream out(std::move(a)), in(std::move(b), proto::limits::kMaxMessageSize, 2 * kBatch);
	json call_body = vl::make_call("io.brokerd.Worker.Handoff", params, false, true);
	add("hop.varlink", time_step(iterations, [] {}, [&] {
		    if (out.enqueue_borrowed(call_body, fds) < 0 || out.flush() < 0)
			    throw std::runtime_error("enqueue/flush");
		    vl::Message m;
		    int r;
		    while ((r = in.next(m)) == 0)
			    if (in.receive() <= 0)
				    throw std::runtime_error("receive");
		    if (r < 0 || m.fds.size() != fds.size())
			    throw std::runtime_error("next");
	    }));
	if (batch) {
		ho::Sender::Completion done;
		sender.complete(batch->id, batch->fds.size(), {}, {}, done);
	}
	return steps;
}

} // namespace

int main(int argc, char **argv)
{
	CLI::App app{"broker-handoff-codec: the CPU cost of one 253-connection handoff batch, step by step."};
	std::vector<std::size_t> states{0, 64};
	unsigned iterations = 2000;
	bool as_json = false;
	app.add_option("--state", states, "Bytes of state per connection, one run each")
		->delimiter(',')
		->check(CLI::Range(std::size_t{0}, ho::kMaxState))
		->capture_default_str();
	app.add_option("--iterations", iterations, "Timed runs of each step")
		->check(CLI::Range(1u, kMaxIterations))
		->capture_default_str();
	app.add_flag("--json", as_json, "Print one JSON object instead of a table");
	try {
		app.parse(argc, argv);
	} catch (const CLI::ParseError &e) {
		int r = app.exit(e);
		return r == 0 ? 0 : 2;
	}

	try {
		// 253 fds to pass: dups of one socket, as the kernel passes any file the same way.
		UniqueFd sock(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
		if (!sock)
			fail("socket");
		std::vector<UniqueFd> owned;
		std::vector<int> fds;
		for (std::size_t i = 0; i < kBatch; i++) {
			owned.emplace_back(fcntl(sock.get(), F_DUPFD_CLOEXEC, 3));
			if (!owned.back())
				fail("dup");
			fds.push_back(owned.back().get());
		}
		json out = {{"batch", kBatch}, {"iterations", iterations}, {"runs", json::array()}};
		if (!as_json)
			std::printf("broker-handoff-codec: one batch of %zu connections, %u iterations per step\n", kBatch,
			            iterations);
		for (std::size_t s : states) {
			std::vector<Step> steps = run(s, iterations, fds);
			json run = {{"state_bytes", s}, {"steps", json::array()}};
			if (!as_json)
				std::printf("\nstate %zu bytes\n%-16s %12s %12s\n", s, "step", "us/batch", "ns/conn");
			for (const Step &st : steps) {
				run["steps"].push_back({{"step", st.name}, {"us_per_batch", st.us_per_batch}});
				if (!as_json)
					std::printf("%-16s %12.2f %12.1f\n", st.name.c_str(), st.us_per_batch,
					            st.us_per_batch * 1e3 / kBatch);
			}
			out["runs"].push_back(std::move(run));
		}
		if (as_json)
			std::cout << out.dump(2) << std::endl;
	} catch (const std::exception &e) {
		std::fprintf(stderr, "broker-handoff-codec: %s\n", e.what());
		return 1;
	}
	return 0;
}
