// ControlServer: the control socket: binding it, accepting, per-user connection limits, the sweep.
#include "control/server.hpp"

#include "control/connection.hpp"
#include "os/closer.hpp"
#include "os/listener.hpp"
#include "os/log.hpp"
#include "os/paths.hpp"

#include <fcntl.h>
#include <malloc.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace brokerd {

using json = nlohmann::json;

namespace {

constexpr int kAcceptPerWakeup = 64;

} // namespace

void ControlServer::broadcast(const Event &event)
{
	for (auto &c : connections_)
		c->watch_event(event);
}

std::array<std::size_t, 4> ControlServer::connections_by_tier() const
{
	std::array<std::size_t, 4> out{};
	for (const auto &c : connections_)
		if (!c->dead())
			out[static_cast<std::size_t>(c->tier())]++;
	return out;
}

void ControlServer::bind_socket()
{
	const std::string &path = cfg_.path;
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	if (path.empty() || path.size() >= sizeof(sa.sun_path))
		throw std::runtime_error("control socket: invalid path \"" + path + "\"");
	std::memcpy(sa.sun_path, path.data(), path.size());
	socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
	bool abstract = path[0] == '@';
	if (abstract) {
		sa.sun_path[0] = '\0';
	} else {
		len += 1;
		if (auto why = make_parent_directory(path))
			throw std::runtime_error("control socket: " + *why);
		struct stat st{};
		if (::lstat(path.c_str(), &st) == 0) {
			if (!S_ISSOCK(st.st_mode))
				throw std::runtime_error("control socket: " + path + " exists and is not a socket, refusing to replace it");
			if (unix_socket_in_use(path))
				throw std::runtime_error("control socket: " + path +
				                         ": another brokerd (or something else) listens on it, refusing to replace it");
			::unlink(path.c_str());
		}
	}

	fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd_)
		throw std::runtime_error("control socket: " + errno_text(errno));
	if (::bind(fd_.get(), reinterpret_cast<sockaddr *>(&sa), len) < 0)
		throw std::runtime_error("control socket: bind " + path + ": " + errno_text(errno));
	if (!abstract) {
		unlink_path_ = path;
		if (::chmod(path.c_str(), cfg_.mode) < 0)
			throw std::runtime_error("control socket: chmod " + path + ": " + errno_text(errno));
	}
	if (::listen(fd_.get(), 128) < 0)
		throw std::runtime_error("control socket: listen: " + errno_text(errno));
}

ControlServer::ControlServer(sd_event *event, const config::ControlConfig &cfg, Supervisor &supervisor,
                             DaemonHooks hooks, usec_t start_usec, proto::UniqueFd adopted)
	: event_(event), cfg_(cfg), rules_(AccessRules::resolve(cfg)), supervisor_(supervisor), hooks_(std::move(hooks)),
	  start_usec_(start_usec)
{
	if (adopted) {
		// systemd's socket (brokerd.socket, or our own kept in the fd store): its file and mode
		// are systemd's business, and it stays when we stop. We accept without blocking.
		int flags = ::fcntl(adopted.get(), F_GETFL);
		if (flags < 0 || ::fcntl(adopted.get(), F_SETFL, flags | O_NONBLOCK) < 0)
			throw std::runtime_error("control socket: " + errno_text(errno));
		fd_ = std::move(adopted);
		adopted_ = true;
	} else {
		bind_socket();
	}

	// Only a worker's Handoff carries fds: the connections it accepts refuse them until Hello.
	refuses_fds_ = closer::pass_rights(fd_.get(), false);
	if (!refuses_fds_)
		log::info("control socket: the kernel cannot refuse fds (no SO_PASSRIGHTS), they are closed off the loop");

	sd_event_source *s = nullptr;
	int r = sd_event_add_io(event_, &s, fd_.get(), EPOLLIN, accept_handler, this);
	if (r < 0)
		throw std::runtime_error("control socket: " + errno_text(-r));
	source_.reset(s);
}

void ControlServer::own_file()
{
	if (!cfg_.path.empty() && cfg_.path[0] != '@')
		unlink_path_ = cfg_.path;
}

ControlServer::~ControlServer()
{
	connections_.clear();
	remove_socket_file();
}

void ControlServer::remove_socket_file()
{
	if (unlink_path_.empty())
		return;
	struct stat st{};
	if (::lstat(unlink_path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode))
		::unlink(unlink_path_.c_str());
	unlink_path_.clear();
}

int ControlServer::accept_handler(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("accept_handler", [&]() -> int {
		static_cast<ControlServer *>(userdata)->accept_some();
		return 0;
	});
}

void ControlServer::accept_some()
{
	for (int i = 0; i < kAcceptPerWakeup; i++) {
		// Where fds can reach its queue, its close may drop the last copy of one.
		int accepted = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
		proto::UniqueFd fd = refuses_fds_ ? proto::UniqueFd(accepted) : proto::UniqueFd::from_peer(accepted);
		if (!fd) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				// Out of fds: stop accepting for a moment instead of spinning on a readable socket.
				log::warning("control: accept: " + errno_text(errno) + ", pausing new connections for 1s");
				sd_event_source_set_enabled(source_.get(), SD_EVENT_OFF);
				sd_event_source *s = nullptr;
				auto resume = [](sd_event_source *, std::uint64_t, void *userdata) -> int {
					auto *server = static_cast<ControlServer *>(userdata);
					server->pause_.reset();
					sd_event_source_set_enabled(server->source_.get(), SD_EVENT_ON);
					return 0;
				};
				if (sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC, 1000000, 100000, resume, this) >= 0)
					pause_.reset(s);
				else
					sd_event_source_set_enabled(source_.get(), SD_EVENT_ON);
				return;
			}
			if (errno != EAGAIN)
				log::warning("control: accept: " + errno_text(errno) + ", ignoring");
			return;
		}
		auto conn = std::make_unique<Connection>(*this, std::move(fd));
		if (!conn->start())
			continue;
		if (auto why = refusal(*conn)) {
			conn->refuse(*why);
			continue;
		}
		connections_.push_back(std::move(conn));
	}
}

// Why a new connection may not have a slot: one user cannot take them all (workers of other
// users still say Hello), and none but root and the operators take the last few (root's
// `brokerctl status` always gets in).
std::optional<std::string> ControlServer::refusal(const Connection &conn) const
{
	std::size_t live = 0, mine = 0;
	for (const auto &c : connections_) {
		if (c->dead())
			continue;
		live++;
		mine += c->uid() == conn.uid() && !c->uncounted();
	}
	if (live >= cfg_.max_connections)
		return "brokerd has " + std::to_string(live) + " connections, its most (control.max_connections)";
	if (!conn.is_operator() && live + std::min(cfg_.reserved_connections, cfg_.max_connections) >= cfg_.max_connections)
		return "brokerd has " + std::to_string(live) + " connections; the other " +
		       std::to_string(cfg_.reserved_connections) + " are kept for operators (control.reserved_connections)";
	bool owner = conn.uid() == 0 || conn.uid() == ::geteuid();
	if (!owner && mine >= cfg_.max_connections_per_user)
		return "uid " + std::to_string(conn.uid()) + " has " + std::to_string(mine) +
		       " connections, the most for one user (control.max_connections_per_user)";
	return std::nullopt;
}

void ControlServer::schedule_sweep()
{
	if (sweep_)
		return;
	sd_event_source *s = nullptr;
	if (sd_event_add_defer(event_, &s, sweep_handler, this) >= 0) {
		sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
		sweep_.reset(s);
	}
}

int ControlServer::sweep_handler(sd_event_source *, void *userdata)
{
	return guarded("sweep_handler", [&]() -> int {
		auto *server = static_cast<ControlServer *>(userdata);
		std::size_t freed = 0;
		server->connections_.remove_if([&](const auto &c) {
			if (c->dead())
				freed += c->buffer_bytes();
			return c->dead();
		});
		server->sweep_.reset();
		// glibc keeps what is freed in its arenas: a flood of large buffers would stay brokerd's
		// for good.
		server->freed_since_trim_ += freed;
		if (server->freed_since_trim_ >= proto::limits::kTrimAfterFreeing) {
			server->freed_since_trim_ = 0;
			::malloc_trim(0);
		}
		return 0;
	});
}

} // namespace brokerd
