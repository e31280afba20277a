// The control socket and its connections across a re-exec: saved by one brokerd, restored by the next.
#include "control/connection.hpp"

#include "broker_config.h"
#include "proto/handoff.hpp"
#include "daemon/state.hpp"

#include <unistd.h>

#include <stdexcept>

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

json ControlServer::Connection::save(int caller, std::vector<int> &keep_fds) const
{
	if (dead_)
		return nullptr;
	std::string in, out;
	if (!stream_.save(in, out))
		throw std::runtime_error("the control connection of " + who() + " has fds in flight");
	keep_fds.push_back(stream_.fd());
	Instance *inst = token_.empty() ? nullptr : server_.supervisor_.find_by_token(token_);
	json j = {{"fd", stream_.fd()},
	          {"token", token_},
	          {"events", inst && inst->events == this},
	          {"in", proto::handoff::base64_encode(in)},
	          {"out", proto::handoff::base64_encode(out)},
	          {"caller", stream_.fd() == caller},
	          {"connected", connected_}};
	if (watching_)
		j["watch"] = watch_service_;
	return j;
}

void ControlServer::Connection::restore(const json &j)
{
	auto in = proto::handoff::base64_decode(j.at("in").get<std::string>());
	auto out = proto::handoff::base64_decode(j.at("out").get<std::string>());
	stream_.restore(in ? std::move(*in) : std::string(), out ? std::move(*out) : std::string());
	token_ = j.at("token").get<std::string>();
	connected_ = j.value("connected", connected_); // a Hello still to come checks against it
	if (!token_.empty()) {
		idle_.reset();
		stream_.set_max_queued_fds(proto::limits::kMaxQueuedFds);
		Instance *inst = server_.supervisor_.find_by_token(token_);
		if (inst && j.at("events").get<bool>()) {
			server_.supervisor_.attach_events(*inst, this);
			instance_conn_ = true;
			spawned_instance_ = !inst->registered();
		}
	}
	if (j.at("caller").get<bool>()) {
		// The answer to the Reexec call, from the brokerd it asked for.
		reply({{"version", BROKER_VERSION}, {"pid", ::getpid()}});
	}
	if (j.contains("watch")) {
		// A Watch stream goes on: later calls on it keep waiting their turn.
		watching_ = true;
		waiting_ = true;
		watch_service_ = j.at("watch").get<std::string>();
	}
	apply_limits();
	update_events();
	schedule_resume();
}

json ControlServer::save_state(int caller, std::vector<int> &keep_fds)
{
	json conns = json::array();
	for (const auto &c : connections_) {
		json j = c->save(caller, keep_fds);
		if (!j.is_null())
			conns.push_back(std::move(j));
	}
	keep_fds.push_back(fd_.get());
	return {{"fd", fd_.get()}, {"adopted", adopted_}, {"unlink_path", unlink_path_}, {"connections", std::move(conns)}};
}

void ControlServer::restore_state(const json &state)
{
	adopted_ = state.at("adopted").get<bool>();
	unlink_path_ = state.at("unlink_path").get<std::string>();
	for (const json &j : state.at("connections")) {
		proto::UniqueFd fd = proto::UniqueFd::from_peer(j.at("fd").get<int>());
		state::set_cloexec(fd.get(), true);
		auto conn = std::make_unique<Connection>(*this, std::move(fd));
		if (!conn->start()) {
			// Lost like any connection that closes: a registered worker counts as gone.
			if (std::string token = j.at("token").get<std::string>(); !token.empty())
				supervisor_.connection_closed(token);
			continue;
		}
		conn->restore(j);
		connections_.push_back(std::move(conn));
	}
}

} // namespace brokerd
