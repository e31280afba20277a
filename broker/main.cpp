// brokerd: owns the listening sockets and the workers of every service, and serves the control socket.
// main() parses argv and hands over to the daemon (daemon/daemon.hpp).
#include "broker_config.h"
#include "config/config.hpp"
#include "control/access.hpp"
#include "daemon/daemon.hpp"
#include "daemon/fd_holder.hpp"
#include "daemon/sentinel.hpp"
#include "daemon/state.hpp"
#include "os/log.hpp"

#include <CLI/CLI.hpp>

#include <signal.h>

#include <iostream>
#include <optional>

int main(int argc, char **argv)
{
	CLI::App app{"brokerd: owns listening sockets and hands them to each new version of a service, "
	             "so upgrades drop no connection"};
	std::string config_path = BROKER_DEFAULT_CONFIG;
	std::optional<std::string> check_path;
	bool version = false;
	bool check_state = false;
	bool sentinel = false;
	std::optional<int> restore_fd;
	std::optional<std::string> fd_holder;
	app.add_option("-c,--config", config_path, "Configuration file")->capture_default_str();
	// Internal, for brokerctl reexec: whether this binary reads a given state, and the state itself.
	app.add_flag("--check-state", check_state)->group("");
	app.add_option("--restore-state", restore_fd)->group("");
	// Internal: the stop sentinel brokerd starts under a service manager (daemon/sentinel.hpp).
	app.add_flag("--sentinel", sentinel)->group("");
	// Internal: the fd holder brokerd starts without a service manager (daemon/fd_holder.hpp).
	app.add_option("--fd-holder", fd_holder)->group("");
	app.add_option("--check-config", check_path, "Validate FILE and exit (0 when valid)")->type_name("FILE");
	app.add_flag("--version", version, "Print the version and exit");
	try {
		app.parse(argc, argv);
	} catch (const CLI::ParseError &e) {
		int r = app.exit(e);
		return r == 0 ? 0 : 2;
	}
	if (version) {
		std::cout << "brokerd " << BROKER_VERSION << "\n";
		return 0;
	}
	if (sentinel)
		return brokerd::run_sentinel();
	if (fd_holder)
		return brokerd::run_fd_holder(*fd_holder);
	if (check_state) {
		// The state a running brokerd would hand over, on stdin: it must parse here, config and all.
		try {
			brokerd::state::check(brokerd::state::read(0));
		} catch (const std::exception &e) {
			std::cout << e.what() << "\n";
			return 1;
		}
		std::cout << brokerd::state::kFormat << "\n";
		return 0;
	}

	if (check_path) {
		try {
			brokerd::config::load(*check_path);
			brokerd::AccessRules::resolve(brokerd::config::load(*check_path).control);
		} catch (const std::exception &e) {
			std::cerr << "brokerd: " << e.what() << "\n";
			return 1;
		}
		std::cout << *check_path << ": configuration is valid\n";
		return 0;
	}

	// sd-event takes these through signalfd and pidfds; a worker never inherits the mask.
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	sigprocmask(SIG_BLOCK, &mask, nullptr);
	signal(SIGPIPE, SIG_IGN);

	try {
		if (restore_fd) {
			brokerd::Daemon daemon(brokerd::state::read(*restore_fd));
			return daemon.run();
		}
		std::string text;
		brokerd::config::Config cfg = brokerd::config::load(config_path, text);
		brokerd::Daemon daemon(config_path, std::move(cfg), std::move(text));
		return daemon.run();
	} catch (const std::exception &e) {
		brokerd::log::error(e.what());
		return 1;
	}
}
