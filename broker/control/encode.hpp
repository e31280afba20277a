// The encoder: the one place where the supervisor's typed events, snapshots and refusals become
// Varlink JSON (docs/protocol.md gives each shape).
#pragma once

#include "handoff/router.hpp"
#include "supervisor/events.hpp"
#include "supervisor/supervisor.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace brokerd::encode {

// The "event" member's value, on a Watch stream and in an upgrade's progress alike.
std::string_view event_name(EventKind kind);
// An instance's state and an upgrade's phase, as io.brokerd.Control.varlink names them.
std::string_view instance_state(InstanceState s);
std::string_view phase(RolloutPhase p);

// A Watch stream's event: {event, time, service?, generation?, instance?, pid?, state?, version?,
// message?, handoff?, kind?, duration_usec?, changed?}.
nlohmann::json watch_event(const Event &e);

// An upgrade's Progress parameters: {event, time, service, generation?, upgrade?, instance?, pid?,
// message?, kind?, duration_usec?}.
nlohmann::json progress(const Event &e);

// Status's and Sockets' "sockets": every listener, the services configured with it, and a stream
// listener's accept queue as the kernel tells it (`diag_fd`: open_sock_diag()'s, or -1).
nlohmann::json sockets(const Supervisor &supervisor, int diag_fd);

// Reload's and the reload event's "changed": []ConfigChange.
nlohmann::json changes(const std::vector<config::Change> &list);

// Status's "services": every service, or only the one named; null for an unknown one.
nlohmann::json services(const Supervisor &supervisor, const std::string *only);

// History's "entries": a service's history, oldest first (the configs' env is never shown).
nlohmann::json history(const History &history);

// Status's "recovered": how this brokerd carried on after a crash; null when it did not.
nlohmann::json recovery(const Supervisor::Recovery &r);

// Status's and Progress's "upgrade" and "handoff" members.
nlohmann::json upgrade(const UpgradeSnapshot &u);
nlohmann::json handoff(const HandoffTotals &h);

// A worker's Events stream: the drain request; a chunk of connections for a receiver (each
// item's fd moves into `fds`, in order, and the event refers to it by index); a batch's result
// for its sender (which connections landed, which came back and which were abandoned, by index
// into its call).
nlohmann::json drain(std::uint64_t timeout_ms);
nlohmann::json connections(std::uint64_t batch, std::vector<HandoffItem> items, std::vector<proto::UniqueFd> &fds,
                           const HandoffOrigin &origin);
nlohmann::json handoff_result(const HandoffResult &result);
// Direct channels: a sender's ends, one per receiver (Peers' answer), and a receiver's one; each
// end's fd moves to fds.
nlohmann::json peers(std::vector<HandoffPeer> ends, std::vector<proto::UniqueFd> &fds);
nlohmann::json peer(HandoffPeer end, std::vector<proto::UniqueFd> &fds);

// The Varlink error a refusal is, and its parameters.
std::pair<std::string_view, nlohmann::json> refusal(const Refusal &r);

} // namespace brokerd::encode
