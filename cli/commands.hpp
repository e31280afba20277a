// brokerctl's subcommands as a table: a name, a summary, how it reads its arguments, what it runs.
// A new command is one entry plus its run function in commands.cpp.
#pragma once

#include <chrono>
#include <iosfwd>
#include <optional>
#include <span>
#include <string>

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
};

// Every subcommand's own arguments; each command binds and reads only the ones it declares.
struct Arguments {
	std::optional<std::string> service;
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
