// Human views of io.brokerd.Control replies: pure functions of the reply and the clock.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace brokerctl {

// A ServiceInfo (null: no such service) in one word, as systemctl is-active says it: active
// (running, every instance of the current generation ready, no upgrade under way), activating
// (starting, restarting, or an upgrade, rollback or restart rolling), deactivating (stopping),
// inactive (stopped, or nothing to run), failed, or unknown.
std::string_view active_state(const nlohmann::json *service);

// The SOCKETS table for a []SocketInfo: each socket's services and accept queue ("0/4096").
std::string render_sockets(const nlohmann::json &sockets);

// An UpgradeInfo in one line, as status shows it: "gen 3 -> 4, 2/4 ready, 1/4 drained (draining)".
std::string render_upgrade_info(const nlohmann::json &upgrade);

// What a Reload reply added and removed, one line per non-empty list, then one line per changed
// setting (change_line).
std::string render_reload(const nlohmann::json &reload);
// One ConfigChange of a Reload reply or a reload event: "web: instances 2→3, at the next upgrade",
// "brokerd: shutdown.timeout 90s→30s, now", "web: env: FOO added, BAR changed, at the next upgrade".
std::string change_line(const nlohmann::json &change);

// A History reply's entries as a table, oldest first: GEN, VERSION, STARTED (local time),
// DURATION (until it ended, or until now while it serves), HOW, RESULT, BY and EXEC. BY is
// user_name(uid), or "-" when brokerd started it from its config. `now_usec` is CLOCK_REALTIME.
std::string render_history(const nlohmann::json &entries, std::int64_t now_usec,
                           std::string (*user_name)(std::int64_t uid));

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
