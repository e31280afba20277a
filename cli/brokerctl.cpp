// brokerctl: the operator's CLI for brokerd. Parses the command line, runs one subcommand from the
// table in commands.cpp, and turns every failure into a message and a documented exit code.
#include "arguments.hpp"
#include "commands.hpp"
#include "connection.hpp"
#include "errors.hpp"
#include "format.hpp"
#include "remote.hpp"
#include "reply.hpp"

#include "proto/limits.hpp"
#include "proto/names.hpp"
#include "proto/suggest.hpp"
#include "broker_config.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <sys/un.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <iostream>
#include <new>
#include <string_view>
#include <vector>

namespace {

using namespace brokerctl;

void print_error(std::string_view message)
{
	std::cout.flush();
	std::cerr << "brokerctl: " << message << std::endl;
}

std::string check_socket_path(const std::string &path)
{
	if (path.empty())
		return "the control socket path is empty";
	if (path.size() >= sizeof(sockaddr_un::sun_path))
		return "the control socket path is longer than " + std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
		       " bytes";
	return {};
}

std::string check_timeout(const std::string &text)
{
	auto d = parse_duration(text);
	if (!d)
		return "expected a duration like \"30s\", \"500ms\" or \"1m30s\", got \"" + printable(text) + "\"";
	// SyncClient polls with an int of milliseconds.
	if (d->count() <= 0 || d->count() > INT_MAX)
		return "the timeout must be between 1ms and 24d";
	return {};
}

constexpr const char *kServicesCommand = "_services";
constexpr const char *kBridgeCommand = "bridge";

// A completion waits for this at most, and says nothing when brokerd is not there.
constexpr auto kServicesTimeout = std::chrono::seconds(2);

// `brokerctl _services`: the names of brokerd's services, one a line, for the shell's completion.
// It prints nothing and succeeds whatever fails (no brokerd, no permission): a completion that
// prints errors would write them into the operator's command line.
int print_services(const Options &opts)
{
	try {
		// Over ssh, the handshake alone may take longer.
		auto timeout = opts.remote ? opts.timeout : std::min<std::chrono::milliseconds>(opts.timeout, kServicesTimeout);
		Connection broker(opts.socket, timeout, opts.remote);
		nlohmann::json reply = broker.call(proto::names::control::kStatus);
		std::string names;
		for (const nlohmann::json &svc : array(reply, "services")) {
			std::string name = text(svc, "name", "");
			// Config names are plain words; anything else would not be one word for the shell.
			if (!name.empty() && printable(name) == name && name.find(' ') == std::string::npos)
				names += name + '\n';
		}
		std::cout << names << std::flush;
	} catch (...) {
	}
	return kExitOk;
}

std::string check_target(const std::string &text)
{
	if (!parse_target(text))
		return "expected [USER@]HOST[:PORT] (a port from 1 to 65535; an IPv6 address with a port in brackets), got \"" +
		       printable(text) + "\"";
	return {};
}

// Whether --socket is on the command line (and not only in BROKERCTL_SOCKET, which is this
// host's): -H passes only that one on, for the remote brokerctl.
bool socket_option_given(const std::vector<std::string> &words)
{
	for (std::size_t i = 1; i < words.size() && words[i] != "--"; ++i)
		if (words[i] == "--socket" || words[i].starts_with("--socket="))
			return true;
	return false;
}

int run(int argc, char **argv)
{
	CLI::App app("Control brokerd, the socket broker for zero-downtime upgrades.", "brokerctl");
	app.footer(kExitCodesHelp);
	app.set_version_flag("--version", "brokerctl " BROKER_VERSION);
	app.require_subcommand(1);
	app.get_formatter()->label("SUBCOMMAND", "COMMAND");
	app.fallthrough(); // global options also after the subcommand: `brokerctl status --json`
	bool exec_one_word = false; // set by take_exec() below, before the parse
	app.failure_message([&exec_one_word](const CLI::App *a, const CLI::Error &e) {
		std::string message = e.what();
		// The old form, `--exec /usr/bin/app --port 80`, leaves the program's own words to CLI11.
		if (exec_one_word && (dynamic_cast<const CLI::ExtrasError *>(&e) || dynamic_cast<const CLI::ArgumentMismatch *>(&e)))
			message += "\n--exec takes one word; give a command with arguments after --: --exec -- /usr/bin/app --port 80";
		// CLI11 reports `brokerctl bogus` as a missing subcommand with "bogus" left over.
		if (e.get_name() == "RequiredError" && a->get_subcommands().empty()) {
			if (a->remaining_size() > 0) {
				std::string word = a->remaining().front();
				message = "unknown command \"" + printable(word) + "\"";
				std::vector<std::string_view> names;
				for (const Command &c : commands())
					names.push_back(c.name);
				if (auto best = proto::closest(word, names))
					message += " (did you mean \"" + std::string(*best) + "\"?)";
			}
			else
				message = "no command given";
		}
		return "brokerctl: " + message + "\nRun 'brokerctl --help' for usage.\n";
	});

	Options opts;
	opts.socket = BROKER_DEFAULT_CONTROL;
	std::string timeout_text = format_duration(proto::limits::kDefaultCallTimeout);

	app.add_option("--socket", opts.socket, "brokerd's control socket (\"@name\" for an abstract one)")
		->envname("BROKERCTL_SOCKET")
		->capture_default_str()
		->type_name("PATH")
		->check(CLI::Validator(check_socket_path, ""));
	app.add_flag("--json", opts.json, "Print brokerd's reply as JSON, for scripts");
	auto *timeout = app.add_option("--timeout", timeout_text,
	                               "How long to wait for brokerd's reply (rollouts and watch wait as long as "
	                               "brokerd works; start, stop, scale and abort too unless this is given)")
		->capture_default_str()
		->type_name("DURATION")
		->check(CLI::Validator(check_timeout, ""));
	std::string host;
	app.add_option("-H,--host", host, "Run the command on HOST's brokerd, over ssh (see BROKERCTL_SSH)")
		->type_name("[USER@]HOST[:PORT]")
		->check(CLI::Validator(check_target, ""));

	// A command's help shows the options every command takes (CLI11 lists only the command's
	// own) and leaves the exit statuses to `brokerctl --help`.
	const std::string global_help = "Global options (before or after the command):\n"
	                                "  --socket PATH       brokerd's control socket (default " BROKER_DEFAULT_CONTROL
	                                "; BROKERCTL_SOCKET)\n"
	                                "  --json              Print brokerd's reply as JSON, for scripts\n"
	                                "  --timeout DURATION  How long to wait for brokerd's reply (default " +
	                                timeout_text +
	                                ")\n"
	                                "  -H [USER@]HOST[:PORT]\n"
	                                "                      Run the command on HOST's brokerd, over ssh\n"
	                                "\n"
	                                "Exit statuses: see 'brokerctl --help'.";
	Arguments args;
	for (const Command &c : commands()) {
		CLI::App *sub = app.add_subcommand(c.name, c.summary)->group("Commands");
		sub->footer(global_help);
		c.declare(*sub, args);
	}
	CLI::App *bridge = app.add_subcommand(kBridgeCommand, "Relay standard input and output to brokerd's control "
	                                                      "socket: what `brokerctl -H` runs over ssh")
	                       ->group("Commands");
	bridge->footer(global_help);
	// For the shell's completion (packaging/brokerctl.bash-completion); not in --help.
	app.add_subcommand(kServicesCommand, "Print the services' names, one a line")->group("");

	// `upgrade --exec -- CMD ARG...` takes the rest of the command line, which CLI11 would read as
	// options; `--exec CMD` one word.
	std::vector<std::string> words(argv, argv + argc);
	args.exec = take_exec(words, &exec_one_word);
	std::vector<const char *> rest;
	for (const std::string &w : words)
		rest.push_back(w.c_str());

	try {
		app.parse(static_cast<int>(rest.size()), rest.data());
	} catch (const CLI::ParseError &e) {
		// --help and --version are "errors" with code 0; every real one is a usage error.
		int code = app.exit(e);
		return code == 0 ? kExitOk : kExitUsage;
	}
	opts.timeout = *parse_duration(timeout_text);
	opts.timeout_given = timeout->count() > 0;
	if (!host.empty()) {
		if (app.got_subcommand(bridge))
			throw Failure(kExitUsage, "bridge is what -H runs on the other host; it takes no -H");
		opts.remote = parse_target(host);
		if (socket_option_given(words))
			opts.remote->socket = opts.socket;
	}
	if (args.exec && !app.got_subcommand("upgrade"))
		throw Failure(kExitUsage, "--exec is an option of upgrade");
	if (args.exec && args.exec->empty())
		throw Failure(kExitUsage, "--exec needs a command: --exec /usr/bin/app, or --exec -- /usr/bin/app --port 80");

	if (app.got_subcommand(kServicesCommand))
		return print_services(opts);
	if (app.got_subcommand(bridge))
		return run_bridge(opts.socket, opts.timeout);

	for (const Command &c : commands()) {
		if (!app.got_subcommand(c.name))
			continue;
		Connection broker(opts.socket, opts.timeout, opts.remote);
		int code = c.run(opts, args, broker, std::cout);
		if (!std::cout.flush())
			throw Failure(kExitFailure, "cannot write to standard output");
		return code;
	}
	throw Failure(kExitUsage, "no command given"); // require_subcommand(1) makes this unreachable
}

// nlohmann's messages start with "[json.exception.type_error.302] "; the operator needs the rest.
std::string json_message(const nlohmann::json::exception &e)
{
	std::string_view what = e.what();
	if (auto end = what.find("] "); what.starts_with('[') && end != std::string_view::npos)
		what.remove_prefix(end + 2);
	return std::string(what);
}

} // namespace

int main(int argc, char **argv)
{
	// Every exception ends here as a sentence and an exit code, never as a type name.
	try {
		return run(argc, argv);
	} catch (const Failure &f) {
		if (*f.what()) // empty: said already, by the remote brokerctl (remote.hpp)
			print_error(f.what());
		return f.code();
	} catch (const nlohmann::json::exception &e) {
		print_error("unexpected reply from brokerd: " + json_message(e));
	} catch (const std::bad_alloc &) {
		print_error("out of memory");
	} catch (const std::exception &e) {
		print_error(e.what());
	} catch (...) {
		print_error("internal error");
	}
	return kExitFailure;
}
