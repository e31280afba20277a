// Closer: fds a peer gave brokerd close on a thread of their own, never on the event loop.
#pragma once

namespace brokerd::closer {

// Starts the closer thread and routes every proto::UniqueFd::from_peer that is dropped to it. Once, in
// brokerd, after the fd limit is raised: its pipe holds as many fd numbers as brokerd may have
// open, so a write to it never waits. Throws std::runtime_error when it cannot.
void start();

// Whether peers may send fds (SCM_RIGHTS) to this socket: SO_PASSRIGHTS, Linux 6.16 and later.
// Refused, a sender's sendmsg fails with EPERM and nothing reaches us; a listening socket's
// setting is inherited by the connections it accepts. Returns false when the kernel lacks the
// option (fds then arrive and are closed by the closer), throws on any other error.
bool pass_rights(int fd, bool allow);

} // namespace brokerd::closer
