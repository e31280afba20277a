// Human views of io.brokerd.Control replies: pure functions of the reply and the clock.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace brokerctl {

// The SOCKETS table for a []SocketInfo.
std::string render_sockets(const nlohmann::json &sockets);

// The whole Status reply: a header line, the SOCKETS table and one section per service.
// With `service`, only that service and the sockets it uses. `now_usec` is CLOCK_REALTIME, for
// the SINCE column. Missing or mistyped members print as "-" rather than failing, so an older or
// newer broker still gets a readable answer.
std::string render_status(const nlohmann::json &status, std::int64_t now_usec,
                          const std::optional<std::string> &service = std::nullopt);

} // namespace brokerctl
