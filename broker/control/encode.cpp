// The encoder: typed events, snapshots and refusals as Varlink JSON.
#include "control/encode.hpp"

#include "proto/errors.hpp"
#include "proto/limits.hpp"
#include "proto/names.hpp"
#include "proto/varlink.hpp"
#include "os/socket_stats.hpp"

#include <algorithm>

namespace brokerd::encode {

using json = nlohmann::json;

namespace control_names = proto::names::control;
namespace progress_names = control_names::progress_event;
namespace watch_names = control_names::watch_event;
namespace worker_names = proto::names::worker::events_event;

// An instance's events, and an upgrade's rollback, done and handoff, go to Watch streams and to
// the upgrade's callers under one name, which both lists of io.brokerd.Control.varlink declare.
// The supervisor's names of an env change are the wire's.
namespace env_change_names = control_names::env_change_change;
static_assert(std::string_view(EnvChange::kNames[0]) == env_change_names::kAdded &&
              std::string_view(EnvChange::kNames[1]) == env_change_names::kRemoved &&
              std::string_view(EnvChange::kNames[2]) == env_change_names::kChanged);

static_assert(progress_names::kStarted == watch_names::kStarted &&
              progress_names::kReady == watch_names::kReady &&
              progress_names::kDraining == watch_names::kDraining &&
              progress_names::kExited == watch_names::kExited &&
              progress_names::kFailed == watch_names::kFailed &&
              progress_names::kCrashLoop == watch_names::kCrashLoop &&
              progress_names::kRollback == watch_names::kRollback &&
              progress_names::kDone == watch_names::kDone &&
              progress_names::kHandoff == watch_names::kHandoff);

std::string_view event_name(EventKind kind)
{
	switch (kind) {
	case EventKind::Started:
		return watch_names::kStarted;
	case EventKind::Ready:
		return watch_names::kReady;
	case EventKind::Draining:
		return watch_names::kDraining;
	case EventKind::Exited:
		return watch_names::kExited;
	case EventKind::Failed:
		return watch_names::kFailed;
	case EventKind::CrashLoop:
		return watch_names::kCrashLoop;
	case EventKind::Upgrade:
		return watch_names::kUpgrade;
	case EventKind::Accepted:
		return progress_names::kAccepted;
	case EventKind::Rollback:
		return watch_names::kRollback;
	case EventKind::Done:
		return watch_names::kDone;
	case EventKind::RolledBack:
		return watch_names::kRolledBack;
	case EventKind::Start:
		return watch_names::kStart;
	case EventKind::Stop:
		return watch_names::kStop;
	case EventKind::Handoff:
		return watch_names::kHandoff;
	case EventKind::Reload:
		return watch_names::kReload;
	case EventKind::Reexec:
		return watch_names::kReexec;
	case EventKind::Shutdown:
		return watch_names::kShutdown;
	}
	return "unknown";
}

std::string_view instance_state(InstanceState s)
{
	namespace state = control_names::instance_state;
	switch (s) {
	case InstanceState::Starting:
	case InstanceState::Restarting: // on its way up, as far as anyone watching can tell
		return state::kStarting;
	case InstanceState::Ready:
		return state::kReady;
	case InstanceState::Draining:
		return state::kDraining;
	case InstanceState::Exited:
		return state::kExited;
	case InstanceState::Failed:
		break;
	}
	return state::kFailed;
}

std::string_view phase(RolloutPhase p)
{
	namespace phase = control_names::upgrade_info_phase;
	switch (p) {
	case RolloutPhase::Rolling:
		return phase::kRolling;
	case RolloutPhase::RollingBack:
		return phase::kRollingBack;
	case RolloutPhase::Done:
		return phase::kDone;
	case RolloutPhase::RolledBack:
		break;
	}
	return phase::kRolledBack;
}

json handoff(const HandoffTotals &h)
{
	return {{"handed", h.counts.handed},
	        {"received", h.counts.received},
	        {"returned", h.counts.returned},
	        {"expected", h.expected}};
}

json upgrade(const UpgradeSnapshot &u)
{
	return {{"generation", u.generation},
	        {"from", u.from},
	        {"phase", phase(u.phase)},
	        {"started", u.started},
	        {"ready", u.ready},
	        {"drained", u.drained},
	        {"total_new", u.total_new},
	        {"total_old", u.total_old},
	        {"handoff", handoff(u.handoff)}};
}

static std::string_view service_state_name(ServiceState s)
{
	namespace state = control_names::service_info_state;
	switch (s) {
	case ServiceState::Stopped:
		return state::kStopped;
	case ServiceState::Failed:
		return state::kFailed;
	case ServiceState::Running:
		break;
	}
	return state::kRunning;
}

// What a line takes inside the reply's JSON text, at most: a control byte is written "\u00XX",
// a quote or backslash escaped, a byte past ASCII may become U+FFFD (three bytes) if it is not
// UTF-8. A worker's output is whatever it wrote.
static std::size_t json_size(const std::string &line)
{
	std::size_t n = 0;
	for (unsigned char c : line)
		n += c < 0x20 ? 6 : c == '"' || c == '\\' ? 2 : c >= 0x80 ? 3 : 1;
	return n;
}

// An instance's last lines for Status: the newest that fit in limits::kMaxStatusOutput bytes as
// written and in what is left of the reply's `budget` (limits::kMaxStatusOutputTotal) as the
// reply writes them, which they use up: however they are made, they keep the reply small.
static json last_output(const std::deque<std::string> &lines, std::size_t &budget)
{
	std::size_t bytes = 0, encoded = 0;
	auto first = lines.end();
	while (first != lines.begin()) {
		const std::string &line = *std::prev(first);
		std::size_t size = json_size(line);
		if (bytes + line.size() > proto::limits::kMaxStatusOutput || encoded + size > budget)
			break;
		bytes += line.size();
		encoded += size;
		--first;
	}
	budget -= encoded;
	return json(std::vector<std::string>(first, lines.end()));
}

static json instance(const Instance &inst, std::size_t &output_budget)
{
	json i = {{"id", inst.id},
	          {"index", inst.index},
	          {"pid", inst.pid},
	          {"state", instance_state(inst.state)},
	          {"since", inst.since},
	          {"restarts", inst.restarts}};
	// Why its last process ended, while it has none.
	if (inst.state == InstanceState::Exited || inst.state == InstanceState::Failed ||
	    inst.state == InstanceState::Restarting) {
		if (!inst.exit_reason.empty())
			i["exit_reason"] = inst.exit_reason;
		i["output"] = last_output(inst.last_lines, output_budget);
	}
	if (!inst.status_text.empty())
		i["status"] = inst.status_text;
	if (!inst.handoff.empty())
		i["handoff"] = {{"handed", inst.handoff.handed},
		                {"received", inst.handoff.received},
		                {"returned", inst.handoff.returned}};
	return i;
}

static json service(const Service &svc, std::size_t &output_budget)
{
	json gens = json::array();
	for (const auto &gen : svc.generations) {
		if (gen->instances.empty() && gen.get() != svc.current)
			continue;
		json insts = json::array();
		for (const auto &inst : gen->instances)
			insts.push_back(instance(*inst, output_budget));
		json env = json::array();
		for (const EnvChange &c : gen->env)
			env.push_back({{"name", c.name}, {"change", EnvChange::name_of(c.kind)}});
		gens.push_back({{"number", gen->number},
		                {"version", gen->cfg.version},
		                {"exec", gen->cfg.exec},
		                {"started", gen->started},
		                {"env", std::move(env)},
		                {"instances", std::move(insts)}});
	}
	json s = {{"name", svc.name},
	          {"sockets", svc.cfg.sockets},
	          {"ready", config::ready_name(svc.cfg.ready)},
	          {"state", service_state_name(service_state(svc))},
	          {"instances", svc.current ? svc.current->cfg.instances : svc.cfg.instances},
	          {"generations", std::move(gens)}};
	if (svc.upgrade)
		s["upgrade"] = upgrade(snapshot(*svc.upgrade));
	if (svc.scaled && *svc.scaled != svc.cfg.instances)
		s["scaled"] = true;
	if (!svc.handoff.empty())
		s["handoff"] = handoff(handoff_totals(svc, svc.handoff));
	return s;
}

json recovery(const Supervisor::Recovery &r)
{
	if (!r.crashed_pid)
		return nullptr;
	return {{"crashed_pid", r.crashed_pid},
	        {"at", r.at},
	        {"kept", r.kept},
	        {"lost", r.lost},
	        {"drained", r.drained},
	        {"interrupted", r.interrupted},
	        {"in_doubt",
	         {{"batches", r.doubt_batches},
	          {"connections", r.doubt_connections},
	          {"landed", r.doubt_landed},
	          {"returned", r.doubt_returned},
	          {"abandoned", r.doubt_abandoned},
	          {"pending", r.doubt_pending}}}};
}

json sockets(const Supervisor &supervisor, int diag_fd)
{
	json out = json::array();
	for (const Listener &l : supervisor.listeners()) {
		json users = json::array();
		for (const auto &svc : supervisor.services())
			if (std::find(svc->cfg.sockets.begin(), svc->cfg.sockets.end(), l.name) != svc->cfg.sockets.end())
				users.push_back(svc->name);
		json s = {{"name", l.name},
		          {"address", l.address},
		          {"kind", l.kind},
		          {"origin", l.origin},
		          {"services", std::move(users)}};
		QueueStats q = queue_stats(l.fd.get(), diag_fd);
		if (q.length)
			s["queue"] = *q.length;
		if (q.limit)
			s["queue_limit"] = *q.limit;
		out.push_back(std::move(s));
	}
	return out;
}

json services(const Supervisor &supervisor, const std::string *only)
{
	json out = json::array();
	std::size_t output_budget = proto::limits::kMaxStatusOutputTotal;
	for (const auto &svc : supervisor.services())
		if (!only || svc->name == *only)
			out.push_back(service(*svc, output_budget));
	if (only && out.empty())
		return nullptr;
	return out;
}

// What Watch events and progress steps say alike of an upgrade's end: its kind, and how long it
// took in microseconds.
static void upgrade_end(json &j, const Event &e)
{
	if (!e.upgrade_kind.empty())
		j["kind"] = e.upgrade_kind;
	if (e.duration)
		j["duration_usec"] = *e.duration;
}

static json change(const config::Change &c)
{
	namespace when = control_names::config_change_when;
	std::string_view name = when::kNextUpgrade;
	switch (c.when) {
	case config::Effect::Now:
		name = when::kNow;
		break;
	case config::Effect::NextStart:
		name = when::kNextStart;
		break;
	case config::Effect::NextReexec:
		name = when::kNextReexec;
		break;
	case config::Effect::NextUpgrade:
		break;
	}
	return {{"service", c.service}, {"key", c.key}, {"from", c.from}, {"to", c.to}, {"when", name}};
}

json changes(const std::vector<config::Change> &list)
{
	json out = json::array();
	for (const auto &c : list)
		out.push_back(change(c));
	return out;
}

json watch_event(const Event &e)
{
	json j = {{"event", event_name(e.kind)}, {"time", e.time}};
	if (!e.service.empty())
		j["service"] = e.service;
	if (e.generation)
		j["generation"] = *e.generation;
	if (!e.instance.empty()) {
		j["instance"] = e.instance;
		j["state"] = instance_state(e.state);
	}
	if (!e.instance.empty() || e.kind == EventKind::Reexec)
		j["pid"] = e.pid;
	if (!e.version.empty())
		j["version"] = e.version;
	if (!e.message.empty())
		j["message"] = e.message;
	if (e.handoff)
		j["handoff"] = handoff(*e.handoff);
	upgrade_end(j, e);
	if (e.kind == EventKind::Reload)
		j["changed"] = changes(e.changes);
	return j;
}

json progress(const Event &e)
{
	json j = {{"event", event_name(e.kind)}, {"time", e.time}, {"service", e.service}};
	if (e.upgrade) {
		j["generation"] = e.upgrade->generation;
		j["upgrade"] = upgrade(*e.upgrade);
	}
	if (!e.instance.empty()) {
		j["instance"] = e.instance;
		j["pid"] = e.pid;
	}
	if (!e.message.empty())
		j["message"] = e.message;
	upgrade_end(j, e);
	return j;
}

json drain(std::uint64_t timeout_ms)
{
	return {{"event", worker_names::kDrain}, {"timeout_ms", timeout_ms}};
}

json connections(std::uint64_t batch, std::vector<HandoffItem> items, std::vector<proto::UniqueFd> &fds,
                 const HandoffOrigin &origin)
{
	json conns = json::array();
	fds.reserve(fds.size() + items.size());
	for (auto &item : items) {
		json conn = {{"fd", fds.size()}};
		if (!item.state.empty())
			conn["state"] = std::move(item.state);
		conns.push_back(std::move(conn));
		fds.push_back(std::move(item.fd));
	}
	json event = {{"event", worker_names::kConnections}, {"batch", batch}, {"connections", std::move(conns)}};
	if (!origin.instance.empty())
		event["origin"] = {{"instance", origin.instance},
		                   {"pid", origin.pid},
		                   {"batch", origin.batch},
		                   {"first", origin.first}};
	return event;
}

json handoff_result(const HandoffResult &r)
{
	json event = {{"event", worker_names::kHandoff}, {"batch", r.batch}, {"landed", r.landed}, {"returned", r.returned}};
	if (!r.abandoned.empty())
		event["abandoned"] = r.abandoned;
	if (!r.why.empty())
		event["message"] = r.why;
	return event;
}

namespace {

json peer_entry(HandoffPeer &end, std::vector<proto::UniqueFd> &fds)
{
	json j = {{"instance", end.instance}, {"pid", end.pid}, {"fd", fds.size()}};
	fds.push_back(std::move(end.end));
	return j;
}

} // namespace

json peers(std::vector<HandoffPeer> ends, std::vector<proto::UniqueFd> &fds)
{
	json list = json::array();
	for (HandoffPeer &end : ends)
		list.push_back(peer_entry(end, fds));
	return {{"event", worker_names::kPeers}, {"peers", std::move(list)}};
}

json peer(HandoffPeer end, std::vector<proto::UniqueFd> &fds)
{
	return {{"event", worker_names::kPeer}, {"peer", peer_entry(end, fds)}};
}

json history(const History &history)
{
	json entries = json::array();
	for (const HistoryRecord &r : history.records()) {
		json e = {{"generation", r.generation},
		          {"version", r.cfg.version},
		          {"exec", r.cfg.exec},
		          {"started", r.started},
		          {"how", origin_name(r.how)},
		          {"result", result_name(r.result)}};
		if (r.ended)
			e["ended"] = r.ended;
		if (r.by)
			e["uid"] = *r.by;
		entries.push_back(std::move(e));
	}
	return entries;
}

std::pair<std::string_view, json> refusal(const Refusal &r)
{
	using K = Refusal::Kind;
	json p = json::object();
	auto with_service = [&] { p["service"] = r.service; };
	switch (r.kind) {
	case K::PermissionDenied:
		if (!r.message.empty())
			p["message"] = r.message;
		return {proto::varlink::kPermissionDenied, p};
	case K::InvalidConfig:
		p["message"] = r.message;
		return {proto::errors::kInvalidConfig, p};
	case K::UpgradeInProgress:
		with_service();
		p["generation"] = r.generation.value_or(0);
		return {proto::errors::kUpgradeInProgress, p};
	case K::NoUpgradeInProgress:
		with_service();
		return {proto::errors::kNoUpgradeInProgress, p};
	case K::NoPreviousGeneration:
		with_service();
		return {proto::errors::kNoPreviousGeneration, p};
	case K::ServiceStopped:
		with_service();
		return {proto::errors::kServiceStopped, p};
	case K::RegisteredService:
		with_service();
		return {proto::errors::kRegisteredService, p};
	case K::UpgradeFailed:
		with_service();
		p["generation"] = r.generation.value_or(0);
		p["reason"] = r.reason;
		p["output"] = r.output;
		if (!r.instance.empty())
			p["instance"] = r.instance;
		return {proto::errors::kUpgradeFailed, p};
	case K::StartFailed:
		with_service();
		p["reason"] = r.reason;
		return {proto::errors::kStartFailed, p};
	}
	return {proto::varlink::kPermissionDenied, p};
}

} // namespace brokerd::encode
