// Metrics collection: the supervisor's services and instances, the counters, the listeners'
// queues, the control connections and the process.
#include "metrics/collect.hpp"

#include "broker_config.h"
#include "control/access.hpp"
#include "control/encode.hpp"
#include "os/process_stats.hpp"
#include "os/socket_stats.hpp"
#include "supervisor/supervisor.hpp"

#include <map>

namespace brokerd::metrics {

namespace {

Family family(std::string name, std::string help, Type type)
{
	return Family{std::move(name), std::move(help), type, {}};
}

void add(Family &f, Labels labels, double value)
{
	f.samples.push_back({"", std::move(labels), value});
}

double number(std::uint64_t n)
{
	return static_cast<double>(n);
}

void service_families(std::vector<Family> &out, const Supervisor &sup)
{
	Family services = family("brokerd_services", "Services by state.", Type::Gauge);
	Family instances = family("brokerd_instances", "Instances of each service by state, in every generation.", Type::Gauge);
	Family generation = family("brokerd_service_generation", "The generation serving each service.", Type::Gauge);
	Family upgrading = family("brokerd_service_upgrade_in_progress",
	                          "1 while an upgrade, rollback, restart or takeover of the service runs.", Type::Gauge);
	std::map<ServiceState, unsigned> by_state;
	for (const auto &svc : sup.services()) {
		by_state[service_state(*svc)]++;
		std::map<std::string_view, unsigned> states;
		for (InstanceState s : {InstanceState::Starting, InstanceState::Ready, InstanceState::Draining,
		                        InstanceState::Exited, InstanceState::Failed})
			states[encode::instance_state(s)] = 0;
		for (const auto &gen : svc->generations)
			for (const auto &inst : gen->instances)
				states[encode::instance_state(inst->state)]++;
		for (const auto &[state, n] : states)
			add(instances, {{"service", svc->name}, {"state", std::string(state)}}, n);
		if (svc->current)
			add(generation, {{"service", svc->name}}, number(svc->current->number));
		add(upgrading, {{"service", svc->name}}, svc->upgrade ? 1 : 0);
	}
	add(services, {{"state", "running"}}, by_state[ServiceState::Running]);
	add(services, {{"state", "stopped"}}, by_state[ServiceState::Stopped]);
	add(services, {{"state", "failed"}}, by_state[ServiceState::Failed]);
	out.push_back(std::move(services));
	out.push_back(std::move(instances));
	out.push_back(std::move(generation));
	out.push_back(std::move(upgrading));
}

void counter_families(std::vector<Family> &out, const Supervisor &sup, const Counters &counters)
{
	Family restarts = family("brokerd_instance_restarts_total",
	                         "Instance slots started again after their process ended.", Type::Counter);
	Family loops = family("brokerd_crash_loops_total", "Instance slots that stopped restarting: a crash loop.",
	                      Type::Counter);
	Family upgrades = family("brokerd_upgrades_total",
	                         "Upgrades, rollbacks, restarts and takeovers that ended, by kind and result.", Type::Counter);
	Family durations = family("brokerd_upgrade_duration_seconds", "How long upgrades took, by result.", Type::Histogram);
	Family rollbacks = family("brokerd_rollbacks_total", "Upgrades that failed or were aborted and turned back.",
	                          Type::Counter);
	// Every configured service has its series from the start (a counter at 0), and one that is gone
	// keeps its counts.
	std::map<std::string, Counters::Service> all = counters.services();
	for (const auto &svc : sup.services())
		all[svc->name];
	for (const auto &[name, s] : all) {
		add(restarts, {{"service", name}}, number(s.restarts));
		add(loops, {{"service", name}}, number(s.crash_loops));
		add(rollbacks, {{"service", name}}, number(s.rollbacks));
		for (const auto &[key, n] : s.upgrades)
			add(upgrades, {{"service", name}, {"kind", key.first}, {"result", key.second}}, number(n));
		for (const auto &[result, h] : s.durations)
			h.append_to(durations, {{"service", name}, {"result", result}});
	}
	out.push_back(std::move(restarts));
	out.push_back(std::move(loops));
	out.push_back(std::move(upgrades));
	out.push_back(std::move(durations));
	out.push_back(std::move(rollbacks));
}

void handoff_families(std::vector<Family> &out, const Supervisor &sup)
{
	Family handed = family("brokerd_handoff_handed_connections_total",
	                       "Connections draining instances handed on (received plus returned).", Type::Counter);
	Family received = family("brokerd_handoff_received_connections_total",
	                         "Handed connections their successors took.", Type::Counter);
	Family returned = family("brokerd_handoff_returned_connections_total",
	                         "Handed connections that went back to their sender.", Type::Counter);
	Family channels = family("brokerd_handoff_channels_total",
	                         "Direct handoff channels made between a sender and a receiver.", Type::Counter);
	for (const auto &svc : sup.services()) {
		add(channels, {{"service", svc->name}}, number(svc->handoff_channels));
		add(handed, {{"service", svc->name}}, number(svc->handoff.handed));
		add(received, {{"service", svc->name}}, number(svc->handoff.received));
		add(returned, {{"service", svc->name}}, number(svc->handoff.returned));
	}
	Family abandoned = family("brokerd_handoff_abandoned_connections_total",
	                          "Connections in flight at a crash of brokerd that no instance claimed in time.",
	                          Type::Counter);
	add(abandoned, {}, number(sup.recovery().doubt_abandoned));
	out.push_back(std::move(channels));
	out.push_back(std::move(handed));
	out.push_back(std::move(received));
	out.push_back(std::move(returned));
	out.push_back(std::move(abandoned));
}

void listener_families(std::vector<Family> &out, const Supervisor &sup, int diag_fd)
{
	Family length = family("brokerd_listener_accept_queue_length",
	                       "Connections waiting in a listener's accept queue (TCP and unix stream).", Type::Gauge);
	Family limit = family("brokerd_listener_accept_queue_limit", "The most a listener's accept queue holds.",
	                      Type::Gauge);
	Family drops = family("brokerd_listener_drops_total",
	                      "Packets the kernel dropped for a socket: handshakes past a full accept queue (TCP), "
	                      "datagrams past a full buffer (UDP).",
	                      Type::Counter);
	for (const Listener &l : sup.listeners()) {
		QueueStats q = queue_stats(l.fd.get(), diag_fd);
		if (q.length)
			add(length, {{"socket", l.name}}, *q.length);
		if (q.limit)
			add(limit, {{"socket", l.name}}, *q.limit);
		if (q.drops)
			add(drops, {{"socket", l.name}}, number(*q.drops));
	}
	out.push_back(std::move(length));
	out.push_back(std::move(limit));
	out.push_back(std::move(drops));
}

void process_families(std::vector<Family> &out)
{
	auto p = process_stats();
	if (!p)
		return;
	auto one = [&](const char *name, const char *help, Type type, double value) {
		Family f = family(name, help, type);
		add(f, {}, value);
		out.push_back(std::move(f));
	};
	one("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", Type::Counter, p->cpu_seconds);
	one("process_resident_memory_bytes", "Resident memory size in bytes.", Type::Gauge, number(p->resident_bytes));
	one("process_virtual_memory_bytes", "Virtual memory size in bytes.", Type::Gauge, number(p->virtual_bytes));
	one("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", Type::Gauge,
	    p->start_time_seconds);
	one("process_open_fds", "Number of open file descriptors.", Type::Gauge, number(p->open_fds));
	one("process_max_fds", "Maximum number of open file descriptors.", Type::Gauge, number(p->max_fds));
}

} // namespace

std::vector<Family> collect(const Sources &sources)
{
	std::vector<Family> out;
	Family build = family("brokerd_build_info", "brokerd's version; always 1.", Type::Gauge);
	add(build, {{"version", BROKER_VERSION}}, 1);
	out.push_back(std::move(build));
	service_families(out, sources.supervisor);
	counter_families(out, sources.supervisor, sources.counters);
	handoff_families(out, sources.supervisor);
	listener_families(out, sources.supervisor, sources.diag_fd);
	Family control = family("brokerd_control_connections", "Connections to the control socket, by the caller's tier.",
	                        Type::Gauge);
	for (access::Tier t : {access::Tier::Root, access::Tier::Admin, access::Tier::Reader, access::Tier::Worker})
		add(control, {{"role", access::tier_name(t)}}, number(sources.connections[static_cast<std::size_t>(t)]));
	out.push_back(std::move(control));
	Family dropped = family("brokerd_journal_dropped_messages_total",
	                        "Messages for the journal that brokerd dropped while the journal did not read: its own "
	                        "events, and the last lines of workers' ended pipes.",
	                        Type::Counter);
	add(dropped, {}, number(sources.journal_dropped));
	out.push_back(std::move(dropped));
	process_families(out);
	return out;
}

} // namespace brokerd::metrics
