// SystemdNotifier: READY=1, STATUS=, RELOADING=1, STOPPING=1 and the fd store's messages to
// NOTIFY_SOCKET, or to the fd holder, without blocking.
#include "os/systemd_notify.hpp"

#include "os/log.hpp"
#include "os/time.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>

namespace brokerd {

SystemdNotifier::SystemdNotifier()
{
	const char *path = std::getenv("NOTIFY_SOCKET");
	if (!path || !*path)
		return;
	std::size_t len = std::strlen(path);
	if ((path[0] != '/' && path[0] != '@') || len >= sizeof(addr_.sun_path)) {
		log::warning(std::string("NOTIFY_SOCKET=") + path + " is not a unix socket path, ignoring");
		return;
	}
	addr_.sun_family = AF_UNIX;
	std::memcpy(addr_.sun_path, path, len);
	if (path[0] == '@')
		addr_.sun_path[0] = '\0';
	addr_len_ = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len + (path[0] == '@' ? 0 : 1));
	fd_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd_)
		log::warning(std::string("notify socket: ") + std::strerror(errno) + ", ignoring");
}

void SystemdNotifier::send(std::string_view message)
{
	send_with_fd(message, -1);
}

void SystemdNotifier::attach(sd_event *event)
{
	event_ = event;
	schedule();
}

std::string SystemdNotifier::store_message(const std::string &name, bool poll)
{
	return "FDSTORE=1\nFDNAME=" + name + (poll ? "" : "\nFDPOLL=0");
}

void SystemdNotifier::use(proto::UniqueFd connected)
{
	fd_ = std::move(connected);
	addr_len_ = 0;
	target_ = "the fd holder";
	keeping_ = true;
	warned_ = false;
	waiting_.clear();
	retry_.reset();
}

namespace {

std::string fd_name(std::string_view message)
{
	std::size_t at = message.find("FDNAME=");
	if (at == std::string_view::npos || (at > 0 && message[at - 1] != '\n'))
		return {};
	message.remove_prefix(at + 7);
	return std::string(message.substr(0, message.find('\n')));
}

} // namespace

void SystemdNotifier::note(std::string_view message, int fd)
{
	if (!keeping_)
		return;
	if (message.starts_with("FDSTOREREMOVE=1")) {
		std::string name = fd_name(message);
		std::erase_if(kept_, [&](const Kept &k) { return k.name == name; });
	} else if (message.starts_with("FDSTORE=1") && fd >= 0) {
		remember(std::string(message), fd);
	}
}

void SystemdNotifier::remember(std::string message, int fd)
{
	struct stat st {};
	if (::fstat(fd, &st) < 0)
		return;
	std::string name = fd_name(message);
	kept_.push_back({std::move(message), std::move(name), fd, st.st_dev, st.st_ino});
}

void SystemdNotifier::resend_kept()
{
	// Gone from brokerd since, or another file at its number now: not brokerd's to keep.
	std::erase_if(kept_, [](const Kept &k) {
		struct stat st {};
		return ::fstat(k.fd, &st) < 0 || st.st_dev != k.dev || st.st_ino != k.ino;
	});
	for (const auto &k : kept_)
		deliver(k.message, k.fd);
}

std::vector<std::pair<std::string, int>> SystemdNotifier::kept() const
{
	std::vector<std::pair<std::string, int>> out;
	for (const auto &k : kept_)
		out.emplace_back(k.message, k.fd);
	return out;
}

bool SystemdNotifier::send_with_fd(std::string_view message, int fd)
{
	note(message, fd);
	return deliver(message, fd);
}

bool SystemdNotifier::deliver(std::string_view message, int fd)
{
	if (!fd_)
		return false;
	const bool store = message.starts_with("FDSTORE=1") || message.starts_with("FDSTOREREMOVE=1");
	if (store && !waiting_.empty()) {
		// Behind those waiting already: the store's messages keep their order.
		waiting_.push_back({std::string(message), proto::UniqueFd(fd >= 0 ? ::fcntl(fd, F_DUPFD_CLOEXEC, 3) : -1)});
		return true;
	}
	if (try_send(message, fd))
		return true;
	if (!store || errno != EAGAIN)
		return false;
	waiting_.push_back({std::string(message), proto::UniqueFd(fd >= 0 ? ::fcntl(fd, F_DUPFD_CLOEXEC, 3) : -1)});
	waiting_since_ = now_usec(CLOCK_MONOTONIC);
	pause_ = 1000;
	schedule();
	return true;
}

void SystemdNotifier::schedule()
{
	if (!event_ || waiting_.empty() || retry_)
		return;
	sd_event_source *s = nullptr;
	if (sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC, pause_, 0, on_retry, this) >= 0)
		retry_.reset(s);
}

int SystemdNotifier::on_retry(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("notify retry", [&]() -> int {
		auto *n = static_cast<SystemdNotifier *>(userdata);
		n->retry_.reset();
		while (!n->waiting_.empty()) {
			Waiting &w = n->waiting_.front();
			if (!n->try_send(w.message, w.fd.get())) {
				if (errno == EAGAIN && now_usec(CLOCK_MONOTONIC) - n->waiting_since_ < kStoreRetryUsec)
					break;
				log::warning(std::string(n->target_) + " did not take " + std::to_string(n->waiting_.size()) +
				             " fd store message(s) within " + std::to_string(kStoreRetryUsec / 1000) + "ms; dropped them");
				n->waiting_.clear();
				return 0;
			}
			n->waiting_.pop_front();
			n->waiting_since_ = now_usec(CLOCK_MONOTONIC);
			n->pause_ = 1000;
		}
		n->pause_ = std::min<std::uint64_t>(n->pause_ * 2, 100'000);
		n->schedule();
		return 0;
	});
}

bool send_message_with_fd(int sock, const sockaddr_un *addr, socklen_t addr_len, std::string_view message, int fd)
{
	iovec iov{const_cast<char *>(message.data()), message.size()};
	msghdr msg{};
	// A connected socket (a holder's) takes no address.
	msg.msg_name = addr_len ? const_cast<sockaddr_un *>(addr) : nullptr;
	msg.msg_namelen = addr_len;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
	if (fd >= 0) {
		msg.msg_control = control;
		msg.msg_controllen = sizeof(control);
		cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	return ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0;
}

bool SystemdNotifier::try_send(std::string_view message, int fd)
{
	if (send_message_with_fd(fd_.get(), &addr_, addr_len_, message, fd)) {
		warned_ = false;
		return true;
	}
	int err = errno;
	if (!warned_)
		log::warning(std::string("cannot notify ") + target_ + ": " + std::strerror(err) + ", ignoring");
	warned_ = true;
	errno = err;
	return false;
}

} // namespace brokerd
