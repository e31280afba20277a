// Limits on every resource a peer controls, in one place.
#pragma once

#include <chrono>
#include <cstddef>

namespace proto::limits {

using namespace std::chrono_literals;

// Varlink framing.
inline constexpr std::size_t kMaxMessageSize = 1 << 20;     // one JSON message, without its NUL
inline constexpr std::size_t kMaxFdsPerMessage = 253;       // SCM_MAX_FD: one sendmsg, one message
inline constexpr std::size_t kMaxQueuedFds = 2 * kMaxFdsPerMessage; // received, not yet claimed
inline constexpr std::size_t kMaxWriteQueue = 8u << 20;     // bytes queued to a slow reader
inline constexpr std::size_t kMaxJsonDepth = 64;            // nesting of objects and arrays

// Control server.
inline constexpr std::size_t kDefaultMaxConnections = 512;
inline constexpr std::size_t kDefaultMaxConnectionsPerUser = 128; // of one uid but root's and brokerd's
inline constexpr std::size_t kDefaultReservedConnections = 16; // for operators, at most a quarter of all
inline constexpr auto kUnauthenticatedIdle = 10s;           // until Hello or an operator call
inline constexpr auto kReaderIdle = 60s;                    // a reader with no call in progress, no Watch
// A message from a peer that is neither an operator nor a worker's Events connection (the one
// that sends Handoff batches): Hello, Status and the like are small.
inline constexpr std::size_t kMaxSmallMessage = 16u << 10;
inline constexpr std::size_t kMaxUnreadOutput = 64u << 10;  // queued to a peer: its calls wait
inline constexpr std::size_t kMaxWatchQueue = 256u << 10;   // queued to a Watch stream: closed
inline constexpr std::size_t kTrimAfterFreeing = 1u << 20;  // buffer bytes freed, then malloc_trim
inline constexpr std::size_t kTokenBytes = 16;
inline constexpr std::size_t kMaxAncestry = 64;              // PPid steps from a Hello's peer up to its instance

// Notify socket.
inline constexpr std::size_t kMaxNotifyMessage = 4096;
inline constexpr std::size_t kMaxStatusText = 512;

// Supervisor.
inline constexpr std::size_t kMaxSocketsPerService = kMaxFdsPerMessage;
inline constexpr std::size_t kMaxOutputLine = 4096;         // longer lines are split
inline constexpr std::size_t kKeptOutputLines = 20;         // per instance, for failure reports
inline constexpr std::size_t kMaxStatusOutput = 4u << 10;   // bytes of those lines in Status, the newest
inline constexpr std::size_t kMaxStatusOutputTotal = 256u << 10; // of all instances' in one Status reply

// Upgrades: new instances started at a time (upgrade.batch, and an Upgrade call's batch).
inline constexpr unsigned kMaxBatch = 1024;

// Handoff: chunks a worker remembers having received, and may list in a Resume.
inline constexpr std::size_t kMaxResumeReceipts = 4096;

// Metrics: the text a Metrics reply carries, as a JSON string, leaving room for the rest of the
// message; whole metric families past it are left out (the reply says truncated).
inline constexpr std::size_t kMaxMetricsText = kMaxMessageSize - 4096;
// The metrics.listen endpoint: connections at once (metrics.max_connections), a request's head,
// the time from accept to the end of the reply, accepts per wakeup.
inline constexpr unsigned kDefaultMetricsConnections = 16;
inline constexpr std::size_t kMaxHttpRequest = 4096;
inline constexpr auto kHttpTimeout = 10s;
inline constexpr int kMetricsAcceptPerWakeup = 16;

// Clients.
inline constexpr auto kDefaultCallTimeout = 30s;

} // namespace proto::limits
