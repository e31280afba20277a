// A fake service manager for the tests: brokerd's NOTIFY_SOCKET, read at all times, and the fd
// store that systemd keeps for a service, so that a test can SIGKILL brokerd and start it again
// with its stored fds in LISTEN_FDS.
#pragma once

#include "proto/unique_fd.hpp"

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace utest {

// One service's notify socket and fd store, as systemd's service.c keeps them (Type=notify,
// NotifyAccess=main). A thread reads the socket for as long as the object lives, so that brokerd
// never finds it full (an AF_UNIX datagram socket queues only net.unix.max_dgram_qlen messages).
//
// The store is a list of (name, fd): FDSTORE=1 adds each fd passed with the message under FDNAME
// ("stored" by default; several fds may share a name), unless it is the same open file as one held
// already (a duplicate, closed); FDSTOREREMOVE=1 closes every fd of FDNAME; FDPOLL=0 stores an fd
// that is not polled. Every other stored fd is polled, and one that reports POLLHUP or POLLERR (a
// pipe's read end whose writers have all gone) is dropped, as systemd drops it. Fds beyond
// store_max are closed, as are fds sent without FDSTORE=1 or with an invalid FDNAME, and those of a
// message from another pid than the main one, which is otherwise ignored and counted.
// Every member function may be called from any thread.
class ServiceManager {
public:
	// systemd's FileDescriptorStoreMax= of brokerd's unit.
	static constexpr std::size_t kStoreMax = 4096;

	explicit ServiceManager(std::size_t store_max = kStoreMax);
	~ServiceManager();
	ServiceManager(const ServiceManager &) = delete;
	ServiceManager &operator=(const ServiceManager &) = delete;

	// NOTIFY_SOCKET's value: "@name" (an abstract socket).
	std::string address() const { return "@" + name_; }

	// Runs `spawn`, which starts the service's main process and returns its pid, with messages
	// held back until that pid is the main one: from then on messages of any other pid are
	// ignored. Before the first call, messages of every pid count.
	void start_main(const std::function<pid_t()> &spawn);

	// What the service sent so far, counted per field.
	struct Notified {
		std::uint64_t ready = 0;     // READY=1
		std::uint64_t status = 0;    // STATUS=
		std::uint64_t mainpid = 0;   // MAINPID= (recorded, not acted upon)
		std::uint64_t stopping = 0;  // STOPPING=1
		std::uint64_t reloading = 0; // RELOADING=1
		std::string last_status;
		pid_t last_mainpid = 0;
		std::uint64_t foreign = 0;       // messages from another pid than the main one, ignored
		std::vector<std::string> errors; // what systemd would have rejected: bad FDNAME, truncated...
	};
	Notified notified() const;
	// Whether more than `after` READY=1 have come by the deadline: `after` is notified().ready
	// taken before starting the process whose readiness is waited for.
	bool wait_ready(std::chrono::milliseconds timeout, std::uint64_t after = 0);

	// Returns once every message sent to the socket before the call has been handled and every
	// polled stored fd has been looked at once: e.g. after brokerd was SIGKILLed and reaped, the
	// store is then exactly what systemd would pass to the next start.
	void sync();

	// The names of the stored fds, one per fd, in store order.
	std::vector<std::string> names() const;
	// A CLOEXEC duplicate of the first stored fd named `name`, or an invalid fd.
	proto::UniqueFd dup(const std::string &name) const;
	// CLOEXEC duplicates of every stored fd with its name, in store order: what the next start
	// of the service gets as LISTEN_FDS and LISTEN_FDNAMES. (systemd itself passes the newest
	// first; brokerd finds its fds by name, so the order must not matter to it.)
	std::vector<std::pair<std::string, proto::UniqueFd>> copies() const;
	// What happened to the store, in order, one entry each: "stored NAME", "removed NAME" (one
	// per FDSTOREREMOVE=1, whatever it closed), "duplicate NAME", "hangup NAME" (dropped on
	// POLLHUP/POLLERR), "full NAME" (closed: the store held store_max fds).
	std::vector<std::string> store_events() const;

	// Puts `fd` into the store as a message would.
	void store(const std::string &name, proto::UniqueFd fd, bool poll = true);
	// Closes every stored fd, as systemd does when the service stops for good (a stop job, not a
	// restart).
	void clear();

private:
	struct Entry {
		std::uint64_t id; // tells entries apart across polls: fd numbers are reused
		std::string name;
		proto::UniqueFd fd;
		bool poll;
	};

	void run();
	void receive_all();
	void handle(const std::string &text, std::vector<proto::UniqueFd> fds, pid_t sender);
	void add_locked(const std::string &name, proto::UniqueFd fd, bool poll);
	void drop_hung_up_locked(const std::vector<std::uint64_t> &ids);
	void wake();

	const std::size_t store_max_;
	std::string name_;
	proto::UniqueFd fd_;
	proto::UniqueFd wake_; // eventfd: the store changed, or the thread is to stop
	std::mutex spawn_;     // held while the main process starts; the thread takes it per message

	mutable std::mutex mutex_; // everything below
	std::condition_variable cv_;
	pid_t main_pid_ = 0;
	Notified notified_;
	std::vector<Entry> store_;
	std::uint64_t next_id_ = 1;
	std::vector<std::string> events_;
	std::uint64_t sync_sent_ = 0, sync_done_ = 0;
	bool stop_ = false;

	std::thread thread_;
};

} // namespace utest
