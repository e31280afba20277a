// SyncClient: blocking Varlink calls under a deadline (see sync_client.hpp).
#include "proto/sync_client.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

namespace proto::varlink {

namespace {

std::string errno_text(int e)
{
	return std::strerror(e);
}

UniqueFd connect_unix(const std::string &path, std::chrono::milliseconds timeout)
{
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	if (path.empty() || path.size() >= sizeof(sa.sun_path))
		throw Error(EINVAL, "invalid socket path '" + path + "'");
	std::memcpy(sa.sun_path, path.data(), path.size());
	socklen_t len = offsetof(sockaddr_un, sun_path) + path.size();
	if (path[0] == '@')
		sa.sun_path[0] = '\0';
	else
		len += 1;

	// A blocking connect, bounded by SO_SNDTIMEO: a non-blocking one fails at once with EAGAIN
	// whenever the listener's backlog is full, as it is in a burst of starting workers.
	UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	if (!fd)
		throw Error(errno, "socket: " + errno_text(errno));
	timeval tv{};
	tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
	tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
	::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	int r;
	do
		r = ::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), len);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		throw Error(errno == EAGAIN ? ETIMEDOUT : errno, "connect to " + path + ": " + errno_text(errno));
	if (::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) | O_NONBLOCK) < 0)
		throw Error(errno, "fcntl: " + errno_text(errno));
	return fd;
}

} // namespace

int errno_for_error(std::string_view error)
{
	if (error == kPermissionDenied)
		return EACCES;
	if (error == kMethodNotFound || error == kInterfaceNotFound || error == kMethodNotImplemented)
		return EOPNOTSUPP;
	if (error == kInvalidParameter)
		return EINVAL;
	return EREMOTEIO;
}

SyncClient::SyncClient(const std::string &path, std::chrono::milliseconds timeout)
	: stream_(connect_unix(path, timeout)), timeout_(timeout)
{
}

SyncClient::SyncClient(UniqueFd fd, std::chrono::milliseconds timeout) : stream_(std::move(fd)), timeout_(timeout) {}

void SyncClient::send(const json &body, std::vector<UniqueFd> fds)
{
	int r = stream_.enqueue(body, std::move(fds));
	if (r < 0)
		throw Error(-r, "cannot send message: " + errno_text(-r));
	auto deadline = std::chrono::steady_clock::now() + timeout_;
	for (;;) {
		r = stream_.flush();
		if (r == 0)
			return;
		if ((r == -EPIPE || r == -ECONNRESET) && peer_left_message())
			return; // receive() gives it: brokerd said why it closed (a connection limit)
		if (r != -EAGAIN)
			throw Error(-r, "send: " + errno_text(-r));
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
		if (left.count() <= 0)
			throw Error(ETIMEDOUT, "send: timed out");
		pollfd p{stream_.fd(), POLLOUT, 0};
		if (::poll(&p, 1, static_cast<int>(left.count())) < 0 && errno != EINTR)
			throw Error(errno, "poll: " + errno_text(errno));
	}
}

bool SyncClient::peer_left_message()
{
	while (!stream_.message_ready()) {
		int r = stream_.receive();
		if (r <= 0)
			return false;
	}
	return true;
}

Message SyncClient::receive()
{
	auto deadline = std::chrono::steady_clock::now() + timeout_;
	Message m;
	for (;;) {
		int r = stream_.next(m);
		if (r > 0)
			return m;
		if (r < 0)
			throw Error(-r, "protocol error: " + errno_text(-r));
		r = stream_.receive();
		if (r > 0)
			continue;
		if (r == 0)
			throw Error(ECONNRESET, "connection closed by the broker");
		if (r != -EAGAIN)
			throw Error(-r, "receive: " + errno_text(-r));
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
		if (left.count() <= 0)
			throw Error(ETIMEDOUT, "timed out waiting for the broker");
		pollfd p{stream_.fd(), POLLIN, 0};
		if (::poll(&p, 1, static_cast<int>(left.count())) < 0 && errno != EINTR)
			throw Error(errno, "poll: " + errno_text(errno));
	}
}

Message SyncClient::call(std::string_view method, json parameters, std::vector<UniqueFd> fds)
{
	send(make_call(method, std::move(parameters)), std::move(fds));
	Message m = receive();
	auto err = m.body.find("error");
	if (err != m.body.end()) {
		std::string name = err->is_string() ? err->get<std::string>() : "invalid error reply";
		std::string what = name;
		auto p = m.body.find("parameters");
		if (p != m.body.end() && p->is_object() && !p->empty()) {
			// Appended, not `" " + dump()`: GCC 12 at -O3 warns falsely (-Wrestrict) on the
			// insert that operator+ inlines.
			what += ' ';
			what += p->dump();
		}
		throw Error(errno_for_error(name), what, name);
	}
	return m;
}

} // namespace proto::varlink
