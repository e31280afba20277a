// brokerctl's exit codes and failure messages (see errors.hpp).
#include "errors.hpp"

#include "proto/errors.hpp"

#include "format.hpp"
#include "reply.hpp"

#include "proto/sync_client.hpp"
#include "proto/varlink.hpp"

#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cstring>

namespace brokerctl {

using json = nlohmann::json;

const char *const kExitCodesHelp =
	"Exit status:\n"
	"  0  success\n"
	"  1  failure (the message says what)\n"
	"  2  usage error: the command line, or a parameter brokerd refused (the message names\n"
	"     the option), or a generation rollback --to cannot deploy\n"
	"  3  brokerd is not running (no control socket, or nothing listening on it); for\n"
	"     is-active, a service is not active\n"
	"  4  permission denied (by the socket's file mode, or by brokerd)\n"
	"  5  no such service (is-active: one of those named, which it says is unknown)\n"
	"  6  the upgrade failed and was rolled back (the previous generation serves)\n"
	"  7  the operation could not begin: an upgrade is in progress, the config is invalid,\n"
	"     the service is stopped (or, for start, running, or failed to start), there is no\n"
	"     previous generation, or no upgrade to abort; for scale, an instance it started\n"
	"     did not become ready (the count stays); or brokerd could not re-execute\n"
	"     (reexec), and serves on as it was\n"
	"\n"
	"Environment:\n"
	"  BROKERCTL_SOCKET  control socket, when --socket is not given\n"
	"  BROKERCTL_SSH     the ssh command for -H (default \"ssh\"; split at blanks)";

namespace {

using namespace proto::errors;

// brokerd says why when the caller's tier is not the reason (an admin choosing what root runs).
Failure permission_denied(std::string_view why = {})
{
	if (!why.empty())
		return Failure(kExitPermissionDenied, "permission denied by brokerd: " + printable(why));
	return Failure(kExitPermissionDenied,
	               "permission denied by brokerd (try as root or a member of an admin group)");
}

std::string in_quotes(std::string_view s)
{
	std::string out = "\"";
	out += printable(s);
	out += '"';
	return out;
}

// The service an error is about: its own parameter, else the one the call named.
std::string service_name(const json &error_parameters, const json &call_parameters)
{
	std::string name = text(error_parameters, "service", "");
	return printable(name.empty() ? text(call_parameters, "service", "") : name);
}

// "upgrade to gen 4", "restart as gen 5": what failed, worded like the progress display.
std::string rollout_noun(std::string_view method, const json &generation)
{
	std::string gen = generation.is_number_integer() ? std::to_string(generation.get<std::int64_t>()) : "?";
	if (method.ends_with(".Rollback"))
		return "rollback as gen " + gen;
	if (method.ends_with(".Restart"))
		return "restart as gen " + gen;
	return "upgrade to gen " + gen;
}

// UpgradeFailed: the reason, then the failed instance and its last output, indented under it.
Failure upgrade_failed(std::string_view method, const json &e, const json &call_parameters)
{
	std::string message = service_name(e, call_parameters) + ": " + rollout_noun(method, member(e, "generation")) +
	                      " failed and was rolled back: " + printable(text(e, "reason", "no reason given"));
	std::string instance = printable(text(e, "instance", ""));
	const json &output = array(e, "output");
	if (!instance.empty())
		message += "\n  failed instance: " + instance;
	if (!output.empty()) {
		message += "\n  its last output:";
		for (const json &line : output)
			message += "\n    " + printable(line.is_string() ? line.get<std::string>() : line.dump());
	}
	return Failure(kExitRolledBack, message);
}

// Which of brokerctl's words sent each Control parameter, for a refusal to name what the operator
// typed. A method of "" matches every method; a row for one method comes before it. A new option
// that becomes a parameter is one row here.
struct ParameterOption {
	std::string_view method; // the last part of the method's name: "Upgrade"
	std::string_view parameter;
	std::string_view option;
};

constexpr ParameterOption kParameterOptions[] = {
	{"Rollback", "generation", "--to"},
	{"", "service", "SERVICE"},
	{"", "exec", "--exec"},
	{"", "env", "--env"},
	{"", "version", "--version"},
	{"", "batch", "--batch"},
	{"", "all_at_once", "--all-at-once"},
	{"", "start_timeout_ms", "--start-timeout"},
	{"", "drain_timeout_ms", "--drain-timeout"},
	{"", "wait", "--no-wait"},
	{"", "binary", "--binary"},
	{"", "instances", "N"},
	{"", "signal", "SIG"},
};

// "io.brokerd.Control.Upgrade" -> "Upgrade".
std::string_view method_base(std::string_view method)
{
	auto dot = method.rfind('.');
	return dot == std::string_view::npos ? method : method.substr(dot + 1);
}

// InvalidParameter: brokerd refused a value the operator gave, so it is a usage error that names
// the option. A parameter no option sends (brokerctl and brokerd disagree on the protocol) is not
// the operator's to fix: exit 1, as any other failure.
Failure invalid_parameter(std::string_view method, std::string_view parameter, const std::string &why)
{
	std::string_view base = method_base(method);
	std::string command;
	for (char c : base)
		command += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
	for (const ParameterOption &row : kParameterOptions) {
		if (row.parameter != parameter || !(row.method.empty() || row.method == base))
			continue;
		// brokerd explains a value it refuses; a parameter it refuses without a word is one it
		// does not know.
		return Failure(kExitUsage, "brokerd refused " + std::string(row.option) + " of " + command + ": " +
		                               (why.empty() ? "this brokerd does not take it (is it older than brokerctl?)"
		                                            : why));
	}
	return Failure(kExitFailure, "brokerd rejected parameter " + in_quotes(parameter) + " of " + std::string(method) +
	                                 (why.empty() ? "" : ": " + why));
}

} // namespace

Failure connect_failure(const proto::varlink::Error &e, const std::string &path)
{
	switch (e.code()) {
	case ENOENT:
	case ECONNREFUSED: {
		// ECONNREFUSED is a socket file left behind by a broker that is gone, or no socket at all.
		struct stat st{};
		if (!path.empty() && path[0] != '@' && ::lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode))
			return Failure(kExitNotRunning, printable(path) + " is not a socket: brokerd is not there (see --socket)");
		if (e.code() == ECONNREFUSED)
			return Failure(kExitNotRunning, "brokerd is not running (nothing listens on " + printable(path) + ")");
		return Failure(kExitNotRunning, "brokerd is not running (no control socket at " + printable(path) + ")");
	}
	case EACCES:
	case EPERM:
		// The file system's refusal (the socket's mode, or a directory on its path), not brokerd's.
		return Failure(kExitPermissionDenied, "cannot connect to " + printable(path) + ": " + std::strerror(e.code()) +
		                                    " (try as root or a member of an admin group)");
	case EAGAIN:
		return Failure(kExitFailure, "brokerd is too busy to accept a connection at " + printable(path) +
		                                 "; try again");
	default:
		return Failure(kExitFailure,
		               "cannot connect to brokerd at " + printable(path) + ": " + std::strerror(e.code()));
	}
}

Failure io_failure(const proto::varlink::Error &e, std::string_view method, std::chrono::milliseconds timeout)
{
	switch (e.code()) {
	case ETIMEDOUT:
		return Failure(kExitFailure, "no answer from brokerd to " + std::string(method) + " within " +
		                                 format_duration(timeout) + " (see --timeout)");
	case ECONNRESET:
	case EPIPE:
		return Failure(kExitFailure, "brokerd closed the connection during " + std::string(method));
	case EBADMSG:
	case EMSGSIZE:
	case EPROTO:
		return Failure(kExitFailure, "brokerd sent an invalid reply to " + std::string(method) + " (" +
		                                 std::strerror(e.code()) + ")");
	default:
		return Failure(kExitFailure, "talking to brokerd (" + std::string(method) + "): " + printable(e.what()));
	}
}

Failure remote_failure(std::string_view error, const json &error_parameters, std::string_view method,
                       const json &call_parameters)
{
	if (error == proto::varlink::kPermissionDenied)
		return permission_denied(text(error_parameters, "message", ""));
	if (error == kNoSuchService) {
		std::string name = text(error_parameters, "service", "");
		if (name.empty())
			name = text(call_parameters, "service", "");
		return Failure(kExitNoSuchService, "no such service " + in_quotes(name));
	}
	if (error == kUpgradeFailed)
		return upgrade_failed(method, error_parameters, call_parameters);
	std::string service = service_name(error_parameters, call_parameters);
	if (error == kUpgradeInProgress)
		return Failure(kExitNotStarted, "an upgrade of " + service + " to gen " +
		                                    number_text(error_parameters, "generation") + " is in progress");
	if (error == kInvalidConfig)
		return Failure(kExitNotStarted, "invalid config: " + printable(text(error_parameters, "message")));
	if (error == kServiceStopped)
		return Failure(kExitNotStarted, method.ends_with(".Start")
		                                    ? service + " is already running"
		                                    : service + " is stopped (start it with `brokerctl start " + service +
		                                          "`)");
	if (error == kNoPreviousGeneration)
		return Failure(kExitNotStarted, service + " has no previous generation to roll back to");
	if (error == kNoSuchGeneration) {
		std::vector<std::string> known;
		for (const json &n : array(error_parameters, "known"))
			known.push_back(n.is_number_integer() ? std::to_string(n.get<std::int64_t>()) : "?");
		std::string list;
		for (const std::string &n : known)
			list += (list.empty() ? "" : ", ") + n;
		return Failure(kExitUsage, service + " has no generation " + number_text(error_parameters, "generation") +
		                               " still known; known: " + (list.empty() ? "none" : list) +
		                               " (see `brokerctl history " + service + "`)");
	}
	if (error == kNoUpgradeInProgress)
		return Failure(kExitNotStarted, "no upgrade of " + service + " is in progress");
	if (error == kReexecFailed)
		return Failure(kExitNotStarted, "brokerd did not re-execute, and serves on as it was: " +
		                                    printable(text(error_parameters, "message", "no reason given")));
	if (error == kRegisteredService && method.ends_with(".Scale"))
		return Failure(kExitNotStarted, service + " is a registered service: its workers' owner starts and stops "
		                                          "them (scale does not apply)");
	if (error == kRegisteredService)
		return Failure(kExitNotStarted, service + " is a registered service: a new version takes over by registering "
		                                          "(upgrade, rollback and restart do not apply)");
	if (error == kShuttingDown)
		return Failure(kExitNotStarted, "brokerd is shutting down");
	if (error == kTooManyConnections)
		return Failure(kExitFailure, "brokerd refused the connection: " +
		                                 printable(text(error_parameters, "message", "no reason given")));
	if (error == kStartFailed && method.ends_with(".Scale"))
		return Failure(kExitNotStarted, service + " is scaled, and the count stays, but an instance did not become "
		                                          "ready: " +
		                                    printable(text(error_parameters, "reason", "no reason given")));
	if (error == kStartFailed)
		return Failure(kExitNotStarted, service + " could not be started: " +
		                                    printable(text(error_parameters, "reason", "no reason given")));
	if (error == proto::varlink::kMethodNotFound || error == proto::varlink::kMethodNotImplemented ||
	    error == proto::varlink::kInterfaceNotFound)
		return Failure(kExitFailure, "this brokerd does not support " + std::string(method) +
		                                 " (is it older than brokerctl?)");
	if (error == proto::varlink::kInvalidParameter)
		return invalid_parameter(method, text(error_parameters, "parameter", ""),
		                         printable(text(error_parameters, "message", "")));
	std::string detail;
	if (error_parameters.is_object() && !error_parameters.empty())
		detail = " " + error_parameters.dump(-1, ' ', false, json::error_handler_t::replace);
	return Failure(kExitFailure, "brokerd failed " + std::string(method) + ": " + printable(error) + printable(detail));
}

} // namespace brokerctl
