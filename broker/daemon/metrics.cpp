// The daemon's metrics.listen endpoint: bound at start (or carried over a re-exec), served by
// metrics::MetricsServer with what the Metrics method returns, closed at the stop.
#include "daemon/daemon.hpp"

#include "control/connection.hpp"
#include "daemon/state.hpp"
#include "metrics/collect.hpp"
#include "os/log.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

namespace brokerd {

std::vector<metrics::Family> Daemon::metric_families() const
{
	return metrics::collect(
	        {*supervisor_, counters_, control_->connections_by_tier(), sock_diag_.get(), journal_->dropped()});
}

void Daemon::open_metrics()
{
	if (!cfg_.metrics)
		return;
	const config::MetricsConfig &m = *cfg_.metrics;
	proto::UniqueFd fd;
	std::string address, unlink;
	// A re-exec carries the endpoint over, with what waits in its queue, when the config still
	// names it; else it is closed (at exec) and the configured one bound.
	if (!restored_.is_null() && restored_.contains("metrics") && restored_.at("metrics").contains("fd")) {
		const nlohmann::json &saved = restored_.at("metrics");
		proto::UniqueFd carried(saved.at("fd").get<int>());
		state::set_cloexec(carried.get(), true);
		if (saved.at("listen").get<std::string>() == m.socket.listen) {
			fd = std::move(carried);
			address = saved.at("address").get<std::string>();
			unlink = saved.at("unlink_path").get<std::string>();
		} else if (std::string old = saved.at("unlink_path").get<std::string>(); !old.empty()) {
			carried.reset();
			::unlink(old.c_str());
		}
	}
	if (!fd) {
		InheritedFds none;
		Listener l = open_listener(m.socket, none);
		fd = std::move(l.fd);
		address = l.address;
		unlink = l.unlink_path;
	}
	metrics::MetricsServer::Allowed allowed;
	if (m.socket.kind == config::SocketKind::Unix) {
		// Whoever may call Metrics on the control socket may GET it here.
		allowed = [this](int peer) {
			ucred cred{};
			socklen_t len = sizeof(cred);
			if (::getsockopt(peer, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
				return false;
			return access::tier_of(control_->rules(), cred.uid, peer_groups(peer), ::geteuid()) >= access::Tier::Reader;
		};
	}
	auto render = [this] { return metrics::render(metric_families()).text; };
	metrics_server_ = std::make_unique<metrics::MetricsServer>(event_.get(), std::move(fd), m.max_connections,
	                                                            std::move(allowed), std::move(render));
	metrics_listen_ = m.socket.listen;
	metrics_address_ = address;
	metrics_unlink_ = unlink;
	log::info("metrics: serving GET /metrics on " + address);
}

void Daemon::close_metrics()
{
	metrics_server_.reset();
	struct stat st{};
	if (!metrics_unlink_.empty() && ::lstat(metrics_unlink_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode))
		::unlink(metrics_unlink_.c_str());
	metrics_unlink_.clear();
}

nlohmann::json Daemon::save_metrics(std::vector<int> &keep) const
{
	nlohmann::json j = {{"counters", counters_.save()}};
	if (metrics_server_) {
		j["fd"] = metrics_server_->fd();
		j["listen"] = metrics_listen_; // what it was bound for: a reload may have changed the config since
		j["address"] = metrics_address_;
		j["unlink_path"] = metrics_unlink_;
		keep.push_back(metrics_server_->fd());
	}
	return j;
}

} // namespace brokerd
