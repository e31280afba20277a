// brokerctl's subcommands as a table: a name, a summary, how it reads its arguments, what it runs.
// A new command is one entry plus its run function in commands.cpp.
#pragma once

#include "remote.hpp"

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace brokerctl {

class Connection;

// Options before (or, with fallthrough, after) the subcommand.
struct Options {
	std::string socket;
	bool json = false;
	std::chrono::milliseconds timeout{};
	// --timeout was given: start, stop and abort then honour it too instead of waiting for the
	// broker's own start and drain timeouts.
	bool timeout_given = false;
	// -H: brokerd on another host, through ssh (remote.hpp).
	std::optional<RemoteTarget> remote;
};

// Every subcommand's own arguments; each command binds and reads only the ones it declares.
struct Arguments {
	std::optional<std::string> service;

	// upgrade. `exec` is filled by take_exec() before CLI11 parses, since it takes the rest of argv.
	std::optional<std::vector<std::string>> exec;
	std::vector<std::string> env;
	std::optional<std::string> version;
	std::optional<int> batch;
	bool all_at_once = false;
	std::optional<std::string> start_timeout;
	std::optional<std::string> drain_timeout;

	// upgrade, rollback, restart, scale
	bool no_wait = false;

	// rollback --to: a generation the service's history still knows
	std::optional<std::uint64_t> to;

	// reexec
	std::optional<std::string> binary;

	// is-active
	std::vector<std::string> services;
	bool quiet = false;

	// scale, signal
	std::optional<int> instances;
	std::optional<std::string> signal;
};

struct Command {
	const char *name;
	const char *summary;
	void (*declare)(CLI::App &sub, Arguments &args);
	// Returns the exit code; failures throw brokerctl::Failure.
	int (*run)(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out);
};

std::span<const Command> commands();

} // namespace brokerctl
