// htest-worker: a line-echo worker for the handoff tests, whose part in a handoff comes from its environment.
//
// Each line a client sends is answered with "gen G pid P seq S: <line>", S counting the lines of
// that connection across every instance it has been handed to (the count travels in the state).
// On drain it stops accepting and hands off every open connection; connections that come back
// are closed cleanly (all their input read, then FIN), and it exits once none is left.
//
// HT_MODE: what it does as a receiver:
//   serve      accepts handoffs and serves them (default)
//   crash      accepts handoffs and _exits at the first connection it is given, or, with
//              HT_CRASH_AFTER=N, once it has taken N (acknowledging the batches before)
//   refuse     does not accept handoffs (no accept_handoff in Hello)
//   nohandler  says accept_handoff but sets no on_connection handler
//   stall      accepts handoffs, and once ready reads nothing more from brokerd: when the first
//              batch comes in, it pipelines 2400 introspection calls on that connection (brokerd
//              always reads it), some 16 MiB of replies, and exits once brokerd closes it
// HT_SENDER_EXIT: when set, it _exits right after handoff() returns, as a sender killed mid-transfer.
// HT_STATE_PAD: bytes of padding added to each connection's state, to fill the batches.
// HT_REPORT_DIR: where it writes report-<pid>.json when it exits: its HandoffSummary and what it
// did with connections. While it runs, its status text carries the same counts.

#include <broker/client.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

struct Conn {
	std::string in;     // a partial line
	std::string out;    // answers not yet written
	unsigned long seq = 0;
};

struct Counts {
	unsigned long accepted = 0;
	unsigned long received = 0;        // given by on_connection
	unsigned long lines = 0;
	unsigned long closed_returned = 0; // came back and were closed cleanly
	unsigned long peer_closed = 0;
	long channel_sndbuf = -1; // the smallest SO_SNDBUF of its direct channels: a receiver's at its
	                          // first connection, a sender's while connections are in flight
};

// The smallest send buffer of this process's SOCK_SEQPACKET sockets (only the library's direct
// handoff channels are), as getsockopt() says it (twice what was set), or -1 with none.
long smallest_channel_sndbuf()
{
	long smallest = -1;
	for (const auto &e : std::filesystem::directory_iterator("/proc/self/fd")) {
		int fd = std::atoi(e.path().filename().c_str());
		int type = 0, size = 0;
		socklen_t len = sizeof type;
		if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_SEQPACKET)
			continue;
		len = sizeof size;
		if (::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &len) == 0 && (smallest < 0 || size < smallest))
			smallest = size;
	}
	return smallest;
}

std::string env_or(const char *name, const char *fallback)
{
	const char *v = std::getenv(name);
	return v && *v ? v : fallback;
}

void raise_fd_limit()
{
	rlimit rl{};
	if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		::setrlimit(RLIMIT_NOFILE, &rl);
	}
}

void set_nonblocking(int fd)
{
	int flags = ::fcntl(fd, F_GETFL);
	if (flags >= 0)
		::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

// "seq=S;<padding>\n" then the partial line.
std::string encode_state(const Conn &c, std::size_t pad)
{
	return "seq=" + std::to_string(c.seq) + ";" + std::string(pad, '.') + "\n" + c.in;
}

Conn decode_state(const std::string &state)
{
	Conn c;
	std::size_t nl = state.find('\n');
	if (state.rfind("seq=", 0) == 0 && nl != std::string::npos) {
		c.seq = std::strtoul(state.c_str() + 4, nullptr, 10);
		c.in = state.substr(nl + 1);
	}
	return c;
}

// Reads what is left and closes with a FIN: a close with unread input would be a reset.
void close_cleanly(int fd)
{
	char buf[4096];
	while (::recv(fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {
	}
	::shutdown(fd, SHUT_WR);
	::close(fd);
}

class Worker {
public:
	Worker()
		: mode_(env_or("HT_MODE", "serve")), report_dir_(env_or("HT_REPORT_DIR", "")),
		  crash_after_(std::strtoul(env_or("HT_CRASH_AFTER", "0").c_str(), nullptr, 10)),
		  pad_(std::strtoul(env_or("HT_STATE_PAD", "0").c_str(), nullptr, 10)),
		  sender_exit_(!env_or("HT_SENDER_EXIT", "").empty())
	{
	}

	int run()
	{
		broker::ClientOptions opts;
		opts.accept_handoff = mode_ != "refuse";
		client_ = std::make_unique<broker::Client>(broker::Client::from_env(opts));
		gen_ = client_->generation();

		client_->on_drain([this](const broker::DrainRequest &) { drain(); });
		if (mode_ == "serve" || (mode_ == "crash" && crash_after_ > 0)) {
			client_->on_connection([this](int fd, std::string state) {
				if (mode_ == "crash" && counts_.received >= crash_after_)
					::_exit(7);
				if (counts_.received++ == 0)
					counts_.channel_sndbuf = smallest_channel_sndbuf();
				set_nonblocking(fd);
				Conn c = decode_state(state);
				conns_[fd] = std::move(c);
				answer(fd); // a complete line may have come in the state
			});
		} else if (mode_ == "crash") {
			// A receiver that dies mid-transfer: it holds the batch and never acknowledges it.
			client_->on_connection([](int, std::string) { ::_exit(7); });
		}
		client_->on_returned([this](int fd, std::string) {
			counts_.closed_returned++;
			close_cleanly(fd);
		});

		// O_NONBLOCK is set on the open file description shared with brokerd and every other
		// worker of the service, as the example workers do: each must expect EAGAIN anyway, as
		// another may take the connection that woke it.
		for (const auto &l : client_->listeners()) {
			set_nonblocking(l.fd);
			listeners_.push_back(l.fd);
		}
		client_->ready();
		report_status();
		if (mode_ == "stall")
			return stall();

		while (!done()) {
			std::vector<pollfd> fds;
			fds.push_back({client_->fd(), client_->events(), 0});
			if (!draining_)
				for (int l : listeners_)
					fds.push_back({l, POLLIN, 0});
			std::size_t first_conn = fds.size();
			for (const auto &[fd, c] : conns_)
				fds.push_back({fd, static_cast<short>(POLLIN | (c.out.empty() ? 0 : POLLOUT)), 0});
			if (::poll(fds.data(), fds.size(), -1) < 0) {
				if (errno == EINTR)
					continue;
				std::perror("htest-worker: poll");
				return 1;
			}
			for (std::size_t i = 1; i < first_conn; i++)
				if (fds[i].revents)
					accept_from(fds[i].fd);
			for (std::size_t i = first_conn; i < fds.size(); i++)
				if (fds[i].revents && conns_.count(fds[i].fd))
					serve(fds[i].fd);
			try {
				for (int k = 0; k < 64 && client_->process(); k++) {
					// A sender's channels, looked at after each call while it has some in
					// flight: 64 calls may see a whole handoff through, and they close once
					// everything landed.
					if (client_->handoff_pending() > 0 && counts_.channel_sndbuf < 0)
						counts_.channel_sndbuf = smallest_channel_sndbuf();
				}
			} catch (const broker::Error &e) {
				std::fprintf(stderr, "htest-worker: %s\n", e.what());
				write_report();
				return 2;
			}
			report_status();
		}
		write_report();
		return 0;
	}

private:
	// Flushes what the library has to send, then waits for brokerd's next message without
	// reading it, asks for replies it never reads, and waits for brokerd to end the connection:
	// a brokerd that never does leaves the upgrade waiting on it.
	int stall()
	{
		int fd = client_->fd();
		for (pollfd p{fd, POLLOUT, 0}; client_->events() & POLLOUT; p.revents = 0) {
			::poll(&p, 1, 10000);
			client_->process();
		}
		pollfd in{fd, POLLIN, 0};
		if (::poll(&in, 1, -1) != 1)
			return 1;
		const std::string call = "{\"method\":\"org.varlink.service.GetInterfaceDescription\","
		                         "\"parameters\":{\"interface\":\"io.brokerd.Control\"}}" +
		                         std::string(1, '\0');
		unsigned long calls = 0;
		while (calls < 2400) {
			ssize_t w = ::send(fd, call.data(), call.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
			if (w == static_cast<ssize_t>(call.size())) {
				calls++;
				continue;
			}
			if (w < 0 && errno == EAGAIN) {
				pollfd out{fd, POLLOUT, 0};
				if (::poll(&out, 1, 30000) == 1)
					continue;
			}
			break;
		}
		std::fprintf(stderr, "htest-worker: stalled, %lu calls sent\n", calls);
		pollfd end{fd, POLLRDHUP, 0};
		while (!(end.revents & (POLLRDHUP | POLLHUP)))
			::poll(&end, 1, -1);
		std::fprintf(stderr, "htest-worker: brokerd ended the connection\n");
		return 0;
	}

	bool done() const { return draining_ && client_->handoff_pending() == 0 && conns_.empty(); }

	void accept_from(int listener)
	{
		for (int k = 0; k < 64; k++) {
			int fd = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
			if (fd < 0)
				return;
			counts_.accepted++;
			conns_[fd] = Conn{};
		}
	}

	void serve(int fd)
	{
		char buf[4096];
		for (;;) {
			ssize_t n = ::recv(fd, buf, sizeof buf, 0);
			if (n > 0) {
				conns_[fd].in.append(buf, static_cast<std::size_t>(n));
				continue;
			}
			if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
				counts_.peer_closed++;
				::close(fd);
				conns_.erase(fd);
				return;
			}
			if (errno == EAGAIN)
				break;
		}
		answer(fd);
	}

	void answer(int fd)
	{
		Conn &c = conns_[fd];
		std::size_t nl;
		while ((nl = c.in.find('\n')) != std::string::npos) {
			c.seq++;
			counts_.lines++;
			c.out += "gen " + std::to_string(gen_) + " pid " + std::to_string(::getpid()) + " seq " +
			         std::to_string(c.seq) + ": " + c.in.substr(0, nl + 1);
			c.in.erase(0, nl + 1);
		}
		while (!c.out.empty()) {
			ssize_t n = ::send(fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
			if (n <= 0)
				break;
			c.out.erase(0, static_cast<std::size_t>(n));
		}
	}

	// Stops accepting and hands every connection on, with its count and partial line.
	void drain()
	{
		if (draining_)
			return;
		draining_ = true;
		std::vector<std::string> states;
		std::vector<broker::Connection> out;
		states.reserve(conns_.size());
		for (const auto &[fd, c] : conns_)
			states.push_back(encode_state(c, pad_));
		std::size_t i = 0;
		for (const auto &[fd, c] : conns_)
			out.push_back(broker::Connection{fd, states[i++]});
		client_->handoff(out); // the library owns them now
		conns_.clear();
		if (sender_exit_)
			::_exit(0); // with batches in flight, maybe one half written
	}

	std::string counts_text() const
	{
		const broker::HandoffSummary &s = client_->handoff_summary();
		char buf[512];
		std::snprintf(buf, sizeof buf,
		              "{\"mode\":\"%s\",\"generation\":%llu,\"pid\":%d,\"accepted\":%lu,\"received\":%lu,"
		              "\"lines\":%lu,\"open\":%zu,\"handed\":%zu,\"landed\":%zu,\"returned\":%zu,"
		              "\"closed_returned\":%lu,\"pending\":%zu,\"channel_sndbuf\":%ld}",
		              mode_.c_str(), static_cast<unsigned long long>(gen_), ::getpid(), counts_.accepted,
		              counts_.received, counts_.lines, conns_.size(), s.handed, s.landed, s.returned,
		              counts_.closed_returned, client_->handoff_pending(), counts_.channel_sndbuf);
		return buf;
	}

	void report_status()
	{
		std::string text = counts_text();
		if (text == last_status_)
			return;
		last_status_ = text;
		try {
			client_->status(text);
		} catch (const broker::Error &) {
			// The broker has gone; process() says so next.
		}
	}

	void write_report()
	{
		if (report_dir_.empty())
			return;
		std::string path = report_dir_ + "/report-" + std::to_string(::getpid()) + ".json";
		std::string tmp = path + ".tmp";
		std::FILE *f = std::fopen(tmp.c_str(), "we");
		if (!f)
			return;
		std::fprintf(f, "%s\n", counts_text().c_str());
		std::fclose(f);
		std::rename(tmp.c_str(), path.c_str());
	}

	std::string mode_;
	std::string report_dir_;
	unsigned long crash_after_;
	std::size_t pad_;
	bool sender_exit_;
	std::unique_ptr<broker::Client> client_;
	std::uint64_t gen_ = 0;
	std::vector<int> listeners_;
	std::map<int, Conn> conns_;
	Counts counts_;
	bool draining_ = false;
	std::string last_status_;
};

} // namespace

int main()
{
	raise_fd_limit();
	try {
		return Worker().run();
	} catch (const std::exception &e) {
		std::fprintf(stderr, "htest-worker: %s\n", e.what());
		return 1;
	}
}
