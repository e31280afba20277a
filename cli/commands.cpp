// brokerctl's subcommands (see commands.hpp).
#include "commands.hpp"

#include "arguments.hpp"
#include "connection.hpp"
#include "errors.hpp"
#include "format.hpp"
#include "metrics.hpp"
#include "progress.hpp"
#include "render.hpp"
#include "reply.hpp"

#include "proto/names.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <pwd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <memory>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ostream>

namespace brokerctl {

using json = nlohmann::json;

namespace {

// The methods brokerctl calls and the errors it raises, as docs/io.brokerd.Control.varlink declares them.
using namespace proto::names::control;

std::int64_t realtime_usec()
{
	return std::chrono::duration_cast<std::chrono::microseconds>(
		std::chrono::system_clock::now().time_since_epoch()).count();
}

// --json: the reply's parameters as one indented object, for jq and scripts.
void print_json(std::ostream &out, const json &reply)
{
	out << reply.dump(2, ' ', false, json::error_handler_t::replace) << '\n';
}

// --json for streams: one compact object per line, so `jq` and line-based tools read it as it comes.
void print_json_line(std::ostream &out, const json &reply)
{
	out << reply.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
}

// stdout is a terminal that understands '\r' and "erase line", and how wide it is.
struct Terminal {
	bool live = false;
	std::size_t width = 0;
};

Terminal stdout_terminal()
{
	const char *term = std::getenv("TERM");
	if (!::isatty(STDOUT_FILENO) || !term || !*term || std::strcmp(term, "dumb") == 0)
		return {};
	winsize ws{};
	std::size_t width = ::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 ? ws.ws_col : 0;
	return {true, width};
}

// Ctrl-C during a live progress line: end the line first, or the shell's prompt lands on it.
void end_line_and_die(int sig)
{
	const char newline = '\n';
	[[maybe_unused]] ssize_t n = ::write(STDOUT_FILENO, &newline, 1);
	::signal(sig, SIG_DFL);
	::raise(sig);
}

// Ctrl-C is how a watch ends, so it is a success. Every line is flushed as it is written, so
// nothing is lost by leaving at once.
void exit_ok(int)
{
	::_exit(kExitOk);
}

void on_interrupt(void (*handler)(int))
{
	struct sigaction sa{};
	sa.sa_handler = handler;
	sigemptyset(&sa.sa_mask);
	::sigaction(SIGINT, &sa, nullptr);
}

std::string check_env(const std::string &text)
{
	if (!parse_env(text))
		return "expected NAME=VALUE with a non-empty NAME, got \"" + printable(text) + "\"";
	return {};
}

std::string check_duration(const std::string &text)
{
	if (!duration_ms(text))
		return "expected a positive duration like \"30s\", \"500ms\" or \"1m30s\", got \"" + printable(text) +
		       "\"";
	return {};
}

// A count or a generation is decimal, as people write them: CLI11 alone would read "010" as
// octal 8, "0x10" as 16, and "-1" as the largest unsigned number. Leading zeros go.
std::string decimal(std::string &text)
{
	if (text.empty() || text.size() > 18 || text.find_first_not_of("0123456789") != std::string::npos)
		return "expected a decimal number, got \"" + printable(text) + "\"";
	text.erase(0, std::min(text.find_first_not_of('0'), text.size() - 1));
	return {};
}

std::string check_batch(const std::string &text)
{
	int n = 0;
	if (!CLI::detail::lexical_cast(text, n) || n < 1)
		return "expected a number of instances, at least 1, got \"" + printable(text) + "\"";
	return {};
}

void declare_none(CLI::App &, Arguments &) {}

void declare_service(CLI::App &sub, Arguments &args)
{
	sub.add_option("SERVICE", args.service, "The service, as named in brokerd's config")->type_name("")->required();
}

void declare_reexec(CLI::App &sub, Arguments &args)
{
	sub.add_option("--binary", args.binary,
	               "Execute this brokerd instead of the one running (default: the same path, as after a package "
	               "upgrade)")
		->type_name("PATH");
}

void declare_no_wait(CLI::App &sub, Arguments &args)
{
	sub.add_flag("--no-wait", args.no_wait, "Return once brokerd has begun, printing the new generation");
}

void declare_rollout(CLI::App &sub, Arguments &args)
{
	declare_service(sub, args);
	declare_no_wait(sub, args);
}

void declare_rollback(CLI::App &sub, Arguments &args)
{
	declare_rollout(sub, args);
	sub.add_option("--to", args.to, "Deploy this generation's configuration instead (see `brokerctl history`)")
		->type_name("GEN")
		->transform(CLI::Validator(decimal, ""));
}

void declare_upgrade(CLI::App &sub, Arguments &args)
{
	declare_service(sub, args);
	// Parsed by take_exec() before CLI11 sees the command line; declared here for --help.
	sub.add_option("--exec", "Run this program instead of the config's exec. With arguments, put them after --, "
	                         "which takes the rest of the line: --exec -- /usr/bin/app --port 80")
		->type_name("CMD | -- CMD [ARG...]");
	sub.add_option("--env", args.env, "Set NAME=VALUE in the new generation's environment; repeat for more")
		->type_name("NAME=VALUE")
		->allow_extra_args(false)
		->check(CLI::Validator(check_env, ""));
	sub.add_option("--version", args.version, "Label the new generation with this version")->type_name("VERSION");
	auto *batch = sub.add_option("--batch", args.batch, "Start this many new instances at a time (default: "
	                                                    "the config's upgrade.batch)")
	                      ->type_name("N")
	                      ->transform(CLI::Validator(decimal, ""))
	                      ->check(CLI::Validator(check_batch, ""));
	sub.add_flag("--all-at-once", args.all_at_once, "Start every new instance before draining any old one")
		->excludes(batch);
	sub.add_option("--start-timeout", args.start_timeout, "How long a new instance may take to become ready")
		->type_name("DURATION")
		->check(CLI::Validator(check_duration, ""));
	sub.add_option("--drain-timeout", args.drain_timeout, "How long an old instance may take to drain")
		->type_name("DURATION")
		->check(CLI::Validator(check_duration, ""));
	declare_no_wait(sub, args);
}

void declare_scale(CLI::App &sub, Arguments &args)
{
	declare_service(sub, args);
	sub.add_option("N", args.instances, "How many instances the service runs from now on")
		->type_name("")
		->required()
		->transform(CLI::Validator(decimal, ""));
	sub.add_flag("--no-wait", args.no_wait, "Return at once, without waiting for the instances to be ready or gone");
}

void declare_signal(CLI::App &sub, Arguments &args)
{
	declare_service(sub, args);
	sub.add_option("SIG", args.signal,
	               "HUP, INT, QUIT, USR1, USR2, TERM, KILL, CONT, STOP, WINCH, TTIN or TTOU (with or without SIG), "
	               "or a number from 1 to 31")
		->type_name("")
		->required();
}

void declare_watch(CLI::App &sub, Arguments &args)
{
	sub.add_option("SERVICE", args.service, "Show only this service's events")->type_name("");
}

void declare_status(CLI::App &sub, Arguments &args)
{
	sub.add_option("SERVICE", args.service, "Show only this service")->type_name("");
}

int run_status(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json params = json::object();
	if (args.service)
		params["service"] = *args.service;
	json reply = broker.call(kStatus, params);

	if (args.service) {
		// The broker answers NoSuchService; this guards against one that ignored the filter.
		bool found = false;
		if (auto it = reply.find("services"); it != reply.end() && it->is_array())
			for (const json &svc : *it)
				found = found || (svc.is_object() && svc.value("name", json()) == *args.service);
		if (!found)
			throw remote_failure(kNoSuchService, json::object(), kStatus, params);
	}

	if (opts.json)
		print_json(out, reply);
	else
		out << render_status(reply, realtime_usec(), args.service);
	return kExitOk;
}

void declare_is_active(CLI::App &sub, Arguments &args)
{
	sub.add_option("SERVICE", args.services, "The services, as named in brokerd's config")->type_name("")->required();
	sub.add_flag("-q,--quiet", args.quiet, "Print nothing: the exit status alone says it");
}

// One word per service, as systemctl is-active: 0 when every one is active, 5 when one is no
// service (NoSuchService's code), else 3 (systemctl's "not active"). One Status call for all.
int run_is_active(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json reply = broker.call(kStatus);
	json states = json::array();
	int code = kExitOk;
	for (const std::string &name : args.services) {
		const json *found = nullptr;
		for (const json &svc : array(reply, "services"))
			if (text(svc, "name", "") == name)
				found = &svc;
		std::string_view state = active_state(found);
		if (!found)
			code = kExitNoSuchService;
		else if (state != "active" && code == kExitOk)
			code = kExitNotActive;
		states.push_back({{"service", name}, {"state", state}});
	}
	if (args.quiet)
		return code;
	if (opts.json)
		print_json(out, states);
	else
		for (const json &s : states)
			out << s["state"].get<std::string>() << '\n';
	return code;
}

int run_sockets(const Options &opts, const Arguments &, Connection &broker, std::ostream &out)
{
	json reply = broker.call(kSockets);
	if (opts.json)
		print_json(out, reply);
	else
		out << render_sockets(reply.value("sockets", json::array()));
	return kExitOk;
}

// Upgrade, Rollback and Restart: the same stream of Progress replies, shown live or as lines.
int run_rollout(Rollout kind, std::string_view method, json params, const Options &opts, const Arguments &args,
                Connection &broker, std::ostream &out)
{
	if (args.no_wait) {
		// The broker's only reply is then "accepted", as soon as the rollout has begun.
		params["wait"] = false;
		json first;
		broker.stream(method, params, [&first](const json &reply) {
			first = reply;
			return false;
		}, Wait::Timeout);
		if (opts.json)
			print_json_line(out, first);
		else
			out << submitted_line(kind, progress_of(first)) << '\n';
		return kExitOk;
	}

	Terminal term = stdout_terminal();
	auto mode = opts.json    ? ProgressDisplay::Mode::Json
	            : term.live ? ProgressDisplay::Mode::Live
	                        : ProgressDisplay::Mode::Lines;
	ProgressDisplay display(out, mode, kind, term.width);
	if (mode == ProgressDisplay::Mode::Live)
		on_interrupt(end_line_and_die);

	std::string service = printable(params.value("service", ""));
	auto begin = std::chrono::steady_clock::now();
	bool done = false;
	try {
		broker.stream(method, params, [&](const json &reply) {
			if (mode == ProgressDisplay::Mode::Live)
				display.set_width(stdout_terminal().width);
			auto elapsed = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
			                                                                      begin);
			done = display.update(reply, elapsed);
			return !done;
		}, Wait::Unbounded);
	} catch (const Failure &f) {
		display.clear();
		if (f.code() != kExitFailure)
			throw;
		// Losing this connection (or an unknown error) tells nothing of the rollout itself.
		throw Failure(kExitFailure, std::string(f.what()) + "; see `brokerctl status " + service + "` for its state");
	} catch (...) {
		display.clear();
		throw;
	}
	if (!done) {
		display.clear();
		throw Failure(kExitFailure, "brokerd ended " + std::string(method) + " of " + service +
		                                " without its outcome; see `brokerctl status " + service + "`");
	}
	return kExitOk;
}

int run_upgrade(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json params = {{"service", *args.service}};
	if (args.exec)
		params["exec"] = *args.exec;
	if (!args.env.empty()) {
		json env = json::object();
		for (const std::string &pair : args.env) {
			auto [name, value] = *parse_env(pair); // checked by check_env
			if (env.contains(name))
				throw Failure(kExitUsage, "--env " + printable(name) + " given twice");
			env[name] = value;
		}
		params["env"] = std::move(env);
	}
	if (args.version)
		params["version"] = *args.version;
	if (args.batch)
		params["batch"] = *args.batch;
	if (args.all_at_once)
		params["all_at_once"] = true;
	if (args.start_timeout)
		params["start_timeout_ms"] = *duration_ms(*args.start_timeout);
	if (args.drain_timeout)
		params["drain_timeout_ms"] = *duration_ms(*args.drain_timeout);
	return run_rollout(Rollout::Upgrade, kUpgrade, std::move(params), opts, args, broker, out);
}

int run_rollback(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json params = {{"service", *args.service}};
	if (args.to)
		params["generation"] = *args.to;
	return run_rollout(Rollout::Rollback, kRollback, std::move(params), opts, args, broker, out);
}

// The user's name for the BY column, or the uid when it has none here.
std::string user_name(std::int64_t uid)
{
	std::vector<char> buf(16384);
	passwd pw{}, *found = nullptr;
	if (uid >= 0 && ::getpwuid_r(static_cast<uid_t>(uid), &pw, buf.data(), buf.size(), &found) == 0 && found)
		return found->pw_name;
	return std::to_string(uid);
}

int run_history(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json reply = broker.call(kHistory, {{"service", *args.service}});
	if (opts.json)
		print_json(out, reply);
	else
		// Over -H, a uid is one of brokerd's host: a name looked up here could be someone else's.
		out << render_history(member(reply, "entries"), realtime_usec(),
		                      opts.remote ? [](std::int64_t uid) { return std::to_string(uid); } : user_name);
	return kExitOk;
}

int run_restart(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	return run_rollout(Rollout::Restart, kRestart, {{"service", *args.service}}, opts, args, broker, out);
}

// Abort, Start and Stop: one call on a service, one line when it is done. The broker replies
// once the instances are ready or gone, bounded by its own timeouts, so --timeout applies only
// when given.
int run_on_service(std::string_view method, std::string_view done, const Options &opts, const Arguments &args,
                   Connection &broker, std::ostream &out)
{
	Wait wait = opts.timeout_given ? Wait::Timeout : Wait::Unbounded;
	json reply = broker.call(method, {{"service", *args.service}}, wait);
	if (opts.json)
		print_json(out, reply);
	else
		out << printable(*args.service) << ": " << done << '\n';
	return kExitOk;
}

int run_abort(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	return run_on_service(kAbort, "upgrade aborted", opts, args, broker, out);
}

int run_start(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	return run_on_service(kStart, "started", opts, args, broker, out);
}

int run_stop(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	return run_on_service(kStop, "stopped", opts, args, broker, out);
}

// Scale waits for the new instances' readiness, or the drained ones' exit, bounded by brokerd's
// own start and drain timeouts: --timeout applies only when given, as for start and stop.
int run_scale(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json params = {{"service", *args.service}, {"instances", *args.instances}};
	if (args.no_wait)
		params["wait"] = false;
	Wait wait = opts.timeout_given || args.no_wait ? Wait::Timeout : Wait::Unbounded;
	json reply = broker.call(kScale, params, wait);
	if (opts.json)
		print_json(out, reply);
	else
		out << render_scale(*args.service, reply, !args.no_wait);
	return kExitOk;
}

int run_signal(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json reply = broker.call(kSignal, {{"service", *args.service}, {"signal", *args.signal}});
	if (opts.json)
		print_json(out, reply);
	else
		out << render_signal(*args.service, *args.signal, reply);
	return kExitOk;
}

int run_reload(const Options &opts, const Arguments &, Connection &broker, std::ostream &out)
{
	json reply = broker.call(kReload);
	if (opts.json)
		print_json(out, reply);
	else
		out << render_reload(reply);
	return kExitOk;
}

// brokerd re-executes itself and its successor answers; a brokerd that could not stays as it was.
int run_reexec(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json params = json::object();
	if (args.binary)
		params["binary"] = *args.binary;
	json reply = broker.call(kReexec, params);
	if (opts.json)
		print_json(out, reply);
	else
		out << "brokerd re-executed: version " << printable(text(reply, "version", "?")) << ", pid "
		    << number_text(reply, "pid") << ", listeners, workers and their connections kept\n";
	return kExitOk;
}

// How long a watch waits for a brokerd that went away to answer again: a restart after a crash
// (Restart=on-failure) comes well within it.
constexpr auto kWatchReconnectFor = std::chrono::seconds(30);

// A brokerd that answers Status on the control socket again within kWatchReconnectFor, with that
// reply; none when the time passed. Only "not running" is waited out: any other failure throws.
std::unique_ptr<Connection> watch_reconnect(const Options &opts, const std::string &path, json &status)
{
	auto deadline = std::chrono::steady_clock::now() + kWatchReconnectFor;
	auto pause = std::chrono::milliseconds(50);
	for (;;) {
		auto again = std::make_unique<Connection>(path, opts.timeout, opts.remote);
		try {
			status = again->call(kStatus);
			return again;
		} catch (const Failure &f) {
			if (f.code() != kExitNotRunning && f.code() != kExitFailure)
				throw;
		}
		if (std::chrono::steady_clock::now() + pause > deadline)
			return nullptr;
		::usleep(static_cast<useconds_t>(std::chrono::duration_cast<std::chrono::microseconds>(pause).count()));
		pause = std::min(pause * 2, std::chrono::milliseconds(1000));
	}
}

int run_watch(const Options &opts, const Arguments &args, Connection &broker, std::ostream &out)
{
	json params = json::object();
	if (args.service)
		params["service"] = *args.service;
	on_interrupt(exit_ok);
	auto print = [&](const json &event) {
		if (opts.json)
			print_json_line(out, event);
		else
			out << watch_line(event, realtime_usec()) << '\n';
		if (!out.flush())
			throw Failure(kExitFailure, "cannot write to standard output");
		return true;
	};
	// A brokerd killed and started again (Restart=on-failure) carries on with the same workers:
	// the watch goes on with it, and says what it found.
	std::unique_ptr<Connection> current;
	Connection *conn = &broker;
	for (;;) {
		try {
			conn->stream(kWatch, params, print, Wait::Unbounded);
		} catch (const Failure &f) {
			if (f.code() != kExitFailure)
				throw;
		}
		print(json{{"event", "disconnected"},
		           {"time", realtime_usec()},
		           {"message", "brokerd went away; waiting up to " + std::to_string(kWatchReconnectFor.count()) +
		                           "s for it to answer again"}});
		json status;
		current = watch_reconnect(opts, broker.path(), status);
		if (!current)
			throw Failure(kExitFailure, "brokerd ended the watch");
		conn = current.get();
		print(reconnected_event(status, realtime_usec()));
	}
}

constexpr std::array kCommands{
	Command{"status", "Show brokerd, its sockets, and each service's generations and instances",
	        declare_status, run_status},
	Command{"is-active", "Say whether each service is active, one word per line; exit 0 only if all are",
	        declare_is_active, run_is_active},
	Command{"sockets", "List the listening sockets brokerd owns, the services using them and their accept queues",
	        declare_none, run_sockets},
	Command{"upgrade", "Roll out a new generation of a service, showing its progress", declare_upgrade,
	        run_upgrade},
	Command{"history", "List a service's generations: version, start, result, and who asked for each",
	        declare_service, run_history},
	Command{"rollback", "Deploy the previous generation's configuration again, or one named with --to",
	        declare_rollback, run_rollback},
	Command{"restart", "Replace every instance of a service with a fresh one", declare_rollout, run_restart},
	Command{"abort", "Stop a service's upgrade in progress and roll it back", declare_service, run_abort},
	Command{"start", "Start a stopped service; returns once its instances are ready", declare_service,
	        run_start},
	Command{"stop", "Drain every instance of a service; returns once all have exited", declare_service,
	        run_stop},
	Command{"scale", "Set how many instances a service runs; returns once they are ready or gone", declare_scale,
	        run_scale},
	Command{"signal", "Send a signal to every instance of a service", declare_signal, run_signal},
	Command{"reload", "Re-read the config file, adding and removing sockets and services", declare_none,
	        run_reload},
	Command{"watch", "Print brokerd's events as they happen, until interrupted", declare_watch, run_watch},
	Command{"reexec", "Upgrade brokerd itself: it re-executes, keeping every listener, worker and connection",
	        declare_reexec, run_reexec},
	Command{"metrics", "Print brokerd's metrics in the Prometheus text format", declare_none, run_metrics},
};

} // namespace

std::span<const Command> commands()
{
	return kCommands;
}

} // namespace brokerctl
