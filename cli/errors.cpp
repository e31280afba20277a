// brokerctl's exit codes and failure messages (see errors.hpp).
#include "errors.hpp"

#include "format.hpp"

#include "broker/client.hpp"
#include "broker/internal/varlink.hpp"

#include <cerrno>
#include <cstring>

namespace brokerctl {

using json = nlohmann::json;

const char *const kExitCodesHelp =
	"Exit status:\n"
	"  0  success\n"
	"  1  failure (the message says what)\n"
	"  2  usage error\n"
	"  3  brokerd is not running (no control socket, or nothing listening on it)\n"
	"  4  permission denied (by the socket's file mode, or by brokerd)\n"
	"  5  no such service\n"
	"\n"
	"Environment:\n"
	"  BROKERCTL_SOCKET  control socket, when --socket is not given";

namespace {

inline constexpr std::string_view kNoSuchService = "io.brokerd.Control.NoSuchService";

Failure permission_denied()
{
	return Failure(kExitPermissionDenied,
	               "permission denied by brokerd (try as root or a member of an admin group)");
}

std::string in_quotes(std::string_view s)
{
	return "\"" + printable(s) + "\"";
}

std::string string_member(const json &object, const char *key)
{
	if (!object.is_object())
		return {};
	auto it = object.find(key);
	return it != object.end() && it->is_string() ? it->get<std::string>() : std::string();
}

} // namespace

Failure connect_failure(const broker::Error &e, const std::string &path)
{
	switch (e.code()) {
	case ENOENT:
	case ECONNREFUSED:
		// ECONNREFUSED is a socket file left behind by a broker that is gone.
		return Failure(kExitNotRunning, "brokerd is not running (no control socket at " + printable(path) + ")");
	case EACCES:
	case EPERM:
		return permission_denied();
	case EAGAIN:
		return Failure(kExitFailure, "brokerd is too busy to accept a connection at " + printable(path) +
		                                 "; try again");
	default:
		return Failure(kExitFailure,
		               "cannot connect to brokerd at " + printable(path) + ": " + std::strerror(e.code()));
	}
}

Failure io_failure(const broker::Error &e, std::string_view method, std::chrono::milliseconds timeout)
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
	if (error == broker::varlink::kPermissionDenied)
		return permission_denied();
	if (error == kNoSuchService) {
		std::string name = string_member(error_parameters, "service");
		if (name.empty())
			name = string_member(call_parameters, "service");
		return Failure(kExitNoSuchService, "no such service " + in_quotes(name));
	}
	if (error == broker::varlink::kMethodNotFound || error == broker::varlink::kMethodNotImplemented ||
	    error == broker::varlink::kInterfaceNotFound)
		return Failure(kExitFailure, "this brokerd does not support " + std::string(method) +
		                                 " (is it older than brokerctl?)");
	if (error == broker::varlink::kInvalidParameter)
		return Failure(kExitFailure, "brokerd rejected parameter " +
		                                 in_quotes(string_member(error_parameters, "parameter")) + " of " +
		                                 std::string(method));
	std::string detail;
	if (error_parameters.is_object() && !error_parameters.empty())
		detail = " " + error_parameters.dump(-1, ' ', false, json::error_handler_t::replace);
	return Failure(kExitFailure, "brokerd failed " + std::string(method) + ": " + printable(error) + printable(detail));
}

} // namespace brokerctl
