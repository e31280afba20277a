// The tests' service manager keeps an fd store as systemd does: what it keeps, drops and closes.
#include "support.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

using namespace utest;

namespace {

// One notify datagram from the test process, with `fds` (borrowed) as SCM_RIGHTS.
void notify(const ServiceManager &m, const std::string &text, const std::vector<int> &fds = {})
{
	UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	REQUIRE(s);
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::string name = m.address().substr(1);
	std::memcpy(sa.sun_path + 1, name.data(), name.size());
	iovec iov{const_cast<char *>(text.data()), text.size()};
	msghdr msg{};
	msg.msg_name = &sa;
	msg.msg_namelen = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
	if (!fds.empty()) {
		msg.msg_control = control.data();
		msg.msg_controllen = control.size();
		cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
		std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
	}
	REQUIRE(::sendmsg(s.get(), &msg, 0) == static_cast<ssize_t>(text.size()));
}

// A pipe: what is stored is its read end; the test keeps the write end, which reports POLLERR
// once no read end is open anywhere, so it tells whether the manager closed its copy.
struct Pipe {
	UniqueFd r, w;
	Pipe()
	{
		int p[2];
		REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
		r.reset(p[0]);
		w.reset(p[1]);
	}
	// Whether every read end is closed: ours must be closed first.
	bool readers_gone() const
	{
		pollfd p{w.get(), POLLOUT, 0};
		return ::poll(&p, 1, 0) == 1 && (p.revents & POLLERR);
	}
};

} // namespace

TEST_CASE("service manager: its fd store keeps what systemd keeps and closes what systemd closes")
{
	ServiceManager m(4);
	Pipe a1, a2, hup, nopoll, extra, refused;

	// Two fds under one name, one under the default name; the same open file again is a
	// duplicate, whatever its name; one not polled; the store is full after four.
	notify(m, "FDSTORE=1\nFDNAME=a", {a1.r.get(), a2.r.get()});
	notify(m, "FDSTORE=1", {hup.r.get()});
	notify(m, "FDSTORE=1\nFDNAME=b", {a1.r.get()});
	notify(m, "FDSTORE=1\nFDNAME=quiet\nFDPOLL=0", {nopoll.r.get()});
	notify(m, "FDSTORE=1\nFDNAME=more", {extra.r.get()});
	m.sync();
	CHECK(joined(m.names()) == "a, a, stored, quiet");
	extra.r.reset();
	CHECK_MESSAGE(extra.readers_gone(), "an fd beyond the store's maximum was kept open");

	// A polled pipe whose writers are gone reports POLLHUP and is dropped; an unpolled one stays.
	hup.w.reset();
	nopoll.w.reset();
	m.sync();
	CHECK(joined(m.names()) == "a, a, quiet");
	// FDSTOREREMOVE=1 drops every fd of the name, and closes them.
	notify(m, "FDSTOREREMOVE=1\nFDNAME=a");
	m.sync();
	CHECK(joined(m.names()) == "quiet");
	a1.r.reset();
	a2.r.reset();
	CHECK(a1.readers_gone());
	CHECK(a2.readers_gone());
	CHECK(joined(m.store_events()) ==
	      "stored a, stored a, stored stored, duplicate b, stored quiet, full more, hangup stored, removed a");

	// Refused, and closed: fds without FDSTORE=1, an FDNAME with ':', FDSTOREREMOVE=1 without a name.
	notify(m, "STATUS=fds for nothing", {refused.r.get()});
	notify(m, "FDSTORE=1\nFDNAME=a:b", {refused.r.get()});
	notify(m, "FDSTOREREMOVE=1");
	m.sync();
	refused.r.reset();
	CHECK(refused.readers_gone());
	auto n = m.notified();
	CHECK(n.errors.size() == 3);
	CHECK(joined(m.names()) == "quiet");

	// What the service says is counted; a clear() empties the store (a stop job).
	notify(m, "READY=1\nSTATUS=serving\nMAINPID=42");
	notify(m, "RELOADING=1\nMONOTONIC_USEC=1");
	notify(m, "READY=1");
	notify(m, "STOPPING=1");
	m.sync();
	n = m.notified();
	CHECK(n.ready == 2);
	CHECK(n.status == 2);
	CHECK(n.last_status == "serving");
	CHECK(n.mainpid == 1);
	CHECK(n.last_mainpid == 42);
	CHECK(n.reloading == 1);
	CHECK(n.stopping == 1);
	CHECK(n.foreign == 0);
	CHECK(m.wait_ready(0ms, 1));
	CHECK_FALSE(m.wait_ready(0ms, 2));
	m.clear();
	CHECK(m.names().empty());

	// Once a main process is known, what any other pid sends is ignored (NotifyAccess=main).
	Process main = Process::spawn({"sleep", "60"});
	m.start_main([&] { return main.pid(); });
	Pipe late; // after the fork: a child holds a copy of every fd until it execs
	notify(m, "READY=1\nFDSTORE=1\nFDNAME=late", {late.r.get()});
	m.sync();
	CHECK(m.notified().foreign == 1);
	CHECK(m.notified().ready == 2);
	CHECK(m.names().empty());
	late.r.reset();
	CHECK(late.readers_gone());
}
