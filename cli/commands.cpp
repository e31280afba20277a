// brokerctl's subcommands (see commands.hpp).
#include "commands.hpp"

#include "connection.hpp"
#include "errors.hpp"
#include "render.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <array>
#include <ostream>

namespace brokerctl {

using json = nlohmann::json;

namespace {

constexpr std::string_view kStatus = "io.brokerd.Control.Status";
constexpr std::string_view kSockets = "io.brokerd.Control.Sockets";

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

void declare_none(CLI::App &, Arguments &) {}

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
			throw remote_failure("io.brokerd.Control.NoSuchService", json::object(), kStatus, params);
	}

	if (opts.json)
		print_json(out, reply);
	else
		out << render_status(reply, realtime_usec(), args.service);
	return kExitOk;
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

constexpr std::array kCommands{
	Command{"status", "Show brokerd, its sockets, and each service's generations and instances",
	        declare_status, run_status},
	Command{"sockets", "List the listening sockets brokerd owns", declare_none, run_sockets},
};

} // namespace

std::span<const Command> commands()
{
	return kCommands;
}

} // namespace brokerctl
