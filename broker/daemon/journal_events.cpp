// brokerd's own events as journal records: which events, their MESSAGE_IDs, texts and fields.
#include "daemon/journal_events.hpp"

#include "os/journal_ids.hpp"

#include <cstdio>

namespace brokerd {

namespace {

std::string gen(std::optional<std::uint64_t> g)
{
	return g ? std::to_string(*g) : std::string("-");
}

std::string seconds(usec_t d)
{
	char took[32];
	std::snprintf(took, sizeof(took), "%.2fs", static_cast<double>(d) / 1e6);
	return took;
}

} // namespace

std::vector<log::EventRecord> EventJournal::records(const Event &e, std::optional<std::uint64_t> from,
                                                    std::optional<uid_t> by)
{
	using log::Level;
	namespace ids = journal::ids;
	std::vector<log::EventRecord> out;
	auto service_record = [&](std::string_view id, Level level, std::string message, const Open &o) {
		log::EventRecord r{id, level, e.service + ": " + message, {}};
		r.fields.emplace_back("BROKER_SERVICE", e.service);
		if (o.to)
			r.fields.emplace_back("BROKER_GENERATION", std::to_string(*o.to));
		if (o.from)
			r.fields.emplace_back("BROKER_FROM_GENERATION", std::to_string(*o.from));
		if (!o.kind.empty())
			r.fields.emplace_back("BROKER_UPGRADE_KIND", o.kind);
		if (o.by)
			r.fields.emplace_back("BROKER_REQUESTED_UID", std::to_string(*o.by));
		return r;
	};
	switch (e.kind) {
	case EventKind::Upgrade: {
		Open &o = open_[e.service] =
		        Open{from, e.generation, e.upgrade_kind.empty() ? "upgrade" : e.upgrade_kind, {}, by};
		out.push_back(service_record(ids::kUpgradeStarted, Level::Notice,
		                             o.kind + " from gen " + gen(o.from) + " to gen " + gen(o.to) + " started", o));
		break;
	}
	case EventKind::Handoff:
		if (e.handoff)
			open_[e.service].handoff = e.handoff->counts;
		break;
	case EventKind::Rollback: {
		Open &o = open_[e.service];
		if (!o.to)
			o.to = e.generation;
		out.push_back(service_record(ids::kUpgradeFailed, Level::Warning,
		                             (o.kind.empty() ? "upgrade" : o.kind) + " to gen " + gen(o.to) + " failed (" +
		                                     e.message + "), rolling back",
		                             o));
		out.back().fields.emplace_back("BROKER_RESULT", "failed");
		break;
	}
	case EventKind::Done:
	case EventKind::RolledBack: {
		auto it = open_.find(e.service);
		Open o = it != open_.end() ? it->second : Open{};
		if (it != open_.end())
			open_.erase(it);
		if (!e.upgrade_kind.empty())
			o.kind = e.upgrade_kind;
		bool done = e.kind == EventKind::Done;
		if (!o.to && done)
			o.to = e.generation;
		std::string what = (o.kind.empty() ? "upgrade" : o.kind) + " to gen " + gen(o.to);
		std::string message = done ? what + " done" : what + " rolled back to gen " + gen(o.from ? o.from : e.generation);
		if (e.duration)
			message += " in " + seconds(*e.duration);
		if (!done && !e.message.empty())
			message += ": " + e.message;
		out.push_back(service_record(done ? ids::kUpgradeDone : ids::kUpgradeRolledBack,
		                             done ? Level::Notice : Level::Warning, message, o));
		out.back().fields.emplace_back("BROKER_RESULT", done ? "done" : "rolled-back");
		if (e.duration)
			out.back().fields.emplace_back("BROKER_DURATION_USEC", std::to_string(*e.duration));
		if (!o.handoff.empty()) {
			const HandoffCounts &c = o.handoff;
			out.push_back(service_record(ids::kHandoffSummary, Level::Info,
			                             what + ": " + std::to_string(c.handed) + " connection(s) handed off, " +
			                                     std::to_string(c.received) + " received, " +
			                                     std::to_string(c.returned) + " returned",
			                             o));
			out.back().fields.emplace_back("BROKER_HANDED", std::to_string(c.handed));
			out.back().fields.emplace_back("BROKER_RECEIVED", std::to_string(c.received));
			out.back().fields.emplace_back("BROKER_RETURNED", std::to_string(c.returned));
		}
		break;
	}
	case EventKind::CrashLoop: {
		log::EventRecord r{ids::kCrashLoop, Level::Error, "instance " + e.instance + ": " + e.message, {}};
		r.fields.emplace_back("BROKER_SERVICE", e.service);
		r.fields.emplace_back("BROKER_INSTANCE", e.instance);
		r.fields.emplace_back("BROKER_GENERATION", gen(e.generation));
		out.push_back(std::move(r));
		break;
	}
	default:
		break;
	}
	return out;
}

log::EventRecord reload_record(std::string_view config_path)
{
	return {journal::ids::kReload, log::Level::Notice, "reloaded " + std::string(config_path), {}};
}

log::EventRecord reexec_record(std::string_view version, std::size_t services, std::size_t connections)
{
	log::EventRecord r{journal::ids::kReexec, log::Level::Notice,
	                   "re-executed: brokerd " + std::string(version) + " carries on with " + std::to_string(services) +
	                           " service(s), " + std::to_string(connections) + " worker connection(s)",
	                   {}};
	r.fields.emplace_back("BROKER_VERSION", std::string(version));
	return r;
}

log::EventRecord shutdown_record(std::string_view signal, usec_t budget)
{
	log::EventRecord r{journal::ids::kShutdown, log::Level::Notice,
	                   "received " + std::string(signal) + ", shutting down within " + seconds(budget), {}};
	r.fields.emplace_back("BROKER_TIMEOUT_USEC", std::to_string(budget));
	return r;
}

} // namespace brokerd
