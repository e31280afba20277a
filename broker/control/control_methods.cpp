// io.brokerd.Control: Status, Sockets, History, Upgrade, Rollback, Restart, Abort, Start, Stop, Reload, Watch,
// Reexec.
#include "control/connection.hpp"
#include "control/encode.hpp"

#include "broker_config.h"
#include "proto/duration.hpp"
#include "proto/errors.hpp"
#include "proto/limits.hpp"
#include "os/log.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

namespace {

// Varlink's InvalidParameter names the parameter; "message" says what is wrong with it.
json bad(const char *parameter, const std::string &why = {})
{
	json e = {{"parameter", parameter}};
	if (!why.empty())
		e["message"] = why;
	return e;
}

// An Upgrade's "env", into cfg. Returns InvalidParameter's parameters when it is wrong.
std::optional<json> env_override(const json &env, config::ServiceConfig &cfg)
{
	if (!env.is_object())
		return bad("env");
	for (auto e = env.begin(); e != env.end(); ++e) {
		const std::string &k = e.key();
		if (!config::valid_env_name(k))
			return bad("env", "\"" + k + "\" is not a variable name (letters, digits and _, not first a digit)");
		if (config::reserved_env_name(k))
			return bad("env", k + ": BROKER_*, LISTEN_* and NOTIFY_SOCKET are set by brokerd");
		if (!e->is_string() || e->get<std::string>().find('\0') != std::string::npos)
			return bad("env", k + ": the value must be a string without NUL");
		cfg.env[k] = e->get<std::string>();
	}
	return std::nullopt;
}

// An Upgrade's overrides of the config file, into req. Returns InvalidParameter's parameters
// for the first that is wrong.
std::optional<json> apply_overrides(const json &params, UpgradeRequest &req)
{
	if (auto it = params.find("exec"); it != params.end() && !it->is_null()) {
		if (!it->is_array() || it->empty())
			return bad("exec", "expected a list of strings, the program first");
		req.cfg.exec.clear();
		for (const auto &a : *it) {
			if (!a.is_string() || a.get<std::string>().empty() || a.get<std::string>().find('\0') != std::string::npos)
				return bad("exec", "each argument must be a non-empty string without NUL");
			req.cfg.exec.push_back(a.get<std::string>());
		}
	}
	if (auto it = params.find("env"); it != params.end() && !it->is_null()) {
		if (auto wrong = env_override(*it, req.cfg))
			return wrong;
	}
	if (auto it = params.find("version"); it != params.end() && !it->is_null()) {
		if (!it->is_string() || it->get<std::string>().find('\0') != std::string::npos)
			return bad("version", "expected a string without NUL");
		req.cfg.version = it->get<std::string>();
	}
	if (auto it = params.find("batch"); it != params.end() && !it->is_null()) {
		if (!it->is_number_unsigned() || it->get<std::uint64_t>() < 1 || it->get<std::uint64_t>() > proto::limits::kMaxBatch)
			return bad("batch", "expected a number of instances from 1 to " + std::to_string(proto::limits::kMaxBatch));
		req.cfg.upgrade_batch = it->get<unsigned>();
	}
	if (auto it = params.find("all_at_once"); it != params.end() && !it->is_null()) {
		if (!it->is_boolean())
			return bad("all_at_once");
		req.all_at_once = it->get<bool>();
	}
	for (const char *key : {"start_timeout_ms", "drain_timeout_ms"}) {
		auto it = params.find(key);
		if (it == params.end() || it->is_null())
			continue;
		constexpr auto max = static_cast<std::uint64_t>(proto::kMaxDuration.count());
		if (!it->is_number_unsigned() || it->get<std::uint64_t>() > max)
			return bad(key, "expected milliseconds, at most " + proto::format_duration(proto::kMaxDuration));
		auto ms = std::chrono::milliseconds(it->get<std::uint64_t>());
		if (key[0] == 's') {
			if (ms.count() == 0)
				return bad(key, "a start timeout must be above 0");
			req.cfg.start_timeout = ms;
		} else {
			req.cfg.drain_timeout = ms;
			req.drain_timeout = ms;
		}
	}
	return std::nullopt;
}

} // namespace

void ControlServer::Connection::control_status(control::Call &call)
{
	status(call.params, false);
}

void ControlServer::Connection::control_sockets(control::Call &call)
{
	status(call.params, true);
}

void ControlServer::Connection::status(const json &params, bool only_sockets)
{
	std::string service;
	bool narrowed = false;
	for (auto it = params.begin(); it != params.end(); ++it) {
		if (!only_sockets && it.key() == "service" && it->is_string()) {
			service = it->get<std::string>();
			narrowed = true;
		} else if (!(it.key() == "service" && it->is_null())) {
			return error(vl::kInvalidParameter, {{"parameter", it.key()}});
		}
	}
	json sockets = encode::sockets(server_.supervisor_, server_.hooks_.sock_diag);
	if (only_sockets)
		return reply({{"sockets", std::move(sockets)}});

	json services = encode::services(server_.supervisor_, narrowed ? &service : nullptr);
	if (services.is_null())
		return error(proto::errors::kNoSuchService, {{"service", service}});
	json r = {{"version", BROKER_VERSION},
	          {"pid", ::getpid()},
	          {"uptime_usec", now_usec(CLOCK_MONOTONIC) - server_.start_usec_},
	          {"sockets", std::move(sockets)},
	          {"services", std::move(services)}};
	if (json recovered = encode::recovery(server_.supervisor_.recovery()); !recovered.is_null())
		r["recovered"] = std::move(recovered);
	reply(std::move(r));
}

Service *ControlServer::Connection::service_param(const json &params, const std::vector<std::string> &allowed)
{
	for (auto it = params.begin(); it != params.end(); ++it)
		if (it.key() != "service" && std::find(allowed.begin(), allowed.end(), it.key()) == allowed.end()) {
			error(vl::kInvalidParameter, {{"parameter", it.key()}});
			return nullptr;
		}
	auto it = params.find("service");
	if (it == params.end() || !it->is_string()) {
		error(vl::kInvalidParameter, {{"parameter", "service"}});
		return nullptr;
	}
	Service *svc = server_.supervisor_.find_service(it->get<std::string>());
	if (!svc)
		error(proto::errors::kNoSuchService, {{"service", *it}});
	return svc;
}

void ControlServer::Connection::control_upgrade(control::Call &call)
{
	upgrade(call.params, "upgrade");
}

void ControlServer::Connection::control_rollback(control::Call &call)
{
	upgrade(call.params, "rollback");
}

void ControlServer::Connection::control_history(control::Call &call)
{
	if (const Service *svc = service_param(call.params, {}))
		reply({{"entries", encode::history(svc->history)}});
}

void ControlServer::Connection::control_restart(control::Call &call)
{
	upgrade(call.params, "restart");
}

void ControlServer::Connection::upgrade(const json &params, const std::string &kind)
{
	std::vector<std::string> allowed = {"wait"};
	if (kind == "rollback")
		allowed = {"wait", "generation"};
	else if (kind == "upgrade")
		allowed = {"wait", "exec", "env", "version", "batch", "all_at_once", "start_timeout_ms", "drain_timeout_ms"};
	Service *svc = service_param(params, allowed);
	if (!svc)
		return;
	bool wait = true;
	if (auto it = params.find("wait"); it != params.end() && !it->is_null()) {
		if (!it->is_boolean())
			return error(vl::kInvalidParameter, bad("wait"));
		wait = it->get<bool>();
	}

	UpgradeRequest req;
	req.kind = kind;
	req.by = uid();
	if (auto it = params.find("generation"); it != params.end() && !it->is_null()) {
		if (!it->is_number_unsigned())
			return error(vl::kInvalidParameter, bad("generation", "expected a generation number"));
		const std::uint64_t number = it->get<std::uint64_t>();
		if (svc->current && svc->current->number == number)
			return error(vl::kInvalidParameter,
			             bad("generation", "gen " + std::to_string(number) + " is the one " + svc->name +
			                                   " runs now; name an earlier one"));
		const HistoryRecord *record = svc->history.find(number);
		if (!record)
			return error(proto::errors::kNoSuchGeneration,
			             {{"service", svc->name}, {"generation", number}, {"known", svc->history.known()}});
		req.cfg = record->cfg;
	} else if (kind == "rollback") {
		if (!svc->previous)
			return error(proto::errors::kNoPreviousGeneration, {{"service", svc->name}});
		req.cfg = *svc->previous;
	} else if (kind == "restart") {
		req.cfg = svc->current ? svc->current->cfg : svc->cfg;
	} else if (!new_generation(*svc, params, req)) {
		return;
	}

	auto begun = server_.supervisor_.begin_upgrade(*svc, std::move(req), wait && !oneway_ ? this : nullptr);
	if (const Refusal *why = std::get_if<Refusal>(&begun))
		return refused(*why);
	if (!wait)
		return reply({{"progress", encode::progress(std::get<Event>(begun))}});
	if (svc->upgrade && !oneway_)
		waiting_ = true; // the supervisor answers when the rollout ends
}

// An Upgrade's new generation: the config file as it is now, with the call's overrides.
// Replies the error itself when there is one.
bool ControlServer::Connection::new_generation(const Service &svc, const json &params, UpgradeRequest &req)
{
	try {
		config::Config cfg = server_.hooks_.read_config();
		const config::ServiceConfig *sc = cfg.find_service(svc.name);
		if (!sc) {
			error(proto::errors::kInvalidConfig,
			      {{"message", "services." + svc.name + ": not in the config file any more (reload removes it)"}});
			return false;
		}
		req.cfg = *sc;
	} catch (const std::exception &e) {
		error(proto::errors::kInvalidConfig, {{"message", e.what()}});
		return false;
	}
	if (auto wrong = apply_overrides(params, req)) {
		error(vl::kInvalidParameter, *wrong);
		return false;
	}
	// exec and env choose what runs; version is a label (BROKER_VERSION) the program was
	// configured to read, like the timeouts and batch: those stay open to admins.
	bool chooses_program = false;
	for (const char *key : {"exec", "env"})
		if (auto it = params.find(key); it != params.end() && !it->is_null())
			chooses_program = true;
	if (auto why = chooses_program ? access::program_choice(tier_, req.cfg, ::geteuid(), ::getegid()) : std::nullopt) {
		log::client(log::Level::Warning, "control: Upgrade of " + svc.name + " with exec or env from " + who() +
		                                     " denied: " + *why);
		error(vl::kPermissionDenied, {{"message", *why}});
		return false;
	}
	return true;
}

void ControlServer::Connection::control_abort(control::Call &call)
{
	Service *svc = service_param(call.params, {});
	if (!svc)
		return;
	if (auto why = server_.supervisor_.abort_upgrade(*svc))
		return refused(*why);
	reply(json::object());
}

void ControlServer::Connection::control_start(control::Call &call)
{
	start_stop(call.params, true);
}

void ControlServer::Connection::control_stop(control::Call &call)
{
	start_stop(call.params, false);
}

void ControlServer::Connection::start_stop(const json &params, bool start)
{
	Service *svc = service_param(params, {});
	if (!svc)
		return;
	Observer *me = oneway_ ? nullptr : this;
	waiting_ = me != nullptr;
	auto why = start ? server_.supervisor_.start_service(*svc, me, uid()) : server_.supervisor_.stop_service(*svc, me);
	if (why) {
		waiting_ = false;
		refused(*why);
	}
}

void ControlServer::Connection::control_reload(control::Call &call)
{
	const json &params = call.params;
	if (!params.empty())
		return error(vl::kInvalidParameter, {{"parameter", params.begin().key()}});
	// Sockets bound and services started now would only be torn down again, or outlive the rest.
	if (server_.supervisor_.shutting_down())
		return error(proto::errors::kShuttingDown);
	try {
		reply(server_.hooks_.reload());
	} catch (const std::exception &e) {
		error(proto::errors::kInvalidConfig, {{"message", e.what()}});
	}
}

void ControlServer::Connection::control_watch(control::Call &call)
{
	const json &params = call.params;
	for (auto it = params.begin(); it != params.end(); ++it) {
		if (it.key() == "service" && it->is_string())
			watch_service_ = it->get<std::string>();
		else if (!(it.key() == "service" && it->is_null()))
			return error(vl::kInvalidParameter, {{"parameter", it.key()}});
	}
	if (!more_)
		return error(vl::kExpectedMore);
	if (!watch_service_.empty() && !server_.supervisor_.find_service(watch_service_))
		return error(proto::errors::kNoSuchService, {{"service", watch_service_}});
	watching_ = true;
	// The stream stays open; every event is one reply. Later calls on this connection wait.
	waiting_ = true;
}

void ControlServer::Connection::control_reexec(control::Call &call)
{
	const json &params = call.params;
	std::string binary;
	for (auto it = params.begin(); it != params.end(); ++it) {
		if (it.key() == "binary" && it->is_string() && !it->get<std::string>().empty())
			binary = it->get<std::string>();
		else if (!(it.key() == "binary" && it->is_null()))
			return error(vl::kInvalidParameter, {{"parameter", it.key()}});
	}
	if (oneway_)
		return error(vl::kInvalidParameter, {{"parameter", "oneway"}});
	// Another binary runs as brokerd's user (root): only that user may name one.
	if (auto why = binary.empty() ? std::nullopt : access::reexec_binary(tier_)) {
		log::client(log::Level::Warning, "control: Reexec of " + binary + " from " + who() + " denied: only root names a binary");
		return error(vl::kPermissionDenied, {{"message", *why}});
	}
	// The answer comes later, as an Upgrade's does: from the next brokerd, or not_done when
	// brokerd could not re-execute and serves on as it was. Later calls wait their turn.
	auto not_done = [this](const std::string &why) {
		reexec_pending_ = false;
		log::error("reexec: " + why + "; carrying on");
		error(proto::errors::kReexecFailed, {{"message", why}});
		update_events();
		done_waiting();
	};
	waiting_ = reexec_pending_ = true;
	try {
		server_.hooks_.reexec(binary, stream_.fd(), not_done);
	} catch (const std::exception &e) {
		not_done(e.what());
	}
}

} // namespace brokerd
