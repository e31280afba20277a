// Listener: binds brokerd's sockets, or adopts them from systemd, and names them canonically.
#include "os/listener.hpp"

#include <arpa/inet.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace brokerd {

namespace {

using config::SocketConfig;
using config::SocketKind;

[[noreturn]] void fail(const SocketConfig &cfg, const std::string &what)
{
	throw std::runtime_error("socket " + cfg.name + ": " + what);
}

[[noreturn]] void fail_errno(const SocketConfig &cfg, const std::string &what, int err)
{
	fail(cfg, what + ": " + std::strerror(err));
}

// The configured address in canonical form, for error messages (before any port is known).
std::string configured_address(const SocketConfig &cfg)
{
	switch (cfg.kind) {
	case SocketKind::Tcp:
	case SocketKind::Udp: {
		std::string scheme = cfg.kind == SocketKind::Tcp ? "tcp://" : "udp://";
		std::string host = cfg.host.empty() ? "::" : cfg.host;
		bool v6 = host.find(':') != std::string::npos;
		return scheme + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(cfg.port);
	}
	case SocketKind::Unix:
		return "unix:" + cfg.path;
	case SocketKind::Systemd:
		break;
	}
	return "systemd:" + cfg.systemd_name;
}

// Renders a bound address as "tcp://127.0.0.1:8080", "udp://[::1]:53", "unix:/run/x.sock" or
// "unix:@name"; the scheme comes from `type`. Empty for families a listener cannot have.
std::string format_address(const sockaddr_storage &ss, socklen_t len, int type)
{
	const char *scheme = type == SOCK_DGRAM ? "udp://" : "tcp://";
	char host[INET6_ADDRSTRLEN];
	switch (ss.ss_family) {
	case AF_INET: {
		const auto *in = reinterpret_cast<const sockaddr_in *>(&ss);
		::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
		return std::string(scheme) + host + ":" + std::to_string(ntohs(in->sin_port));
	}
	case AF_INET6: {
		const auto *in6 = reinterpret_cast<const sockaddr_in6 *>(&ss);
		::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
		std::string h = host;
		if (in6->sin6_scope_id != 0) {
			char ifname[IF_NAMESIZE];
			if (::if_indextoname(in6->sin6_scope_id, ifname))
				h += std::string("%") + ifname;
			else
				h.append(1, '%').append(std::to_string(in6->sin6_scope_id));
		}
		return std::string(scheme) + "[" + h + "]:" + std::to_string(ntohs(in6->sin6_port));
	}
	case AF_UNIX: {
		const auto *un = reinterpret_cast<const sockaddr_un *>(&ss);
		std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
		if (n == 0)
			return "unix:"; // unnamed
		if (un->sun_path[0] == '\0')
			return "unix:@" + std::string(un->sun_path + 1, n - 1);
		return "unix:" + std::string(un->sun_path, ::strnlen(un->sun_path, n));
	}
	default:
		return {};
	}
}

std::string read_address(const SocketConfig &cfg, int fd, int type)
{
	sockaddr_storage ss{};
	socklen_t len = sizeof(ss);
	if (::getsockname(fd, reinterpret_cast<sockaddr *>(&ss), &len) < 0)
		fail_errno(cfg, "getsockname", errno);
	return format_address(ss, len, type);
}

void set_flag(const SocketConfig &cfg, int fd, int level, int opt, int value, const char *name)
{
	if (::setsockopt(fd, level, opt, &value, sizeof(value)) < 0)
		fail_errno(cfg, std::string("setsockopt ") + name, errno);
}

// The kernel's default for IPV6_V6ONLY (net.ipv6.bindv6only) stays unless the config sets it.
Listener open_inet(const SocketConfig &cfg)
{
	bool stream = cfg.kind == SocketKind::Tcp;
	int type = stream ? SOCK_STREAM : SOCK_DGRAM;
	std::string shown = configured_address(cfg);

	// Numeric only: no resolver round trip at start-up, and one address, not a list.
	addrinfo hints{};
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = type;
	addrinfo *res = nullptr;
	std::string port = std::to_string(cfg.port);
	// No host means every address, as systemd reads "ListenStream=8080": IPv6, dual-stack unless
	// net.ipv6.bindv6only or ipv6_only says otherwise.
	std::string host = cfg.host.empty() ? "::" : cfg.host;
	int r = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
	if (r != 0)
		fail(cfg, "invalid address " + shown + ": " + (r == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(r)));
	sockaddr_storage addr{};
	socklen_t addrlen = res->ai_addrlen;
	int family = res->ai_family;
	std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
	::freeaddrinfo(res);

	// No SOCK_NONBLOCK: the open file description is shared with every worker, and workers
	// that accept in blocking mode must keep working. The broker itself never accepts.
	proto::UniqueFd fd(::socket(family, type | SOCK_CLOEXEC, 0));
	if (!fd)
		fail_errno(cfg, "socket " + shown, errno);
	if (stream)
		set_flag(cfg, fd.get(), SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
	if (cfg.reuseport)
		set_flag(cfg, fd.get(), SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT");
	if (family == AF_INET6 && cfg.ipv6_only)
		set_flag(cfg, fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, *cfg.ipv6_only ? 1 : 0, "IPV6_V6ONLY");

	if (::bind(fd.get(), reinterpret_cast<const sockaddr *>(&addr), addrlen) < 0)
		fail_errno(cfg, "bind " + shown, errno);
	if (stream && ::listen(fd.get(), cfg.backlog) < 0)
		fail_errno(cfg, "listen " + shown, errno);

	Listener l;
	l.name = cfg.name;
	l.address = read_address(cfg, fd.get(), type);
	l.kind = stream ? "tcp" : "udp";
	l.origin = "bound";
	l.fd = std::move(fd);
	return l;
}

Listener open_unix(const SocketConfig &cfg)
{
	std::string shown = configured_address(cfg);
	bool abstract = !cfg.path.empty() && cfg.path[0] == '@';

	sockaddr_un un{};
	un.sun_family = AF_UNIX;
	if (cfg.path.empty() || cfg.path.size() > sizeof(un.sun_path) - (abstract ? 0 : 1))
		fail(cfg, "invalid address " + shown + ": the path must be 1 to " +
				  std::to_string(sizeof(un.sun_path) - 1) + " bytes");
	std::memcpy(un.sun_path, cfg.path.data(), cfg.path.size());
	socklen_t addrlen = offsetof(sockaddr_un, sun_path) + cfg.path.size();
	if (abstract)
		un.sun_path[0] = '\0'; // the abstract namespace: no file, gone with the last fd
	else
		addrlen += 1; // the NUL

	if (!abstract) {
		// A socket file left by a previous run blocks bind; anything else at the path is not
		// ours to remove.
		struct stat st{};
		if (::lstat(cfg.path.c_str(), &st) == 0) {
			if (!S_ISSOCK(st.st_mode))
				fail(cfg, shown + ": the path exists and is not a socket, refusing to replace it");
			if (unix_socket_in_use(cfg.path))
				fail(cfg, shown + ": something still listens on it (another brokerd, another daemon, or "
				          "workers left running), refusing to replace it");
			if (::unlink(cfg.path.c_str()) < 0 && errno != ENOENT)
				fail_errno(cfg, "unlink stale socket " + shown, errno);
		} else if (errno != ENOENT) {
			fail_errno(cfg, "stat " + shown, errno);
		}
	}

	proto::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	if (!fd)
		fail_errno(cfg, "socket " + shown, errno);
	if (::bind(fd.get(), reinterpret_cast<const sockaddr *>(&un), addrlen) < 0)
		fail_errno(cfg, "bind " + shown, errno);

	// From here on the file is ours: remove it again if the listener is not completed.
	auto undo = [&](const std::string &what, int err) {
		if (!abstract)
			::unlink(cfg.path.c_str());
		fail_errno(cfg, what, err);
	};
	if (!abstract && cfg.mode && ::chmod(cfg.path.c_str(), *cfg.mode) < 0)
		undo("chmod " + shown, errno);
	if (::listen(fd.get(), cfg.backlog) < 0)
		undo("listen " + shown, errno);

	Listener l;
	l.name = cfg.name;
	l.address = read_address(cfg, fd.get(), SOCK_STREAM);
	l.kind = "unix";
	l.origin = "bound";
	if (!abstract)
		l.unlink_path = cfg.path;
	l.fd = std::move(fd);
	return l;
}

// What an fd from systemd is: the kind a listener can be, and its address. Throws naming
// `shown` when it cannot be a listener.
struct Probed {
	std::string kind;
	std::string address;
	int type = 0;
};

Probed probe(const SocketConfig &cfg, int fd, const std::string &shown)
{
	int r = ::sd_is_socket(fd, AF_UNSPEC, 0, -1);
	if (r < 0)
		fail_errno(cfg, shown, -r);
	if (r == 0)
		fail(cfg, shown + " is not a socket");

	int type = 0;
	socklen_t len = sizeof(type);
	if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
		fail_errno(cfg, "getsockopt SO_TYPE on " + shown, errno);
	if (type == SOCK_STREAM) {
		int listening = 0;
		len = sizeof(listening);
		if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0)
			fail_errno(cfg, "getsockopt SO_ACCEPTCONN on " + shown, errno);
		if (!listening)
			fail(cfg, shown + " is a stream socket that is not listening");
	} else if (type != SOCK_DGRAM) {
		fail(cfg, shown + " is neither a listening stream socket nor a datagram socket");
	}

	int family = 0;
	len = sizeof(family);
	if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &len) < 0)
		fail_errno(cfg, "getsockopt SO_DOMAIN on " + shown, errno);

	Probed p;
	p.type = type;
	if (family == AF_UNIX)
		p.kind = "unix";
	else if (family == AF_INET || family == AF_INET6)
		p.kind = type == SOCK_STREAM ? "tcp" : "udp";
	else
		fail(cfg, shown + " has address family " + std::to_string(family) + ", not inet, inet6 or unix");
	p.address = read_address(cfg, fd, type);
	return p;
}

Listener adopt_systemd(const SocketConfig &cfg, InheritedFds &inherited)
{
	auto it = inherited.by_name.find(cfg.systemd_name);
	if (it == inherited.by_name.end())
		fail(cfg, "systemd passed no socket named \"" + cfg.systemd_name + "\"");
	proto::UniqueFd fd = std::move(it->second);
	inherited.by_name.erase(it);

	std::string shown = "systemd socket \"" + cfg.systemd_name + "\" (fd " + std::to_string(fd.get()) + ")";
	Probed p = probe(cfg, fd.get(), shown);
	Listener l;
	l.name = cfg.name;
	l.kind = p.kind;
	l.address = p.address;
	l.origin = "systemd";
	l.fd = std::move(fd);
	return l;
}

// Whether a bound inet address is the one the config asks for: same family and address, and
// the same port unless the config leaves it to the kernel (port 0).
bool same_inet_address(const SocketConfig &cfg, int fd)
{
	sockaddr_storage have{};
	socklen_t have_len = sizeof(have);
	if (::getsockname(fd, reinterpret_cast<sockaddr *>(&have), &have_len) < 0)
		return false;
	addrinfo hints{};
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = cfg.kind == SocketKind::Tcp ? SOCK_STREAM : SOCK_DGRAM;
	addrinfo *res = nullptr;
	std::string host = cfg.host.empty() ? "::" : cfg.host;
	if (::getaddrinfo(host.c_str(), "0", &hints, &res) != 0)
		return false;
	bool same = res->ai_family == have.ss_family;
	if (same && have.ss_family == AF_INET) {
		const auto *want = reinterpret_cast<const sockaddr_in *>(res->ai_addr);
		const auto *got = reinterpret_cast<const sockaddr_in *>(&have);
		same = want->sin_addr.s_addr == got->sin_addr.s_addr && (cfg.port == 0 || ntohs(got->sin_port) == cfg.port);
	} else if (same && have.ss_family == AF_INET6) {
		const auto *want = reinterpret_cast<const sockaddr_in6 *>(res->ai_addr);
		const auto *got = reinterpret_cast<const sockaddr_in6 *>(&have);
		same = std::memcmp(&want->sin6_addr, &got->sin6_addr, sizeof(in6_addr)) == 0 &&
		       want->sin6_scope_id == got->sin6_scope_id && (cfg.port == 0 || ntohs(got->sin6_port) == cfg.port);
	}
	::freeaddrinfo(res);
	return same;
}

} // namespace

Result<Listener> adopt_stored(const config::SocketConfig &cfg, proto::UniqueFd fd)
{
	std::string shown = "stored socket \"" + cfg.name + "\" (fd " + std::to_string(fd.get()) + ")";
	Probed p;
	try {
		p = probe(cfg, fd.get(), shown);
	} catch (const std::exception &e) {
		return Failure{e.what()};
	}
	std::string want_kind = cfg.kind == SocketKind::Tcp ? "tcp" : cfg.kind == SocketKind::Udp ? "udp" : "unix";
	bool same = p.kind == want_kind;
	if (same && cfg.kind == SocketKind::Unix)
		same = p.address == configured_address(cfg);
	else if (same)
		same = same_inet_address(cfg, fd.get());
	if (!same)
		return Failure{"the fd store holds " + p.kind + " " + p.address + ", the config wants " + configured_address(cfg)};
	// A socket whose file is gone (removed when brokerd stopped, or by anyone) is unreachable.
	if (cfg.kind == SocketKind::Unix && !unix_file_present(cfg.path))
		return Failure{"its file " + cfg.path + " is gone"};
	// The backlog may have changed in the config; listen() again applies it to the same queue.
	if (p.type == SOCK_STREAM && ::listen(fd.get(), cfg.backlog) < 0)
		return Failure{std::string("listen: ") + std::strerror(errno)};
	Listener l;
	l.name = cfg.name;
	l.kind = p.kind;
	l.address = p.address;
	l.origin = "fdstore";
	if (cfg.kind == SocketKind::Unix && !cfg.path.empty() && cfg.path[0] != '@')
		l.unlink_path = cfg.path;
	l.fd = std::move(fd);
	return l;
}

bool unix_socket_in_use(const std::string &path)
{
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	if (path.empty() || path[0] == '@' || path.size() >= sizeof(sa.sun_path))
		return false;
	std::memcpy(sa.sun_path, path.data(), path.size());
	proto::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd)
		return false;
	auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
	if (::connect(fd.get(), reinterpret_cast<const sockaddr *>(&sa), len) == 0)
		return true;
	// EAGAIN: a full accept queue; EPROTOTYPE: a datagram socket. Both are alive.
	return errno != ECONNREFUSED && errno != ENOENT;
}

bool unix_file_present(const std::string &path)
{
	if (path.empty() || path[0] == '@')
		return true; // abstract: no file to lose
	struct stat st{};
	return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

std::string socket_address(int fd)
{
	int type = 0;
	socklen_t len = sizeof(type);
	if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
		return {};
	sockaddr_storage ss{};
	socklen_t sslen = sizeof(ss);
	if (::getsockname(fd, reinterpret_cast<sockaddr *>(&ss), &sslen) < 0)
		return {};
	return format_address(ss, sslen, type);
}


InheritedFds InheritedFds::from_environment()
{
	char **names = nullptr;
	int n = ::sd_listen_fds_with_names(1, &names);
	if (n < 0)
		throw std::runtime_error(std::string("systemd socket activation (LISTEN_FDS): ") + std::strerror(-n));

	InheritedFds inherited;
	for (int i = 0; i < n; i++) {
		const char *name = names && names[i] ? names[i] : "unknown";
		inherited.by_name.emplace(name, proto::UniqueFd(SD_LISTEN_FDS_START + i));
	}
	if (names) {
		for (char **p = names; *p; p++)
			std::free(*p);
		std::free(names);
	}
	return inherited;
}

Listener open_listener(const config::SocketConfig &cfg, InheritedFds &inherited)
{
	switch (cfg.kind) {
	case SocketKind::Tcp:
	case SocketKind::Udp:
		return open_inet(cfg);
	case SocketKind::Unix:
		return open_unix(cfg);
	case SocketKind::Systemd:
		return adopt_systemd(cfg, inherited);
	}
	fail(cfg, "unknown socket kind");
}

void remove_socket_file(const Listener &l)
{
	if (l.unlink_path.empty())
		return;
	// Someone may have put something else there since; only our kind of file goes.
	struct stat st{};
	if (::lstat(l.unlink_path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode))
		::unlink(l.unlink_path.c_str());
}

} // namespace brokerd
