// Unit tests of broker/listener: binding, canonical addresses, unix socket files, systemd adoption.
#include "os/listener.hpp"
#include "../skip.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

using brokerd::InheritedFds;
using brokerd::Listener;
using proto::UniqueFd;
using brokerd::config::SocketConfig;
using brokerd::config::SocketKind;

namespace {

namespace fs = std::filesystem;

constexpr int kTimeoutMs = 5000;

SocketConfig inet(SocketKind kind, const std::string &name, const std::string &host, std::uint16_t port = 0)
{
	SocketConfig c;
	c.name = name;
	c.kind = kind;
	c.host = host;
	c.port = port;
	return c;
}

SocketConfig tcp(const std::string &name, const std::string &host, std::uint16_t port = 0)
{
	return inet(SocketKind::Tcp, name, host, port);
}

SocketConfig unix_socket(const std::string &name, const std::string &path)
{
	SocketConfig c;
	c.name = name;
	c.kind = SocketKind::Unix;
	c.path = path;
	return c;
}

SocketConfig systemd(const std::string &name, const std::string &systemd_name)
{
	SocketConfig c;
	c.name = name;
	c.kind = SocketKind::Systemd;
	c.systemd_name = systemd_name;
	return c;
}

Listener open(const SocketConfig &cfg)
{
	InheritedFds none;
	return brokerd::open_listener(cfg, none);
}

std::string open_error(const SocketConfig &cfg, InheritedFds &inherited)
{
	try {
		brokerd::open_listener(cfg, inherited);
	} catch (const std::runtime_error &e) {
		return e.what();
	}
	return "(no error)";
}

std::string open_error(const SocketConfig &cfg)
{
	InheritedFds none;
	return open_error(cfg, none);
}

std::uint16_t port_of(int fd)
{
	sockaddr_storage ss{};
	socklen_t len = sizeof(ss);
	REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr *>(&ss), &len) == 0);
	if (ss.ss_family == AF_INET6)
		return ntohs(reinterpret_cast<sockaddr_in6 *>(&ss)->sin6_port);
	return ntohs(reinterpret_cast<sockaddr_in *>(&ss)->sin_port);
}

bool wait_readable(int fd)
{
	pollfd p{fd, POLLIN, 0};
	return ::poll(&p, 1, kTimeoutMs) == 1;
}

UniqueFd connect_inet(int family, int type, const char *host, std::uint16_t port)
{
	UniqueFd fd(::socket(family, type | SOCK_CLOEXEC, 0));
	REQUIRE(fd);
	sockaddr_storage ss{};
	socklen_t len;
	if (family == AF_INET6) {
		auto *in6 = reinterpret_cast<sockaddr_in6 *>(&ss);
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(port);
		REQUIRE(::inet_pton(AF_INET6, host, &in6->sin6_addr) == 1);
		len = sizeof(*in6);
	} else {
		auto *in = reinterpret_cast<sockaddr_in *>(&ss);
		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		REQUIRE(::inet_pton(AF_INET, host, &in->sin_addr) == 1);
		len = sizeof(*in);
	}
	REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&ss), len) == 0);
	return fd;
}

// Connects to a unix socket: a path, or "@name" for the abstract namespace.
int connect_unix(const std::string &path)
{
	UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	REQUIRE(fd);
	sockaddr_un un{};
	un.sun_family = AF_UNIX;
	std::memcpy(un.sun_path, path.data(), path.size());
	if (path[0] == '@')
		un.sun_path[0] = '\0';
	socklen_t len = offsetof(sockaddr_un, sun_path) + path.size() + (path[0] == '@' ? 0 : 1);
	return ::connect(fd.get(), reinterpret_cast<sockaddr *>(&un), len) == 0 ? 0 : errno;
}

// A listener accepts what a client connects, within the deadline.
void check_accepts(const Listener &l)
{
	REQUIRE(wait_readable(l.fd.get()));
	UniqueFd conn(::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
	CHECK(conn);
}

bool have_ipv6_loopback()
{
	UniqueFd fd(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
	if (!fd)
		return false;
	sockaddr_in6 in6{};
	in6.sin6_family = AF_INET6;
	in6.sin6_addr = in6addr_loopback;
	return ::bind(fd.get(), reinterpret_cast<sockaddr *>(&in6), sizeof(in6)) == 0;
}

// A private directory for socket files, removed with everything in it.
struct TempDir {
	fs::path path;
	TempDir()
	{
		std::string tmpl = (fs::temp_directory_path() / "brokerd-listener-XXXXXX").string();
		REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
		path = tmpl;
	}
	~TempDir() { fs::remove_all(path); }
	std::string operator/(const std::string &name) const { return (path / name).string(); }
};

mode_t file_mode(const std::string &path)
{
	struct stat st{};
	REQUIRE(::lstat(path.c_str(), &st) == 0);
	return st.st_mode;
}

// Leaves a socket file at `path` with nobody listening, as a crashed previous run would.
void make_stale_socket(const std::string &path)
{
	UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
	REQUIRE(fd);
	sockaddr_un un{};
	un.sun_family = AF_UNIX;
	std::memcpy(un.sun_path, path.c_str(), path.size() + 1);
	REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&un), sizeof(un)) == 0);
	REQUIRE(S_ISSOCK(file_mode(path)));
}

std::string read_file(const std::string &path)
{
	std::ifstream in(path);
	return std::string(std::istreambuf_iterator<char>(in), {});
}

} // namespace

TEST_CASE("tcp on port 0 shows the real port and accepts connections")
{
	Listener l = open(tcp("http", "127.0.0.1"));
	std::uint16_t port = port_of(l.fd.get());
	REQUIRE(port != 0);
	CHECK(l.name == "http");
	CHECK(l.address == "tcp://127.0.0.1:" + std::to_string(port));
	CHECK(l.kind == "tcp");
	CHECK(l.origin == "bound");
	CHECK(l.unlink_path.empty());

	UniqueFd client = connect_inet(AF_INET, SOCK_STREAM, "127.0.0.1", port);
	check_accepts(l);
}

TEST_CASE("udp binds and receives datagrams")
{
	Listener l = open(inet(SocketKind::Udp, "dns", "127.0.0.1"));
	std::uint16_t port = port_of(l.fd.get());
	CHECK(l.address == "udp://127.0.0.1:" + std::to_string(port));
	CHECK(l.kind == "udp");

	int type = 0;
	socklen_t len = sizeof(type);
	REQUIRE(::getsockopt(l.fd.get(), SOL_SOCKET, SO_TYPE, &type, &len) == 0);
	CHECK(type == SOCK_DGRAM);

	UniqueFd client = connect_inet(AF_INET, SOCK_DGRAM, "127.0.0.1", port);
	REQUIRE(::send(client.get(), "ping", 4, 0) == 4);
	REQUIRE(wait_readable(l.fd.get()));
	char buf[8];
	CHECK(::recv(l.fd.get(), buf, sizeof(buf), 0) == 4);
}

TEST_CASE("IPv6 addresses are bracketed and IPV6_V6ONLY follows the config")
{
	if (!have_ipv6_loopback())
		TEST_SKIP("no IPv6 loopback (::1) on this machine");
	Listener l = open(tcp("v6", "::1"));
	std::uint16_t port = port_of(l.fd.get());
	CHECK(l.address == "tcp://[::1]:" + std::to_string(port));
	UniqueFd client = connect_inet(AF_INET6, SOCK_STREAM, "::1", port);
	check_accepts(l);

	Listener u = open(inet(SocketKind::Udp, "v6dns", "::1"));
	CHECK(u.address == "udp://[::1]:" + std::to_string(port_of(u.fd.get())));

	for (bool only : {true, false}) {
		CAPTURE(only);
		SocketConfig c = tcp("any6", "::");
		c.ipv6_only = only;
		Listener a = open(c);
		int v = -1;
		socklen_t len = sizeof(v);
		REQUIRE(::getsockopt(a.fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &v, &len) == 0);
		CHECK(v == (only ? 1 : 0));
		CHECK(a.address == "tcp://[::]:" + std::to_string(port_of(a.fd.get())));
	}
}

TEST_CASE("reuseport lets two listeners bind the same port")
{
	SocketConfig c = tcp("a", "127.0.0.1");
	c.reuseport = true;
	Listener first = open(c);
	c.name = "b";
	c.port = port_of(first.fd.get());
	Listener second = open(c);
	CHECK(second.address == first.address);

	int v = 0;
	socklen_t len = sizeof(v);
	REQUIRE(::getsockopt(second.fd.get(), SOL_SOCKET, SO_REUSEPORT, &v, &len) == 0);
	CHECK(v == 1);
}

TEST_CASE("a port in use is an error that names the socket and the address")
{
	Listener first = open(tcp("first", "127.0.0.1"));
	std::uint16_t port = port_of(first.fd.get());
	CHECK(open_error(tcp("http", "127.0.0.1", port)) ==
	      "socket http: bind tcp://127.0.0.1:" + std::to_string(port) + ": Address already in use");
}

TEST_CASE("invalid inet addresses are refused")
{
	std::string e = open_error(tcp("http", "not-an-address", 80));
	CHECK(e.rfind("socket http: invalid address tcp://not-an-address:80: ", 0) == 0);
}

TEST_CASE("unix socket on a path")
{
	TempDir dir;
	std::string path = dir / "api.sock";

	SUBCASE("fresh path, mode applied, file removed at the end")
	{
		SocketConfig c = unix_socket("api", path);
		c.mode = 0640;
		Listener l = open(c);
		CHECK(l.address == "unix:" + path);
		CHECK(l.kind == "unix");
		CHECK(l.origin == "bound");
		CHECK(l.unlink_path == path);
		CHECK(S_ISSOCK(file_mode(path)));
		CHECK((file_mode(path) & 07777) == 0640);
		CHECK(connect_unix(path) == 0);
		check_accepts(l);

		brokerd::remove_socket_file(l);
		CHECK(!fs::exists(path));
		brokerd::remove_socket_file(l); // already gone: nothing to do
	}
	SUBCASE("a stale socket file is replaced")
	{
		make_stale_socket(path);
		CHECK(connect_unix(path) == ECONNREFUSED);
		Listener l = open(unix_socket("api", path));
		CHECK(connect_unix(path) == 0);
		check_accepts(l);
	}
	SUBCASE("a regular file is refused and left intact")
	{
		std::ofstream(path) << "precious";
		std::string e = open_error(unix_socket("api", path));
		CHECK(e == "socket api: unix:" + path + ": the path exists and is not a socket, refusing to replace it");
		CHECK(S_ISREG(file_mode(path)));
		CHECK(read_file(path) == "precious");
	}
	SUBCASE("remove_socket_file leaves what replaced the socket")
	{
		Listener l = open(unix_socket("api", path));
		REQUIRE(::unlink(path.c_str()) == 0);
		std::ofstream(path) << "someone else's";
		brokerd::remove_socket_file(l);
		CHECK(read_file(path) == "someone else's");
	}
	SUBCASE("without a mode the umask decides")
	{
		mode_t old = ::umask(0077);
		Listener l = open(unix_socket("api", path));
		::umask(old);
		CHECK((file_mode(path) & 0777) == 0700);
	}
	SUBCASE("a missing directory is an error naming the path")
	{
		std::string missing = dir / "no/such/dir.sock";
		CHECK(open_error(unix_socket("api", missing)) ==
		      "socket api: bind unix:" + missing + ": No such file or directory");
	}
}

TEST_CASE("abstract unix socket")
{
	std::string name = "@brokerd-test-listener-" + std::to_string(::getpid());
	Listener l = open(unix_socket("abs", name));
	CHECK(l.address == "unix:" + name);
	CHECK(l.kind == "unix");
	CHECK(l.unlink_path.empty());
	CHECK(connect_unix(name) == 0);
	check_accepts(l);
}

TEST_CASE("listener fds are CLOEXEC and blocking")
{
	TempDir dir;
	struct Case {
		const char *what;
		SocketConfig cfg;
	};
	const Case cases[] = {
		{"tcp", tcp("t", "127.0.0.1")},
		{"udp", inet(SocketKind::Udp, "u", "127.0.0.1")},
		{"unix", unix_socket("x", dir / "x.sock")},
		{"abstract", unix_socket("a", "@brokerd-test-flags-" + std::to_string(::getpid()))},
	};
	for (const Case &c : cases) {
		CAPTURE(c.what);
		Listener l = open(c.cfg);
		CHECK((::fcntl(l.fd.get(), F_GETFD) & FD_CLOEXEC) != 0);
		CHECK((::fcntl(l.fd.get(), F_GETFL) & O_NONBLOCK) == 0);
	}
}

TEST_CASE("systemd kind without the named fd")
{
	InheritedFds none;
	CHECK(open_error(systemd("web", "web"), none) == "socket web: systemd passed no socket named \"web\"");
}

TEST_CASE("from_environment without LISTEN_FDS is empty")
{
	::unsetenv("LISTEN_FDS");
	::unsetenv("LISTEN_PID");
	::unsetenv("LISTEN_FDNAMES");
	CHECK(InheritedFds::from_environment().by_name.empty());
}

// The systemd cases run in a forked child, where fds 3.. can be filled as systemd would. The child
// reports the first failed expectation through a pipe; an empty report is success.
namespace {

#define EXPECT(cond)                                                                        \
	do {                                                                                \
		if (!(cond))                                                                \
			return std::string(#cond " (line ") + std::to_string(__LINE__) + ")"; \
	} while (0)

std::string in_child(const std::function<std::string()> &body)
{
	int p[2];
	REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
	pid_t pid = ::fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		// Out of the way of fds 3.., which the child fills with its "inherited" sockets.
		int w = ::fcntl(p[1], F_DUPFD_CLOEXEC, 100);
		::close(p[0]);
		::close(p[1]);
		std::string err;
		try {
			err = body();
		} catch (const std::exception &e) {
			err = std::string("exception: ") + e.what();
		}
		if (w < 0)
			::_exit(2);
		ssize_t n = ::write(w, err.data(), err.size());
		::_exit(n == static_cast<ssize_t>(err.size()) && err.empty() ? 0 : 1);
	}
	::close(p[1]);
	UniqueFd r(p[0]);
	std::string report;
	auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
	for (;;) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
		pollfd pf{r.get(), POLLIN, 0};
		if (left.count() <= 0 || ::poll(&pf, 1, static_cast<int>(left.count())) != 1) {
			::kill(pid, SIGKILL);
			report += "(child timed out)";
			break;
		}
		char buf[512];
		ssize_t n = ::read(r.get(), buf, sizeof(buf));
		if (n <= 0)
			break;
		report.append(buf, static_cast<std::size_t>(n));
	}
	int status = 0;
	REQUIRE(::waitpid(pid, &status, 0) == pid);
	if (report.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
		report = "child ended with status " + std::to_string(status);
	return report;
}

// Moves `fds` to 3, 4, ... as systemd passes them: not CLOEXEC, until sd_listen_fds sets it.
void place_inherited(std::vector<int> fds)
{
	for (int &fd : fds) {
		int high = ::fcntl(fd, F_DUPFD_CLOEXEC, 200);
		::close(fd);
		fd = high;
	}
	for (std::size_t i = 0; i < fds.size(); i++) {
		::dup2(fds[i], SD_LISTEN_FDS_START + static_cast<int>(i));
		::close(fds[i]);
	}
}

int bound_inet(int type, bool listening)
{
	int fd = ::socket(AF_INET, type | SOCK_CLOEXEC, 0);
	sockaddr_in in{};
	in.sin_family = AF_INET;
	in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (::bind(fd, reinterpret_cast<sockaddr *>(&in), sizeof(in)) < 0)
		return -1;
	if (listening && ::listen(fd, 16) < 0)
		return -1;
	return fd;
}

bool cloexec(int fd)
{
	return (::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
}

} // namespace

TEST_CASE("systemd sockets are adopted by name, with their type checked")
{
	std::string report = in_child([]() -> std::string {
		int web = bound_inet(SOCK_STREAM, true);
		int dns = bound_inet(SOCK_DGRAM, false);
		int conn = bound_inet(SOCK_STREAM, false);
		EXPECT(web >= 0 && dns >= 0 && conn >= 0);
		place_inherited({web, dns, conn});
		EXPECT(!cloexec(3));
		::setenv("LISTEN_FDS", "3", 1);
		::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
		::setenv("LISTEN_FDNAMES", "web:dns:conn", 1);

		InheritedFds inherited = InheritedFds::from_environment();
		EXPECT(!::getenv("LISTEN_FDS") && !::getenv("LISTEN_PID") && !::getenv("LISTEN_FDNAMES"));
		EXPECT(inherited.by_name.size() == 3);
		EXPECT(inherited.by_name.count("web") == 1);
		EXPECT(inherited.by_name.find("web")->second.get() == 3);
		EXPECT(cloexec(3) && cloexec(4) && cloexec(5));

		Listener l = brokerd::open_listener(systemd("http", "web"), inherited);
		EXPECT(l.fd.get() == 3);
		EXPECT(l.name == "http");
		EXPECT(l.origin == "systemd");
		EXPECT(l.kind == "tcp");
		EXPECT(l.address == "tcp://127.0.0.1:" + std::to_string(port_of(3)));
		EXPECT(l.unlink_path.empty());
		EXPECT(inherited.by_name.count("web") == 0);

		// The config names a socket, not its type: a datagram socket is adopted as well.
		Listener d = brokerd::open_listener(systemd("dns", "dns"), inherited);
		EXPECT(d.fd.get() == 4);
		EXPECT(d.kind == "udp");
		EXPECT(d.address == "udp://127.0.0.1:" + std::to_string(port_of(4)));

		std::string e = open_error(systemd("api", "conn"), inherited);
		EXPECT(e == "socket api: systemd socket \"conn\" (fd 5) is a stream socket that is not listening");
		EXPECT(::fcntl(5, F_GETFD) < 0); // refused means closed, not leaked

		e = open_error(systemd("web2", "web"), inherited);
		EXPECT(e == "socket web2: systemd passed no socket named \"web\"");
		EXPECT(inherited.by_name.empty());
		return {};
	});
	CHECK(report == "");
}

TEST_CASE("systemd sockets without LISTEN_FDNAMES are named \"unknown\"")
{
	std::string report = in_child([]() -> std::string {
		int fd = bound_inet(SOCK_STREAM, true);
		EXPECT(fd >= 0);
		place_inherited({fd});
		::setenv("LISTEN_FDS", "1", 1);
		::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
		::unsetenv("LISTEN_FDNAMES");

		InheritedFds inherited = InheritedFds::from_environment();
		EXPECT(inherited.by_name.size() == 1);
		EXPECT(inherited.by_name.count("unknown") == 1);
		Listener l = brokerd::open_listener(systemd("http", "unknown"), inherited);
		EXPECT(l.fd.get() == 3);
		return {};
	});
	CHECK(report == "");
}

TEST_CASE("a systemd fd that is not a socket is refused")
{
	std::string report = in_child([]() -> std::string {
		int p[2];
		EXPECT(::pipe2(p, O_CLOEXEC) == 0);
		::close(p[1]);
		place_inherited({p[0]});
		::setenv("LISTEN_FDS", "1", 1);
		::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
		::setenv("LISTEN_FDNAMES", "web", 1);

		InheritedFds inherited = InheritedFds::from_environment();
		std::string e = open_error(systemd("http", "web"), inherited);
		EXPECT(e == "socket http: systemd socket \"web\" (fd 3) is not a socket");
		return {};
	});
	CHECK(report == "");
}
