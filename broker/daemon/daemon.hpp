// The daemon: composes the event loop, the listeners, the supervisor, the notify and control
// sockets, and speaks to the service manager (READY=, STATUS=, the fd store, the watchdog).
#pragma once

#include "config/config.hpp"
#include "control/access.hpp"
#include "control/server.hpp"
#include "daemon/binary_check.hpp"
#include "daemon/crash_state.hpp"
#include "daemon/fd_holder.hpp"
#include "daemon/journal_link.hpp"
#include "daemon/reload.hpp"
#include "daemon/sentinel.hpp"
#include "metrics/counters.hpp"
#include "metrics/http_server.hpp"
#include "os/event.hpp"
#include "os/listener.hpp"
#include "os/notify.hpp"
#include "os/systemd_notify.hpp"
#include "supervisor/serialize.hpp"
#include "supervisor/supervisor.hpp"

#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <vector>

namespace brokerd {

// The format of the JSON in the crash state's slots (Daemon::crash_snapshot); another is refused.
inline constexpr int kCrashFormat = 1;

struct EventUnref {
	void operator()(sd_event *e) const { sd_event_unref(e); }
};

class Daemon {
public:
	Daemon(std::string config_path, config::Config cfg, std::string cfg_text)
		: config_path_(std::move(config_path)), cfg_(std::move(cfg)), cfg_text_(std::move(cfg_text))
	{
	}
	// Carries on from a previous brokerd's state (brokerctl reexec).
	explicit Daemon(nlohmann::json restored);
	~Daemon()
	{
		// The notify socket goes before the supervisor, which must not read it any more.
		if (supervisor_)
			supervisor_->read_notifications = nullptr;
	}
	Daemon(const Daemon &) = delete;
	Daemon &operator=(const Daemon &) = delete;
	int run();

private:
	void add_signals();
	void compose(proto::UniqueFd control_fd);
	void carry_on();
	void start_services();
	static int on_signal(sd_event_source *s, const signalfd_siginfo *si, void *userdata);
	void on_change();
	nlohmann::json reload();
	// Tells every Watch stream of brokerd's own event (reload, reexec, shutdown); e.time is set here.
	void broadcast_own(Event e);
	RunningState running_for_reload(const config::Config &next) const;
	nlohmann::json apply_reload(const ReloadPlan &plan, config::Config next, std::string next_text, AccessRules rules);
	void close_unused_listeners();
	proto::UniqueFd adopt_control_socket(InheritedFds &inherited);
	// Into the service manager's fd store; whether it took it. `poll`: whether it may watch the
	// fd for a hangup (which drops it), as it cannot a memfd.
	bool store_fd(const std::string &name, int fd, bool poll = true);
	proto::UniqueFd open_listeners();
	proto::UniqueFd restore_listeners();
	void setup_watchdog();
	void extend_start();
	using ReexecFailed = std::function<void(const std::string &why)>;
	void reexec(const std::string &binary, int caller, ReexecFailed failed);
	void reexec_checked(const std::string &error);
	void cancel_reexec(const std::string &why);
	void drop_reexec();
	void exec(std::string binary, int caller);
	nlohmann::json save_state(int caller, std::vector<int> &keep) const;
	// daemon/metrics.cpp: the metrics.listen endpoint, bound or carried over a re-exec, and the
	// counters and endpoint a re-exec carries.
	std::vector<metrics::Family> metric_families() const;
	void open_metrics();
	void close_metrics();
	nlohmann::json save_metrics(std::vector<int> &keep) const;
	void keep_crash_state();
	std::string crash_snapshot() const;
	mutable Serializer::HistoryTexts history_texts_; // what crash_snapshot() need not make again
	void take_crash_state(InheritedFds &inherited);
	void take_sentinel(InheritedFds &inherited);
	void keep_sentinel();
	void recover();
	void take_fd_holder(InheritedFds &inherited);
	void carry_fd_holder(const nlohmann::json &saved);
	void on_holder_lost();
	void restart_holder_soon();
	void restart_holder();

	std::string config_path_;
	config::Config cfg_;
	std::string cfg_text_;     // the file as cfg_ was parsed from it, for a re-exec
	nlohmann::json restored_;  // a previous brokerd's state, until run() has used it
	usec_t start_usec_ = 0;
	std::uint64_t pid_start_ = 0; // our own start time, by which the crash state names its writer
	usec_t watchdog_usec_ = 0;
	std::unique_ptr<sd_event, EventUnref> event_;
	std::list<Listener> listeners_; // stable addresses: services point at their listeners
	// Declared before the supervisor, whose output_line hook it set, so that it outlives it.
	std::unique_ptr<JournalLink> journal_;
	std::unique_ptr<Supervisor> supervisor_;
	std::unique_ptr<NotifySocket> notify_;
	std::unique_ptr<ControlServer> control_;
	// What the metrics count from events (kept across a re-exec), and the sock_diag socket that
	// reads unix listeners' accept queues.
	metrics::Counters counters_;
	proto::UniqueFd sock_diag_;
	// metrics.listen, when configured (daemon/metrics.cpp), and the socket file it bound.
	std::unique_ptr<metrics::MetricsServer> metrics_server_;
	std::string metrics_listen_; // as configured when it was bound
	std::string metrics_address_;
	std::string metrics_unlink_;
	std::unique_ptr<CrashState> crash_state_; // null when no memfd could be had
	std::unique_ptr<SentinelKeeper> sentinel_; // null without a service manager
	// Without a service manager: the fd holder that plays its store (daemon/fd_holder.hpp).
	std::unique_ptr<FdHolderLink> holder_;
	usec_t holder_started_ = 0; // CLOCK_MONOTONIC
	EventSource holder_again_;
	// After a crash of the brokerd before: what it kept in the fd store, until recover() used it
	// (daemon/recovery.cpp).
	struct CrashRestart {
		explicit CrashRestart(persist::StateFile f) : file(std::move(f)) {}
		persist::StateFile file;
		nlohmann::json state; // null when the memfd was never written: a clean start
		proto::UniqueFd notify; // until compose() serves it
		bool notify_kept = false;
		Serializer::CrashFds fds;
		proto::UniqueFd sentinel; // the write end of the sentinel that runs on
		pid_t crashed_pid = 0;
	};
	std::unique_ptr<CrashRestart> crash_;
	// brokerctl reexec, while its binary is being checked (one at a time).
	struct PendingReexec {
		std::string binary;
		int caller = -1;          // the caller's connection, which the next brokerd answers
		ReexecFailed failed;      // tells the caller why not
		std::string cfg_text;     // the config the binary was checked with
		std::unique_ptr<BinaryCheck> check;
	};
	std::unique_ptr<PendingReexec> reexec_; // destroyed before control_, whose connection it tells
	SystemdNotifier notifier_;
	EventSource sigterm_, sigint_, sighup_;
	EventSource watchdog_;
	usec_t watchdog_period_ = 0; // half of WATCHDOG_USEC
	bool announced_ready_ = false;
	usec_t extended_until_ = 0; // CLOCK_MONOTONIC: the start timeout was extended to then
	std::string last_status_;
	rlimit started_nofile_{};
};

} // namespace brokerd
