// The state a brokerd hands to the brokerd it re-executes (brokerctl reexec), in a memfd.
#pragma once

#include "proto/unique_fd.hpp"
#include "config/config.hpp"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace brokerd::state {

// Bumped whenever the layout changes: a brokerd refuses state of another format, and the old
// one asks the new binary which format it reads before it execs it.
inline constexpr int kFormat = 1;

nlohmann::json service_config(const config::ServiceConfig &cfg);
// Throws std::runtime_error on anything missing or mistyped.
config::ServiceConfig service_config(const nlohmann::json &j);

// A sealed memfd holding `state` as JSON, inheritable across execve.
proto::UniqueFd write(const nlohmann::json &state);
// Reads and closes the state memfd; throws std::runtime_error (including on another format).
nlohmann::json read(int fd);

// Parses everything in the state but its fds, as a re-exec would; throws std::runtime_error.
void check(const nlohmann::json &state);

// Inheritable across execve, or not.
void set_cloexec(int fd, bool on);

} // namespace brokerd::state
