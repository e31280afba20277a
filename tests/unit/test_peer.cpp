// Peer identity without SO_PEERPIDFD: a pid is trusted by its start time; ancestry by PPid.
#include "os/peer.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <string>

namespace peer = brokerd::peer;
using brokerd::Failure;

namespace {

std::uint64_t boottime_usec()
{
	timespec ts{};
	::clock_gettime(CLOCK_BOOTTIME, &ts);
	return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u + static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

// A child that exits once `release` (the write end of a pipe it reads) is closed.
pid_t fork_waiting(int &release)
{
	int fds[2];
	REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
	pid_t child = ::fork();
	REQUIRE(child >= 0);
	if (child == 0) {
		::close(fds[1]);
		char c;
		(void)!::read(fds[0], &c, 1);
		::_exit(0);
	}
	::close(fds[0]);
	release = fds[1];
	return child;
}

} // namespace

TEST_CASE("without SO_PEERPIDFD, a pid stands for the process that connected only if it started before and still runs")
{
	const std::uint64_t before_fork = boottime_usec() - 1000000; // a connection well before it started
	int release = -1;
	pid_t child = fork_waiting(release);
	const std::uint64_t after_fork = boottime_usec();

	struct Case {
		const char *name;
		std::uint64_t connected;
		bool trusted;
	};
	for (const Case &c : {Case{"connected after it started", after_fork, true},
	                      Case{"connected before it started: its pid was reused", before_fork, false}}) {
		auto fd = peer::process_by_pid(child, c.connected);
		const auto *failure = std::get_if<Failure>(&fd);
		INFO(c.name, ": ", failure ? failure->why : std::string());
		CHECK(std::holds_alternative<proto::UniqueFd>(fd) == c.trusted);
		if (!c.trusted)
			CHECK(failure->why.find("the pid names a process started since") != std::string::npos);
	}
	CHECK(peer::descends_from(child, {::getpid()}));
	CHECK(peer::descends_from(child, {child}));
	CHECK_FALSE(peer::descends_from(::getpid(), {child}));
	CHECK(peer::process_uid(child) == ::getuid());

	// Exited (a zombie), then reaped: neither stands for anyone.
	auto process = peer::process_by_pid(child, after_fork);
	REQUIRE(std::holds_alternative<proto::UniqueFd>(process));
	const proto::UniqueFd &held = std::get<proto::UniqueFd>(process);
	::close(release);
	siginfo_t si{};
	REQUIRE(::waitid(P_PID, static_cast<id_t>(child), &si, WEXITED | WNOWAIT) == 0);
	CHECK_FALSE(peer::alive(held.get()));
	auto why = [&] {
		auto r = peer::process_by_pid(child, after_fork);
		return std::holds_alternative<Failure>(r) ? std::get<Failure>(r).why : std::string("a pidfd");
	};
	CHECK(why().find("has exited") != std::string::npos);
	REQUIRE(::waitpid(child, nullptr, 0) == child);
	CHECK(why().find("has exited") != std::string::npos);
}

TEST_CASE("a saved process identity reopens the same process only: never one that got its pid since, nor one that exited")
{
	int release = -1;
	pid_t child = fork_waiting(release);
	auto id = peer::identity(child);
	REQUIRE(id);
	CHECK(id->pid == child);
	CHECK(id->start_ticks > 0);
	CHECK(peer::identity(child) == id); // stable while it runs

	auto reopened = peer::reopen(*id);
	REQUIRE(std::holds_alternative<proto::UniqueFd>(reopened));
	CHECK(peer::alive(std::get<proto::UniqueFd>(reopened).get()));

	// The same pid with another start time: what a saved state meets when the pid was reused.
	auto other = *id;
	other.start_ticks += 1;
	auto refused = peer::reopen(other);
	REQUIRE(std::holds_alternative<Failure>(refused));
	CHECK(std::get<Failure>(refused).why.find("names another process by now") != std::string::npos);

	::close(release);
	REQUIRE(::waitpid(child, nullptr, 0) == child);
	auto gone = peer::reopen(*id);
	REQUIRE(std::holds_alternative<Failure>(gone));
	CHECK(std::get<Failure>(gone).why.find("has exited") != std::string::npos);
	CHECK_FALSE(peer::identity(child));
	CHECK(std::holds_alternative<Failure>(peer::reopen({0, 1})));
}
