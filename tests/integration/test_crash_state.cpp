// Integration: brokerd keeps its crash state (daemon/crash_state.*, daemon/persist.*) up to date:
// the memfd it holds names the instances Status shows, each by pid and start time, after its start,
// after an upgrade and after a reload, and it is not rewritten while nothing changes.
#include "harness.hpp"

#include "daemon/persist.hpp"
#include "os/peer.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <set>

using namespace itest;

namespace {

json web_config()
{
	return {{"sockets", {{"http", tcp_socket()}}},
	        {"services", {{"web", service({env("EXAMPLE_HTTP")}, {"http"}, 2, "broker")}}}};
}

RunResult brokerctl(const Broker &b, const std::vector<std::string> &args)
{
	std::vector<std::string> argv = {env("BROKERCTL"), "--socket", b.control_path()};
	argv.insert(argv.end(), args.begin(), args.end());
	return run(argv);
}

// brokerd's crash state memfd, opened through /proc (the test runs as root, as CI does).
UniqueFd state_fd(pid_t pid)
{
	for (const auto &[fd, target] : proc_fds(pid))
		if (target.starts_with("/memfd:brokerd-state")) {
			UniqueFd mine(::open(("/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd)).c_str(),
			                     O_RDONLY | O_CLOEXEC));
			REQUIRE(mine);
			return mine;
		}
	FAIL("brokerd holds no crash state memfd");
	return UniqueFd();
}

struct Read {
	json state;
	std::uint64_t seq = 0;
};

Read read_state(pid_t pid)
{
	UniqueFd fd = state_fd(pid);
	auto r = brokerd::persist::read(fd.get());
	if (auto *f = std::get_if<brokerd::Failure>(&r))
		FAIL("the crash state is refused: ", f->why);
	const auto &loaded = std::get<std::optional<brokerd::persist::Loaded>>(r);
	REQUIRE(loaded);
	return {json::parse(loaded->payload), loaded->seq};
}

// The pids of the instances the state has running, by generation.
std::set<pid_t> running_pids(const json &state, std::uint64_t generation)
{
	std::set<pid_t> out;
	for (const json &svc : state.at("services"))
		for (const json &gen : svc.at("generations"))
			if (gen.at("number") == generation)
				for (const json &inst : gen.at("instances"))
					if (inst.at("pid").get<pid_t>() > 0)
						out.insert(inst.at("pid").get<pid_t>());
	return out;
}

// Every running instance of the state names its process by pid and start time, as /proc has them.
void check_identities(const json &state)
{
	for (const json &svc : state.at("services"))
		for (const json &gen : svc.at("generations"))
			for (const json &inst : gen.at("instances")) {
				auto pid = inst.at("pid").get<pid_t>();
				if (pid <= 0)
					continue;
				auto id = brokerd::peer::identity(pid);
				REQUIRE(id);
				CHECK(inst.at("pid_start").get<std::uint64_t>() == id->start_ticks);
			}
}

std::set<pid_t> as_set(const std::vector<pid_t> &v)
{
	return {v.begin(), v.end()};
}

} // namespace

TEST_CASE("crash state: the memfd brokerd keeps names the instances Status shows, after its start, an upgrade and a reload")
{
	Broker b;
	b.start(web_config());
	BROKER_CONTEXT(b);
	REQUIRE(wait_until([&] { return worker_pids(b.status(), "web").size() == 2; }, 20s));

	std::set<pid_t> first = as_set(worker_pids(b.status(), "web"));
	Read r;
	// Written at the end of a turn of brokerd's loop in which something changed: the turn that
	// answers Status may come first.
	CHECK(wait_until([&] { return running_pids((r = read_state(b.pid())).state, 1) == first; }, 10s));
	CHECK(r.state.at("pid") == b.pid());
	check_identities(r.state);
	CHECK(r.state.at("services").at(0).at("current") == 1);
	const json &http = r.state.at("listeners").at(0);
	CHECK(http.at("name") == "http");
	CHECK(http.at("address") == "tcp://127.0.0.1:" + std::to_string(socket_port(b.status(), "http")));
	CHECK(socket_inodes(b.pid()).count(http.at("inode").get<std::uint64_t>()) == 1);

	RunResult up = brokerctl(b, {"upgrade", "web"});
	REQUIRE_MESSAGE(up.exit_code == 0, up.describe());
	std::set<pid_t> second = as_set(worker_pids(b.status(), "web"));
	REQUIRE(second.size() == 2);
	// Done: the old instances exited, and once they are pruned generation 1 lists none.
	Read after;
	auto gen1_instances = [](const json &state) {
		for (const json &gen : state.at("services").at(0).at("generations"))
			if (gen.at("number") == 1)
				return gen.at("instances").size();
		return std::size_t{0};
	};
	CHECK(wait_until([&] { return gen1_instances((after = read_state(b.pid())).state) == 0; }, 10s));
	CHECK(after.seq > r.seq);
	CHECK(after.state.at("services").at(0).at("current") == 2);
	CHECK(running_pids(after.state, 2) == second);
	check_identities(after.state);

	// Nothing changes: nothing is written. Status is a call, not a change.
	for (int i = 0; i < 5; i++)
		b.status();
	CHECK(read_state(b.pid()).seq == after.seq);

	// A reload changes the config's text the state carries, though no service changes.
	json cfg = web_config();
	cfg["services"]["web"]["drain"] = {{"timeout", "7s"}};
	cfg["control"] = {{"path", b.control_path()}};
	write_file(b.config_path(), cfg.dump(2));
	RunResult reload = brokerctl(b, {"reload"});
	REQUIRE_MESSAGE(reload.exit_code == 0, reload.describe());
	Read reloaded;
	CHECK(wait_until([&] {
		reloaded = read_state(b.pid());
		return reloaded.state.at("config_text").get<std::string>().find("\"7s\"") != std::string::npos;
	}, 10s));
	CHECK(reloaded.seq > after.seq);
	b.stop();
}

TEST_CASE("crash state: a worker's output that is not UTF-8 does not stop the state being written")
{
	Broker b;
	json svc = service({"/bin/sh", "-c", "printf 'bad \\377 byte\\n'; exec sleep 1000"}, {}, 1, "exec");
	b.start({{"services", {{"raw", svc}}}});
	BROKER_CONTEXT(b);
	// The line is in the instance's last lines, and a change after it (the upgrade) is written.
	auto last_lines = [](const json &state) {
		for (const json &gen : state.at("services").at(0).at("generations"))
			for (const json &inst : gen.at("instances"))
				if (!inst.at("last_lines").empty())
					return inst.at("last_lines").at(0).get<std::string>();
		return std::string();
	};
	RunResult up = brokerctl(b, {"upgrade", "raw"});
	REQUIRE_MESSAGE(up.exit_code == 0, up.describe());
	Read r;
	CHECK(wait_until([&] {
		r = read_state(b.pid());
		return r.state.at("services").at(0).at("current") == 2 && last_lines(r.state).starts_with("bad ");
	}, 10s));
	CHECK(last_lines(r.state) == "bad \xEF\xBF\xBD byte"); // U+FFFD for the byte that is not UTF-8
	CHECK(b.log().find("crash state") == std::string::npos);
	b.stop();
}
