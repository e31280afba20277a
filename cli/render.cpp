// Human views of io.brokerd.Control replies (see render.hpp).
#include "render.hpp"

#include "format.hpp"
#include "reply.hpp"

#include "proto/names.hpp"

#include <algorithm>
#include <set>

namespace brokerctl {

using json = nlohmann::json;

namespace {

namespace instance_state = proto::names::control::instance_state;
namespace service_state = proto::names::control::service_info_state;

// is-active's words are systemctl's, not the protocol's, though two are spelled alike.
constexpr std::string_view kActiveFailed = "failed";

std::vector<std::string> strings(const json &list)
{
	std::vector<std::string> out;
	for (const json &v : list)
		out.push_back(v.is_string() ? v.get<std::string>() : "?");
	return out;
}

// A setting's value as a change shows it; an empty one as "".
std::string shown(const std::string &value)
{
	return value.empty() ? "\"\"" : printable(value);
}

std::string join(const std::vector<std::string> &items, std::string_view sep)
{
	std::string out;
	for (const std::string &s : items) {
		if (!out.empty())
			out += sep;
		out += s;
	}
	return out;
}

// "MODE changed, TOKEN added": what a generation's env changed, by name only.
std::string env_changes(const json &gen)
{
	std::vector<std::string> changes;
	for (const json &c : array(gen, "env"))
		changes.push_back(text(c, "name") + " " + text(c, "change"));
	return changes.empty() ? "-" : join(changes, ", ");
}

// Newest first: during an upgrade it is the one being rolled out.
std::vector<const json *> newest_first(const json &svc)
{
	std::vector<const json *> gens;
	for (const json &g : array(svc, "generations"))
		gens.push_back(&g);
	std::stable_sort(gens.begin(), gens.end(), [](const json *a, const json *b) {
		return integer(*a, "number").value_or(0) > integer(*b, "number").value_or(0);
	});
	return gens;
}

std::string render_service(const json &svc, std::int64_t now_usec)
{
	std::vector<std::string> sockets = strings(array(svc, "sockets"));
	std::vector<const json *> gens = newest_first(svc);

	std::string out = "SERVICE " + printable(text(svc, "name")) + "\n";
	out += "  sockets:      " + printable(sockets.empty() ? "-" : join(sockets, ", ")) + "\n";
	out += "  ready:        " + printable(text(svc, "ready")) + "\n";
	out += "  state:        " + printable(text(svc, "state")) + "\n";
	out += "  instances:    " + number_text(svc, "instances");
	if (const json &scaled = member(svc, "scaled"); scaled.is_boolean() && scaled.get<bool>())
		out += " (scaled: later upgrades keep it)";
	out += "\n";
	if (const json &up = member(svc, "upgrade"); up.is_object())
		out += "  upgrade:      " + render_upgrade_info(up) + "\n";
	if (const json &h = member(svc, "handoff"); h.is_object())
		out += "  handoff:      " + number_text(h, "handed") + " handed, " + number_text(h, "received") + " received, " +
		       number_text(h, "returned") + " returned\n";

	Table generations({"GEN", "VERSION", "STARTED", "EXEC", "ENV"});
	for (const json *g : gens) {
		std::vector<std::string> argv = strings(array(*g, "exec"));
		auto started = integer(*g, "started");
		generations.add({number_text(*g, "number"), text(*g, "version", "-"),
		                 started ? format_ago(*started, now_usec) : "-", argv.empty() ? "-" : shell_join(argv),
		                 env_changes(*g)});
	}
	out += "  GENERATIONS\n";
	out += generations.render("  ");

	// A failed instance, or one waiting to restart, is followed by why its process ended and its
	// last lines.
	std::string failures;
	Table instances({"ID", "GEN", "PID", "STATE", "SINCE", "RESTARTS", "STATUS"});
	for (const json *g : gens) {
		for (const json &inst : array(*g, "instances")) {
			auto pid = integer(inst, "pid");
			std::string state = text(inst, "state");
			instances.add({
				text(inst, "id"),
				number_text(*g, "number"),
				pid && *pid > 0 ? std::to_string(*pid) : "-",
				state,
				format_ago(integer(inst, "since").value_or(0), now_usec),
				number_text(inst, "restarts"),
				text(inst, "status", ""),
			});
			std::string reason = text(inst, "exit_reason", "");
			if (state != instance_state::kFailed && !(state == instance_state::kStarting && !reason.empty()))
				continue;
			failures += "  " + printable(text(inst, "id")) + " " + printable(state) + ": " +
			            printable(reason.empty() ? "no exit reason known" : reason) + "\n";
			for (const std::string &line : strings(array(inst, "output")))
				failures += "    " + printable(line) + "\n";
		}
	}
	out += "  INSTANCES\n";
	out += instances.render("  ");
	out += failures;
	return out;
}

} // namespace

std::string render_upgrade_info(const json &upgrade)
{
	std::string out = "gen " + number_text(upgrade, "from") + " -> " + number_text(upgrade, "generation") + ", " +
	                  number_text(upgrade, "ready") + "/" + number_text(upgrade, "total_new") + " ready, " +
	                  number_text(upgrade, "drained") + "/" + number_text(upgrade, "total_old") + " drained";
	if (std::string phase = text(upgrade, "phase", ""); !phase.empty())
		out += " (" + printable(phase) + ")";
	return out;
}

std::string render_reload(const json &reload)
{
	struct Change {
		const char *key;
		const char *label;
	};
	constexpr Change kChanges[] = {
		{"added_sockets", "added sockets:     "},
		{"removed_sockets", "removed sockets:   "},
		{"added_services", "added services:    "},
		{"removed_services", "removed services:  "},
	};
	std::string out;
	for (const Change &c : kChanges) {
		std::vector<std::string> names = strings(array(reload, c.key));
		if (!names.empty())
			out += c.label + printable(join(names, ", ")) + "\n";
	}
	for (const json &change : array(reload, "changed"))
		out += change_line(change) + "\n";
	return out.empty() ? "config reloaded: nothing changed\n" : out;
}

std::string change_line(const json &change)
{
	std::string service = text(change, "service", "");
	std::string key = printable(text(change, "key", "?"));
	std::string from = text(change, "from", ""), to = text(change, "to", "");
	// env's change names variables, never values: "env: FOO added, BAR changed".
	std::string what = key == "env" && from.empty() ? key + ": " + printable(to)
	                                                 : key + " " + shown(from) + "\u2192" + shown(to);
	namespace effect = proto::names::control::config_change_when;
	std::string when = text(change, "when", "");
	std::string said = when == effect::kNow                ? "now"
	                   : when == effect::kNextUpgrade      ? "at the next upgrade"
	                   : when == effect::kNextStart        ? "at brokerd's next start"
	                   : when == effect::kNextReexec       ? "at brokerd's next reexec or start"
	                                                       : printable(when);
	return (service.empty() ? std::string("brokerd") : printable(service)) + ": " + what + ", " + said;
}

std::string render_scale(const std::string &service, const json &scale, bool done)
{
	return printable(service) + (done ? ": scaled from " : ": scaling from ") + number_text(scale, "from") + " to " +
	       number_text(scale, "to") + " instances\n";
}

std::string render_signal(const std::string &service, const std::string &signal, const json &reply)
{
	std::vector<std::string> ids = strings(array(reply, "signalled"));
	if (ids.empty())
		return printable(service) + ": no instance runs, nothing was signalled\n";
	return printable(service) + ": " + printable(signal) + " sent to " + std::to_string(ids.size()) +
	       (ids.size() == 1 ? " instance: " : " instances: ") + printable(join(ids, ", ")) + "\n";
}

std::string render_sockets(const json &sockets)
{
	Table table({"NAME", "ADDRESS", "KIND", "ORIGIN", "SERVICES", "QUEUE"});
	if (sockets.is_array()) {
		for (const json &s : sockets) {
			std::vector<std::string> users = strings(array(s, "services"));
			auto queue = integer(s, "queue");
			table.add({text(s, "name"), text(s, "address"), text(s, "kind"), text(s, "origin"),
			           users.empty() ? "-" : join(users, ","),
			           queue ? std::to_string(*queue) + "/" + number_text(s, "queue_limit") : "-"});
		}
	}
	return table.render();
}

std::string_view active_state(const json *svc)
{
	if (!svc || !svc->is_object())
		return "unknown";
	std::string state = text(*svc, "state");
	std::vector<const json *> gens = newest_first(*svc);
	if (state == service_state::kFailed)
		return kActiveFailed;
	if (state == service_state::kStopped) {
		for (const json *g : gens)
			for (const json &inst : array(*g, "instances"))
				if (text(inst, "state") == instance_state::kDraining)
					return "deactivating";
		return "inactive";
	}
	if (member(*svc, "upgrade").is_object())
		return "activating";
	if (gens.empty())
		return "inactive"; // registered workers, none registered yet
	// Every instance of the current (newest) generation ready, as many as configured.
	std::int64_t ready = 0, exited = 0;
	const json &current = array(*gens.front(), "instances");
	for (const json &inst : current) {
		std::string s = text(inst, "state");
		if (s == instance_state::kFailed)
			return kActiveFailed;
		if (s == instance_state::kReady)
			ready++;
		else if (s == instance_state::kExited)
			exited++;
		else
			return "activating";
	}
	if (ready == 0 && exited > 0 && exited == static_cast<std::int64_t>(current.size()))
		return "inactive"; // every instance exited cleanly, and none is restarted
	return ready > 0 && ready >= integer(*svc, "instances").value_or(1) ? "active" : "activating";
}

std::string render_status(const json &status, std::int64_t now_usec, const std::optional<std::string> &service)
{
	std::string out = "brokerd " + printable(text(status, "version")) + ", pid " + number_text(status, "pid");
	if (auto up = integer(status, "uptime_usec"))
		out += ", up " + format_duration(std::chrono::microseconds(*up));
	out += "\n";

	std::vector<const json *> services;
	for (const json &svc : array(status, "services"))
		if (!service || text(svc, "name") == *service)
			services.push_back(&svc);

	// For one service, only its own sockets: the addresses its section refers to by name.
	json sockets = json::array();
	std::set<std::string> wanted;
	for (const json *svc : services)
		for (const std::string &name : strings(array(*svc, "sockets")))
			wanted.insert(name);
	for (const json &s : array(status, "sockets"))
		if (!service || wanted.count(text(s, "name")))
			sockets.push_back(s);

	out += "\nSOCKETS\n" + render_sockets(sockets);

	if (services.empty() && !service)
		out += "\nno services configured\n";
	for (const json *svc : services) {
		out += '\n';
		out += render_service(*svc, now_usec);
	}
	return out;
}

std::string render_history(const json &entries, std::int64_t now_usec, std::string (*user_name)(std::int64_t uid))
{
	Table table({"GEN", "VERSION", "STARTED", "DURATION", "HOW", "RESULT", "BY", "EXEC"});
	if (!entries.is_array())
		return table.render();
	for (const json &e : entries) {
		std::int64_t started = integer(e, "started").value_or(0);
		std::int64_t until = integer(e, "ended").value_or(now_usec);
		auto uid = integer(e, "uid");
		table.add({
			number_text(e, "generation"),
			text(e, "version", ""),
			started > 0 ? format_local_time(started) : "-",
			started > 0 && until >= started ? format_duration(std::chrono::microseconds(until - started)) : "-",
			text(e, "how"),
			text(e, "result"),
			uid ? user_name(*uid) : "-",
			shell_join(strings(array(e, "exec"))),
		});
	}
	return table.render();
}

} // namespace brokerctl
