// The tests' service manager: brokerd's notify socket and fd store, read and kept as systemd does.
#include "service_manager.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>

#ifndef F_DUPFD_QUERY
#define F_DUPFD_QUERY (1024 + 3) // Linux 6.10
#endif

namespace utest {

using proto::UniqueFd;

namespace {

// What the test process itself sends to mark a point in the socket's queue (see sync()).
constexpr std::string_view kSyncTag = "X_ITEST_SYNC=";
// systemd reads at most PIPE_BUF bytes of a notify message, and SCM_MAX_FD fds.
constexpr std::size_t kMaxMessage = 4096;
constexpr std::size_t kMaxFds = 253;

[[noreturn]] void fail_errno(const std::string &what)
{
	throw std::runtime_error(what + ": " + std::strerror(errno));
}

// fdname_is_valid() in systemd: printable ASCII without ':', at most 255 bytes.
bool fdname_valid(const std::string &name)
{
	if (name.empty() || name.size() > 255)
		return false;
	for (char c : name)
		if (c < 0x20 || c > 0x7e || c == ':')
			return false;
	return true;
}

// Whether two fds are the same open file, as systemd's same_fd() asks.
bool same_file(int a, int b)
{
	int r = ::fcntl(a, F_DUPFD_QUERY, b);
	if (r >= 0)
		return r == 1;
	struct stat sa{}, sb{};
	return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

sockaddr_un abstract_address(const std::string &name, socklen_t &len)
{
	sockaddr_un sa{};
	sa.sun_family = AF_UNIX;
	std::memcpy(sa.sun_path + 1, name.data(), name.size());
	len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
	return sa;
}

// The message's "KEY=VALUE" lines; the first of a key counts, as systemd's strv_find_startswith().
std::map<std::string, std::string> fields_of(const std::string &text)
{
	std::map<std::string, std::string> out;
	std::size_t start = 0;
	while (start <= text.size()) {
		std::size_t end = text.find('\n', start);
		if (end == std::string::npos)
			end = text.size();
		std::string line = text.substr(start, end - start);
		auto eq = line.find('=');
		if (eq != std::string::npos)
			out.emplace(line.substr(0, eq), line.substr(eq + 1));
		start = end + 1;
	}
	return out;
}

} // namespace

ServiceManager::ServiceManager(std::size_t store_max) : store_max_(store_max)
{
	static std::atomic<unsigned> counter{0};
	name_ = "brokerd-utest-manager-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
	fd_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
	if (!fd_)
		fail_errno("socket");
	int one = 1;
	if (::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSCRED, &one, sizeof one) < 0)
		fail_errno("SO_PASSCRED");
	socklen_t len = 0;
	sockaddr_un sa = abstract_address(name_, len);
	if (::bind(fd_.get(), reinterpret_cast<sockaddr *>(&sa), len) < 0)
		fail_errno("bind " + address());
	wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
	if (!wake_)
		fail_errno("eventfd");
	thread_ = std::thread([this] { run(); });
}

ServiceManager::~ServiceManager()
{
	{
		std::lock_guard lock(mutex_);
		stop_ = true;
	}
	wake();
	thread_.join();
}

void ServiceManager::wake()
{
	std::uint64_t one = 1;
	if (::write(wake_.get(), &one, sizeof one) < 0 && errno != EAGAIN)
		std::abort(); // the thread would never see a stop
}

void ServiceManager::run()
{
	for (;;) {
		std::vector<pollfd> p = {{fd_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
		std::vector<std::uint64_t> ids;
		{
			std::lock_guard lock(mutex_);
			if (stop_)
				return;
			for (const auto &e : store_)
				if (e.poll) {
					// No events asked: POLLHUP and POLLERR are reported anyway.
					p.push_back({e.fd.get(), 0, 0});
					ids.push_back(e.id);
				}
		}
		if (::poll(p.data(), p.size(), -1) < 0) {
			if (errno == EINTR)
				continue;
			std::abort(); // only EFAULT or ENOMEM: nothing a test could go on after
		}
		if (p[1].revents) {
			std::uint64_t v;
			(void)!::read(wake_.get(), &v, sizeof v);
		}
		if (p[0].revents)
			receive_all();
		std::vector<std::uint64_t> hung;
		for (std::size_t i = 2; i < p.size(); ++i)
			if (p[i].revents & (POLLHUP | POLLERR))
				hung.push_back(ids[i - 2]);
		if (!hung.empty()) {
			std::lock_guard lock(mutex_);
			drop_hung_up_locked(hung);
		}
	}
}

void ServiceManager::receive_all()
{
	for (;;) {
		char buf[kMaxMessage];
		alignas(cmsghdr) char control[CMSG_SPACE(kMaxFds * sizeof(int)) + CMSG_SPACE(sizeof(ucred))];
		iovec iov{buf, sizeof buf};
		msghdr msg{};
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = control;
		msg.msg_controllen = sizeof control;
		ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; // EAGAIN: all read
		}
		// Ours the moment recvmsg returns: every path below closes what it does not keep.
		std::vector<UniqueFd> fds;
		pid_t sender = 0;
		for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
			if (c->cmsg_level != SOL_SOCKET)
				continue;
			if (c->cmsg_type == SCM_RIGHTS) {
				std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (std::size_t i = 0; i < count; ++i) {
					int fd;
					std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
					fds.emplace_back(fd);
				}
			} else if (c->cmsg_type == SCM_CREDENTIALS) {
				ucred cred;
				std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
				sender = cred.pid;
			}
		}
		if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) {
			std::lock_guard lock(mutex_);
			notified_.errors.push_back("truncated notify message (flags " + std::to_string(msg.msg_flags) + ")");
			continue;
		}
		handle(std::string(buf, static_cast<std::size_t>(n)), std::move(fds), sender);
	}
}

void ServiceManager::handle(const std::string &text, std::vector<UniqueFd> fds, pid_t sender)
{
	if (sender == ::getpid() && text.starts_with(kSyncTag)) {
		std::uint64_t seq = std::stoull(text.substr(kSyncTag.size()));
		std::lock_guard lock(mutex_);
		// Every message before this one is handled; now what the stored fds report.
		std::vector<pollfd> p;
		std::vector<std::uint64_t> ids, hung;
		for (const auto &e : store_)
			if (e.poll) {
				p.push_back({e.fd.get(), 0, 0});
				ids.push_back(e.id);
			}
		if (!p.empty() && ::poll(p.data(), p.size(), 0) > 0)
			for (std::size_t i = 0; i < p.size(); ++i)
				if (p[i].revents & (POLLHUP | POLLERR))
					hung.push_back(ids[i]);
		drop_hung_up_locked(hung);
		sync_done_ = seq;
		cv_.notify_all();
		return;
	}

	std::lock_guard starting(spawn_); // a main process being started is known before its messages
	std::lock_guard lock(mutex_);
	Notified &n = notified_;
	if (main_pid_ != 0 && sender != main_pid_) {
		n.foreign++;
		return;
	}
	auto f = fields_of(text);
	auto has = [&](const char *key, const char *value) {
		auto it = f.find(key);
		return it != f.end() && it->second == value;
	};
	n.ready += has("READY", "1");
	n.stopping += has("STOPPING", "1");
	n.reloading += has("RELOADING", "1");
	if (auto it = f.find("STATUS"); it != f.end()) {
		n.status++;
		n.last_status = it->second;
	}
	if (auto it = f.find("MAINPID"); it != f.end()) {
		n.mainpid++;
		n.last_mainpid = static_cast<pid_t>(std::atol(it->second.c_str()));
	}
	auto name_it = f.find("FDNAME");
	if (has("FDSTOREREMOVE", "1")) {
		if (name_it == f.end() || !fdname_valid(name_it->second)) {
			n.errors.push_back("FDSTOREREMOVE=1 without a valid FDNAME: " + text);
		} else {
			std::erase_if(store_, [&](const Entry &e) { return e.name == name_it->second; });
			events_.push_back("removed " + name_it->second);
		}
	}
	if (has("FDSTORE", "1")) {
		std::string name = name_it == f.end() ? "stored" : name_it->second;
		if (!fdname_valid(name))
			n.errors.push_back("FDSTORE=1 with an invalid FDNAME: " + text);
		else if (fds.empty())
			n.errors.push_back("FDSTORE=1 without an fd: " + text);
		else
			for (auto &fd : fds)
				add_locked(name, std::move(fd), !has("FDPOLL", "0"));
	} else if (!fds.empty()) {
		n.errors.push_back("fds passed without FDSTORE=1: " + text);
	}
	cv_.notify_all();
}

void ServiceManager::add_locked(const std::string &name, UniqueFd fd, bool poll)
{
	if (store_.size() >= store_max_) {
		events_.push_back("full " + name);
		return;
	}
	for (const auto &e : store_)
		if (same_file(e.fd.get(), fd.get())) {
			events_.push_back("duplicate " + name);
			return;
		}
	store_.push_back({next_id_++, name, std::move(fd), poll});
	events_.push_back("stored " + name);
}

void ServiceManager::drop_hung_up_locked(const std::vector<std::uint64_t> &ids)
{
	for (std::uint64_t id : ids)
		for (auto it = store_.begin(); it != store_.end(); ++it)
			if (it->id == id) {
				events_.push_back("hangup " + it->name);
				store_.erase(it);
				break;
			}
}

void ServiceManager::start_main(const std::function<pid_t()> &spawn)
{
	std::lock_guard starting(spawn_);
	pid_t pid = spawn();
	std::lock_guard lock(mutex_);
	main_pid_ = pid;
}

ServiceManager::Notified ServiceManager::notified() const
{
	std::lock_guard lock(mutex_);
	return notified_;
}

bool ServiceManager::wait_ready(std::chrono::milliseconds timeout, std::uint64_t after)
{
	std::unique_lock lock(mutex_);
	return cv_.wait_for(lock, timeout, [&] { return notified_.ready > after; });
}

void ServiceManager::sync()
{
	std::uint64_t seq;
	{
		std::lock_guard lock(mutex_);
		seq = ++sync_sent_;
	}
	UniqueFd s(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	if (!s)
		fail_errno("socket");
	socklen_t len = 0;
	sockaddr_un sa = abstract_address(name_, len);
	std::string text = std::string(kSyncTag) + std::to_string(seq);
	// Blocking: a full queue is one the thread is emptying.
	if (::sendto(s.get(), text.data(), text.size(), 0, reinterpret_cast<sockaddr *>(&sa), len) < 0)
		fail_errno("send to " + address());
	std::unique_lock lock(mutex_);
	if (!cv_.wait_for(lock, std::chrono::seconds(10), [&] { return sync_done_ >= seq; }))
		throw std::runtime_error("the service manager's thread did not reach a message within 10 s");
}

std::vector<std::string> ServiceManager::names() const
{
	std::lock_guard lock(mutex_);
	std::vector<std::string> out;
	for (const auto &e : store_)
		out.push_back(e.name);
	return out;
}

UniqueFd ServiceManager::dup(const std::string &name) const
{
	std::lock_guard lock(mutex_);
	for (const auto &e : store_)
		if (e.name == name)
			return UniqueFd(::fcntl(e.fd.get(), F_DUPFD_CLOEXEC, 3));
	return {};
}

std::vector<std::pair<std::string, UniqueFd>> ServiceManager::copies() const
{
	std::lock_guard lock(mutex_);
	std::vector<std::pair<std::string, UniqueFd>> out;
	for (const auto &e : store_) {
		UniqueFd fd(::fcntl(e.fd.get(), F_DUPFD_CLOEXEC, 3));
		if (!fd)
			fail_errno("dup of stored fd " + e.name);
		out.emplace_back(e.name, std::move(fd));
	}
	return out;
}

std::vector<std::string> ServiceManager::store_events() const
{
	std::lock_guard lock(mutex_);
	return events_;
}

void ServiceManager::store(const std::string &name, UniqueFd fd, bool poll)
{
	{
		std::lock_guard lock(mutex_);
		add_locked(name, std::move(fd), poll);
	}
	wake();
}

void ServiceManager::clear()
{
	{
		std::lock_guard lock(mutex_);
		store_.clear();
	}
	wake();
}

} // namespace utest
