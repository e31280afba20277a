// The fd holder's wire, for both its sides (daemon/fd_holder.hpp): messages of text lines with at
// most one fd each on a SOCK_SEQPACKET connection, and who may use the holder.
#pragma once

#include "proto/unique_fd.hpp"

#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>

#include <cerrno>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace brokerd::fdholder {

// SCM_MAX_FD: the most fds one message carries.
inline constexpr std::size_t kMaxFdsPerMessage = 253;
inline constexpr std::size_t kMaxMessage = 4096;
// How long the answer to FDGET=1 may take, either side waiting.
inline constexpr int kReplyMs = 5000;

std::string errno_text(int e = errno);
std::string uid_text(uid_t uid);
// Root, or the process's own effective uid: who may store into or fetch from a holder, and whom
// brokerd trusts as one.
bool allowed(uid_t uid);
// Who allowed() lets in, for messages.
std::string allowed_text();
// systemd's fdname_is_valid(): printable ASCII but ':', 1 to 255 bytes.
bool valid_name(std::string_view name);
// The value of `key=` among a message's lines.
std::optional<std::string_view> field(std::string_view message, std::string_view key);
// A unix socket address for a path ("@name": abstract); false when it is too long.
bool make_address(const std::string &path, sockaddr_un &addr, socklen_t &len);
// One message with at most one fd; false with errno when it could not go within `deadline_ms`.
bool send_message(int sock, std::string_view text, int fd, int deadline_ms);

// One message received: its text, its fds (CLOEXEC, the receiver's from now on) and its sender's
// credentials when the socket passes them.
struct Received {
	std::string text;
	std::vector<proto::UniqueFd> fds;
	std::optional<ucred> cred;
	bool truncated = false;
};
// 1: a message; 0: end of stream; -1: errno (EAGAIN when none waits).
int receive(int sock, Received &out, int flags);

} // namespace brokerd::fdholder
