// brokerctl's link to brokerd: Varlink calls on the control socket, every failure already
// turned into a brokerctl::Failure with its exit code.
#pragma once

#include "remote.hpp"

#include "proto/sync_client.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace brokerctl {

// How long to wait for each reply. Upgrades, drains and starts take as long as the workers do,
// and the broker bounds them with its own start and drain timeouts; a client-side limit would
// only abandon a call the broker still carries out.
enum class Wait {
	Timeout,   // --timeout: for replies the broker sends at once
	Unbounded, // as long as the broker keeps the call open
};

class Connection {
public:
	// Connects on first use, so `--help`-like commands that never call need no broker. With a
	// remote target (-H), through `ssh HOST brokerctl bridge`, to that host's brokerd.
	Connection(std::string path, std::chrono::milliseconds timeout, std::optional<RemoteTarget> remote = std::nullopt);
	~Connection();
	Connection(const Connection &) = delete;
	Connection &operator=(const Connection &) = delete;

	// One call, one reply: returns the reply's parameters (an object, possibly empty).
	nlohmann::json call(std::string_view method, nlohmann::json parameters = nlohmann::json::object(),
	                    Wait wait = Wait::Timeout);

	// A call with "more": on_reply gets each reply's parameters until the broker stops
	// continuing or on_reply returns false. `wait` applies to each wait for a reply. Returns
	// whether the broker still continues (on_reply stopped early); false when it ended the stream.
	bool stream(std::string_view method, nlohmann::json parameters,
	            const std::function<bool(const nlohmann::json &)> &on_reply, Wait wait);

	const std::string &path() const { return path_; }

private:
	proto::varlink::SyncClient &client();
	void send(std::string_view method, const nlohmann::json &parameters, bool more);
	nlohmann::json receive(std::string_view method, const nlohmann::json &parameters, bool &continues);
	void set_wait(Wait wait);
	// A send or receive failed: over a bridge that ended, what ssh's exit status says instead.
	[[noreturn]] void io_failed(const proto::varlink::Error &e, std::string_view method);
	void end_bridge();

	std::string path_;
	std::chrono::milliseconds timeout_;
	std::optional<RemoteTarget> remote_;
	pid_t ssh_ = -1;
	std::unique_ptr<proto::varlink::SyncClient> client_;
};

} // namespace brokerctl
