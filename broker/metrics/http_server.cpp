// MetricsServer: a bounded HTTP/1.x responder for GET /metrics on sd-event.
#include "metrics/http_server.hpp"

#include "os/log.hpp"
#include "proto/limits.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace brokerd::metrics {

namespace lim = proto::limits;

struct MetricsServer::Connection {
	MetricsServer *server = nullptr;
	proto::UniqueFd fd;
	EventSource io;
	EventSource deadline;
	std::string in;
	std::string out;
	std::size_t sent = 0;
	bool replying = false; // the reply is queued: read only to see the peer's close
};

namespace {

const char *reason(int status)
{
	switch (status) {
	case 200:
		return "OK";
	case 400:
		return "Bad Request";
	case 403:
		return "Forbidden";
	case 404:
		return "Not Found";
	case 405:
		return "Method Not Allowed";
	case 431:
		return "Request Header Fields Too Large";
	}
	return "Internal Server Error";
}

std::string response(int status, std::string_view content_type, const std::string &body, bool allow = false)
{
	std::string r = "HTTP/1.1 " + std::to_string(status) + ' ' + reason(status) + "\r\n";
	r += "Content-Type: ";
	r += content_type;
	r += "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
	if (allow)
		r += "Allow: GET\r\n";
	r += "Connection: close\r\n\r\n";
	r += body;
	return r;
}

std::string plain(int status, bool allow = false)
{
	return response(status, "text/plain; charset=utf-8", std::string(reason(status)) + "\n", allow);
}

} // namespace

std::string error_reply(int status)
{
	return plain(status);
}

Reply reply_to(std::string_view head, const std::function<std::string()> &body)
{
	std::string_view line = head.substr(0, head.find("\r\n"));
	std::size_t sp1 = line.find(' ');
	std::size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
	if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos)
		return {400, plain(400)};
	std::string_view method = line.substr(0, sp1);
	std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
	std::string_view version = line.substr(sp2 + 1);
	if (version != "HTTP/1.1" && version != "HTTP/1.0")
		return {400, plain(400)};
	if (method != "GET")
		return {405, plain(405, true)};
	std::string_view path = target.substr(0, target.find('?'));
	if (path != "/metrics")
		return {404, plain(404)};
	return {200, response(200, "text/plain; version=0.0.4; charset=utf-8", body())};
}

MetricsServer::MetricsServer(sd_event *event, proto::UniqueFd listener, std::size_t max_connections, Allowed allowed,
                             Render render)
	: event_(event), fd_(std::move(listener)), max_connections_(max_connections), allowed_(std::move(allowed)),
	  render_(std::move(render))
{
	int flags = ::fcntl(fd_.get(), F_GETFL);
	if (flags < 0 || ::fcntl(fd_.get(), F_SETFL, flags | O_NONBLOCK) < 0)
		throw std::runtime_error(std::string("metrics: ") + std::strerror(errno));
	sd_event_source *s = nullptr;
	int r = sd_event_add_io(event_, &s, fd_.get(), EPOLLIN, accept_handler, this);
	if (r < 0)
		throw std::runtime_error(std::string("metrics: ") + std::strerror(-r));
	source_.reset(s);
}

MetricsServer::~MetricsServer() = default;

int MetricsServer::accept_handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("metrics accept", [&]() -> int {
		static_cast<MetricsServer *>(userdata)->accept_some();
		return 0;
	});
}

void MetricsServer::pause_accepting()
{
	log::warning("metrics: accept: " + std::string(std::strerror(errno)) + ", pausing new connections for 1s");
	sd_event_source_set_enabled(source_.get(), SD_EVENT_OFF);
	auto resume = [](sd_event_source *, std::uint64_t, void *userdata) -> int {
		auto *server = static_cast<MetricsServer *>(userdata);
		server->pause_.reset();
		sd_event_source_set_enabled(server->source_.get(), SD_EVENT_ON);
		return 0;
	};
	sd_event_source *s = nullptr;
	if (sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC, 1000000, 100000, resume, this) >= 0)
		pause_.reset(s);
	else
		sd_event_source_set_enabled(source_.get(), SD_EVENT_ON);
}

void MetricsServer::accept_some()
{
	for (int i = 0; i < lim::kMetricsAcceptPerWakeup; i++) {
		proto::UniqueFd fd(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
		if (!fd) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
				return pause_accepting();
			if (errno != EAGAIN)
				log::warning("metrics: accept: " + std::string(std::strerror(errno)) + ", ignoring");
			return;
		}
		// Past the limit: closed at once, so that the connections already open are served.
		if (connections_.size() >= max_connections_)
			continue;
		auto c = std::make_unique<Connection>();
		c->server = this;
		c->fd = std::move(fd);
		auto io = [](sd_event_source *, int, std::uint32_t revents, void *userdata) -> int {
			return guarded("metrics io", [&]() -> int {
				auto *conn = static_cast<Connection *>(userdata);
				conn->server->on_io(*conn, revents);
				return 0;
			});
		};
		auto expire = [](sd_event_source *, std::uint64_t, void *userdata) -> int {
			auto *conn = static_cast<Connection *>(userdata);
			conn->server->drop(*conn);
			return 0;
		};
		sd_event_source *s = nullptr;
		if (sd_event_add_io(event_, &s, c->fd.get(), EPOLLIN, io, c.get()) < 0)
			continue;
		c->io.reset(s);
		if (sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC,
		                               std::chrono::duration_cast<std::chrono::microseconds>(lim::kHttpTimeout).count(),
		                               100000, expire, c.get()) < 0)
			continue;
		c->deadline.reset(s);
		Connection &conn = *c;
		connections_.push_back(std::move(c));
		if (allowed_ && !allowed_(conn.fd.get())) {
			conn.out = error_reply(403);
			conn.replying = true;
			flush(conn);
		}
	}
}

void MetricsServer::on_io(Connection &c, std::uint32_t revents)
{
	if (revents & EPOLLOUT) {
		flush(c);
		return;
	}
	char buf[2048];
	for (int reads = 0; reads < 16; reads++) { // a peer that floods waits for the next turn
		ssize_t n = ::recv(c.fd.get(), buf, sizeof(buf), 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			// The peer closed (or reset): nothing more to send it.
			drop(c);
			return;
		}
		if (c.replying)
			continue; // what it sends after its head is not read; its close is
		c.in.append(buf, static_cast<std::size_t>(n));
		std::size_t end = c.in.find("\r\n\r\n");
		if (end == std::string::npos && c.in.size() <= lim::kMaxHttpRequest)
			continue;
		if (end == std::string::npos || end + 4 > lim::kMaxHttpRequest)
			c.out = error_reply(431);
		else
			c.out = reply_to(std::string_view(c.in).substr(0, end + 4), render_).text;
		c.in.clear();
		c.in.shrink_to_fit();
		c.replying = true;
		flush(c);
		return;
	}
}

void MetricsServer::flush(Connection &c)
{
	while (c.sent < c.out.size()) {
		ssize_t n = ::send(c.fd.get(), c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			sd_event_source_set_io_events(c.io.get(), EPOLLOUT);
			return;
		}
		if (n < 0) {
			drop(c);
			return;
		}
		c.sent += static_cast<std::size_t>(n);
	}
	// All written: our side is done; the peer's close (or the deadline) ends it. Closing now
	// with its bytes unread would reset the connection and could lose the reply.
	c.out.clear();
	c.out.shrink_to_fit();
	::shutdown(c.fd.get(), SHUT_WR);
	sd_event_source_set_io_events(c.io.get(), EPOLLIN);
}

void MetricsServer::drop(Connection &c)
{
	connections_.remove_if([&](const std::unique_ptr<Connection> &p) { return p.get() == &c; });
}

} // namespace brokerd::metrics
