// Human views of io.brokerd.Control replies (see render.hpp).
#include "render.hpp"

#include "format.hpp"
#include "reply.hpp"

#include <algorithm>
#include <set>

namespace brokerctl {

using json = nlohmann::json;

namespace {

std::vector<std::string> strings(const json &list)
{
	std::vector<std::string> out;
	for (const json &v : list)
		out.push_back(v.is_string() ? v.get<std::string>() : "?");
	return out;
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

std::string render_service(const json &svc, std::int64_t now_usec)
{
	std::vector<std::string> sockets = strings(array(svc, "sockets"));

	// Newest generation first: during an upgrade it is the one being rolled out.
	std::vector<const json *> gens;
	for (const json &g : array(svc, "generations"))
		gens.push_back(&g);
	std::stable_sort(gens.begin(), gens.end(), [](const json *a, const json *b) {
		return integer(*a, "number").value_or(0) > integer(*b, "number").value_or(0);
	});

	std::vector<std::string> gen_list;
	for (const json *g : gens) {
		std::string version = text(*g, "version", "");
		gen_list.push_back(number_text(*g, "number") + (version.empty() ? "" : " (version " + version + ")"));
	}

	std::string out = "SERVICE " + printable(text(svc, "name")) + "\n";
	out += "  sockets:      " + printable(sockets.empty() ? "-" : join(sockets, ", ")) + "\n";
	out += "  ready:        " + printable(text(svc, "ready")) + "\n";
	out += "  state:        " + printable(text(svc, "state")) + "\n";
	out += "  generations:  " + printable(gen_list.empty() ? "none" : join(gen_list, ", ")) + "\n";
	if (const json &up = member(svc, "upgrade"); up.is_object())
		out += "  upgrade:      " + render_upgrade_info(up) + "\n";
	if (const json &h = member(svc, "handoff"); h.is_object())
		out += "  handoff:      " + number_text(h, "handed") + " handed, " + number_text(h, "received") + " received, " +
		       number_text(h, "returned") + " returned\n";
	if (!gens.empty()) {
		std::vector<std::string> argv = strings(array(*gens.front(), "exec"));
		out += "  exec:         " + printable(argv.empty() ? "-" : shell_join(argv)) + "\n";
	}

	Table instances({"ID", "GEN", "PID", "STATE", "SINCE", "STATUS"});
	for (const json *g : gens) {
		for (const json &inst : array(*g, "instances")) {
			auto pid = integer(inst, "pid");
			instances.add({
				text(inst, "id"),
				number_text(*g, "number"),
				pid && *pid > 0 ? std::to_string(*pid) : "-",
				text(inst, "state"),
				format_ago(integer(inst, "since").value_or(0), now_usec),
				text(inst, "status", ""),
			});
		}
	}
	out += "  INSTANCES\n";
	out += instances.render("  ");
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
	return out.empty() ? "config reloaded: no sockets or services added or removed\n" : out;
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
	Table table({"NAME", "ADDRESS", "KIND", "ORIGIN"});
	if (sockets.is_array()) {
		for (const json &s : sockets)
			table.add({text(s, "name"), text(s, "address"), text(s, "kind"), text(s, "origin")});
	}
	return table.render();
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

} // namespace brokerctl
