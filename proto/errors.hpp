// The error names of io.brokerd.Control and io.brokerd.Worker, shared by brokerd and its clients,
// as the .varlink files declare them (proto/names.hpp, generated).
#pragma once

#include "proto/names.hpp"

namespace proto::errors {

// io.brokerd.Control (docs/io.brokerd.Control.varlink).
inline constexpr auto kNoSuchService = names::control::kNoSuchService;
inline constexpr auto kInvalidConfig = names::control::kInvalidConfig;
inline constexpr auto kUpgradeInProgress = names::control::kUpgradeInProgress;
inline constexpr auto kNoUpgradeInProgress = names::control::kNoUpgradeInProgress;
inline constexpr auto kNoPreviousGeneration = names::control::kNoPreviousGeneration;
inline constexpr auto kNoSuchGeneration = names::control::kNoSuchGeneration;
inline constexpr auto kServiceStopped = names::control::kServiceStopped;
inline constexpr auto kUpgradeFailed = names::control::kUpgradeFailed;
inline constexpr auto kStartFailed = names::control::kStartFailed;
inline constexpr auto kReexecFailed = names::control::kReexecFailed;
inline constexpr auto kShuttingDown = names::control::kShuttingDown;
inline constexpr auto kRegisteredService = names::control::kRegisteredService;
// Sent on a connection past a limit, before brokerd closes it; any interface's caller reads it.
inline constexpr auto kTooManyConnections = names::control::kTooManyConnections;

// io.brokerd.Worker (docs/io.brokerd.Worker.varlink).
inline constexpr auto kInvalidToken = names::worker::kInvalidToken;
inline constexpr auto kNotAuthenticated = names::worker::kNotAuthenticated;
inline constexpr auto kWorkerNoSuchService = names::worker::kNoSuchService;
inline constexpr auto kPeerExited = names::worker::kPeerExited;
inline constexpr auto kEventsInUse = names::worker::kEventsInUse;

} // namespace proto::errors
