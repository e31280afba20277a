// Human views of io.brokerd.Control replies: pure functions of the reply and the clock.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace brokerctl {

// The SOCKETS table for a []SocketInfo.
std::string render_sockets(const nlohmann::json &sockets);

// An UpgradeInfo in one line, as status shows it: "gen 3 -> 4, 2/4 ready, 1/4 drained (draining)".
std::string render_upgrade_info(const nlohmann::json &upgrade);

// What a Reload reply added and removed, one line per non-empty list.
std::string render_reload(const nlohmann::json &reload);

// A Scale reply: "web: scaled from 2 to 4 instances" (done: the call waited for them), or
// "web: scaling from 2 to 4 instances".
std::string render_scale(const std::string &service, const nlohmann::json &scale, bool done);

// A Signal reply: the instances the signal was sent to, or that none runs.
std::string render_signal(const std::string &service, const std::string &signal, const nlohmann::json &reply);

// The whole Status reply: a header line, the SOCKETS table and one section per service.
// With `service`, only that service and the sockets it uses. `now_usec` is CLOCK_REALTIME, for
// the SINCE column. Missing or mistyped members print as "-" rather than failing, so an older or
// newer broker still gets a readable answer.
std::string render_status(const nlohmann::json &status, std::int64_t now_usec,
                          const std::optional<std::string> &service = std::nullopt);

} // namespace brokerctl
