// The error names of io.brokerd.Control and io.brokerd.Worker, shared by brokerd and its clients.
#pragma once

#include <string_view>

namespace proto::errors {

// io.brokerd.Control (docs/io.brokerd.Control.varlink).
inline constexpr std::string_view kNoSuchService = "io.brokerd.Control.NoSuchService";
inline constexpr std::string_view kInvalidConfig = "io.brokerd.Control.InvalidConfig";
inline constexpr std::string_view kUpgradeInProgress = "io.brokerd.Control.UpgradeInProgress";
inline constexpr std::string_view kNoUpgradeInProgress = "io.brokerd.Control.NoUpgradeInProgress";
inline constexpr std::string_view kNoPreviousGeneration = "io.brokerd.Control.NoPreviousGeneration";
inline constexpr std::string_view kServiceStopped = "io.brokerd.Control.ServiceStopped";
inline constexpr std::string_view kUpgradeFailed = "io.brokerd.Control.UpgradeFailed";
inline constexpr std::string_view kStartFailed = "io.brokerd.Control.StartFailed";
inline constexpr std::string_view kReexecFailed = "io.brokerd.Control.ReexecFailed";
inline constexpr std::string_view kShuttingDown = "io.brokerd.Control.ShuttingDown";
inline constexpr std::string_view kRegisteredService = "io.brokerd.Control.RegisteredService";
// Sent on a connection past a limit, before brokerd closes it; any interface's caller reads it.
inline constexpr std::string_view kTooManyConnections = "io.brokerd.Control.TooManyConnections";

// io.brokerd.Worker (docs/io.brokerd.Worker.varlink).
inline constexpr std::string_view kInvalidToken = "io.brokerd.Worker.InvalidToken";
inline constexpr std::string_view kNotAuthenticated = "io.brokerd.Worker.NotAuthenticated";
inline constexpr std::string_view kWorkerNoSuchService = "io.brokerd.Worker.NoSuchService";
inline constexpr std::string_view kPeerExited = "io.brokerd.Worker.PeerExited";
inline constexpr std::string_view kEventsInUse = "io.brokerd.Worker.EventsInUse";

} // namespace proto::errors
