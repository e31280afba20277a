// MetricsServer: GET /metrics over HTTP, served from brokerd's loop (metrics.listen).
#pragma once

#include "os/event.hpp"
#include "proto/unique_fd.hpp"

#include <cstddef>
#include <functional>
#include <list>
#include <memory>
#include <string>

namespace brokerd::metrics {

// One request per connection, HTTP/1.0 or 1.1, nothing a peer sends can make it wait or grow:
// at most `max_connections` at once (the next one is accepted and closed at once), a head of at
// most proto::limits::kMaxHttpRequest bytes (else 431), the whole exchange within
// proto::limits::kHttpTimeout of the accept (else closed), exactly `GET /metrics` (else 400, 404 or
// 405). The reply is written without blocking, with Connection: close; the server then closes its
// side and waits for the peer's close within the same deadline. No timer runs while no connection
// is open.
class MetricsServer {
public:
	// May the peer of this accepted connection read the metrics (a unix endpoint's SO_PEERCRED
	// check; 403 when not)?
	using Allowed = std::function<bool(int fd)>;
	// The whole exposition text, rendered for each request.
	using Render = std::function<std::string()>;

	// Serves `listener` (a listening stream socket, made non-blocking here).
	MetricsServer(sd_event *event, proto::UniqueFd listener, std::size_t max_connections, Allowed allowed,
	              Render render);
	~MetricsServer();
	MetricsServer(const MetricsServer &) = delete;
	MetricsServer &operator=(const MetricsServer &) = delete;

	int fd() const { return fd_.get(); }
	std::size_t connections() const { return connections_.size(); }

	struct Connection;

private:
	static int accept_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	void accept_some();
	void pause_accepting();
	void on_io(Connection &c, std::uint32_t revents);
	void respond(Connection &c);
	void flush(Connection &c);
	void drop(Connection &c);

	sd_event *event_;
	proto::UniqueFd fd_;
	std::size_t max_connections_;
	Allowed allowed_;
	Render render_;
	EventSource source_;
	EventSource pause_;
	std::list<std::unique_ptr<Connection>> connections_;
};

// The reply to a request whose head (up to and including its blank line) is `head`: the status
// and what to say, as MetricsServer sends it. Pure, for the tests: `body` is rendered only for a
// 200.
struct Reply {
	int status = 200;
	std::string text; // the whole response, head and body
};
Reply reply_to(std::string_view head, const std::function<std::string()> &body);
// The 431 reply, for a head past the limit, and the 403 one, for a peer below the reader tier.
std::string error_reply(int status);

} // namespace brokerd::metrics
