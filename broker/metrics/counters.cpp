// Counters: the metrics that events feed.
#include "metrics/counters.hpp"

#include <algorithm>
#include <stdexcept>

namespace brokerd::metrics {

using json = nlohmann::json;

namespace {

const char *result_of(EventKind k)
{
	return k == EventKind::Done ? "done" : "rolled-back";
}

} // namespace

void Counters::observe(const Event &e)
{
	switch (e.kind) {
	case EventKind::Started:
		// The same slot started again: its process had ended, and was not drained.
		if (ended_.erase(e.instance))
			services_[e.service].restarts++;
		break;
	case EventKind::Draining:
		draining_.insert(e.instance);
		break;
	case EventKind::Exited:
	case EventKind::Failed:
		if (draining_.erase(e.instance))
			break;
		ended_[e.instance] = ++ended_seq_;
		if (ended_.size() > kMaxEnded)
			ended_.erase(std::min_element(ended_.begin(), ended_.end(),
			                              [](const auto &a, const auto &b) { return a.second < b.second; }));
		break;
	case EventKind::CrashLoop:
		ended_.erase(e.instance);
		services_[e.service].crash_loops++;
		break;
	case EventKind::Rollback:
		services_[e.service].rollbacks++;
		break;
	case EventKind::Done:
	case EventKind::RolledBack: {
		Service &s = services_[e.service];
		s.upgrades[{e.upgrade_kind.empty() ? "upgrade" : e.upgrade_kind, result_of(e.kind)}]++;
		if (e.duration)
			s.durations[result_of(e.kind)].observe(*e.duration);
		break;
	}
	default:
		break;
	}
}

json Counters::save() const
{
	json services = json::object();
	for (const auto &[name, s] : services_) {
		json upgrades = json::array();
		for (const auto &[key, n] : s.upgrades)
			upgrades.push_back({{"kind", key.first}, {"result", key.second}, {"count", n}});
		json durations = json::object();
		for (const auto &[result, h] : s.durations)
			durations[result] = {{"counts", h.counts}, {"sum", h.sum}, {"count", h.count}};
		services[name] = {{"restarts", s.restarts},
		                  {"crash_loops", s.crash_loops},
		                  {"rollbacks", s.rollbacks},
		                  {"upgrades", upgrades},
		                  {"durations", durations}};
	}
	json ended = json::array();
	for (const auto &[id, seq] : ended_)
		ended.push_back({id, seq});
	json draining = json::array();
	for (const std::string &id : draining_)
		draining.push_back(id);
	return {{"services", services}, {"ended", ended}, {"draining", draining}};
}

Counters Counters::restore(const json &j)
{
	try {
		Counters c;
		for (const auto &[name, s] : j.at("services").items()) {
			Service &out = c.services_[name];
			out.restarts = s.at("restarts").get<std::uint64_t>();
			out.crash_loops = s.at("crash_loops").get<std::uint64_t>();
			out.rollbacks = s.at("rollbacks").get<std::uint64_t>();
			for (const json &u : s.at("upgrades"))
				out.upgrades[{u.at("kind").get<std::string>(), u.at("result").get<std::string>()}] =
					u.at("count").get<std::uint64_t>();
			for (const auto &[result, h] : s.at("durations").items()) {
				Histogram &hist = out.durations[result];
				hist.counts = h.at("counts").get<decltype(hist.counts)>();
				hist.sum = h.at("sum").get<usec_t>();
				hist.count = h.at("count").get<std::uint64_t>();
			}
		}
		for (const json &e : j.at("ended")) {
			std::uint64_t seq = e.at(1).get<std::uint64_t>();
			c.ended_[e.at(0).get<std::string>()] = seq;
			c.ended_seq_ = std::max(c.ended_seq_, seq);
		}
		for (const json &id : j.at("draining"))
			c.draining_.insert(id.get<std::string>());
		return c;
	} catch (const json::exception &e) {
		throw std::runtime_error(std::string("re-exec state: metrics: ") + e.what());
	}
}

} // namespace brokerd::metrics
