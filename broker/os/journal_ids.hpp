// The MESSAGE_IDs of brokerd's own events in the journal: made once with `systemd-id128 new`,
// never changed, so that `journalctl MESSAGE_ID=...` and scripts find them in every version.
#pragma once

#include <string_view>

namespace brokerd::journal::ids {

inline constexpr std::string_view kUpgradeStarted = "2e075133398a40b8b52299ec427fcaba";
inline constexpr std::string_view kUpgradeDone = "251588f3b085418aa6cf8a1ce9d04766";
inline constexpr std::string_view kUpgradeRolledBack = "cd85e4c538c14a708227e1ba82f96b79";
// The upgrade failed and turns back (its rollback's end is kUpgradeRolledBack).
inline constexpr std::string_view kUpgradeFailed = "7a3f2471fab84ffa9849fe046c63f17a";
inline constexpr std::string_view kCrashLoop = "0da6da5b086e4cecb7f20b85c7be77b1";
// An upgrade's connections handed off, in all, once it ended.
inline constexpr std::string_view kHandoffSummary = "0c485a7de70440c3b4764808457b22d3";
inline constexpr std::string_view kReexec = "8392b54eee5b4f09a3397c76753d0fa5";
inline constexpr std::string_view kReload = "2147d59758954092818a74c761079bd6";
inline constexpr std::string_view kShutdown = "800c4727f72c4c3da713a455d7763410";

} // namespace brokerd::journal::ids
