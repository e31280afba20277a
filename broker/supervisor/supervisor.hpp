// Supervisor: services, their generations and instances; spawning, readiness, upgrades, drain.
#pragma once

#include "proto/unique_fd.hpp"
#include "config/config.hpp"
#include "os/event.hpp"
#include "handoff/doubts.hpp"
#include "handoff/router.hpp"
#include "os/listener.hpp"
#include "supervisor/events.hpp"
#include "supervisor/model.hpp"
#include "supervisor/spawner.hpp"

#include <sys/resource.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace brokerd {

struct UpgradeRequest {
	config::ServiceConfig cfg;
	bool all_at_once = false;
	std::string kind = "upgrade";
	std::optional<config::Duration> drain_timeout; // overrides the old generation's too
	std::optional<uid_t> by;                        // who asked, for the history
};

class Supervisor {
public:
	Supervisor(sd_event *event, const std::list<Listener> &listeners, std::string control_path);
	~Supervisor();

	// RLIMIT_NOFILE for spawned workers: the limits brokerd started with (it raises its own).
	void set_child_nofile(const rlimit &limit) { child_nofile_ = limit; }

	// How processes start: fork_and_exec() unless a unit test puts its own in.
	void set_launcher(Launcher launcher) { launcher_ = std::move(launcher); }

	// NOTIFY_SOCKET for the workers; set before the first service is added.
	void set_notify_address(std::string address) { notify_address_ = std::move(address); }

	// Adds a service and starts its first generation (external services wait for workers).
	void add_service(const config::ServiceConfig &cfg);
	// A kept service's settings after a reload: the next upgrade (or registration) uses them;
	// running instances go on as they are. Its sockets do not change (the caller checks).
	void update_service(const config::ServiceConfig &cfg);
	// Drains a service removed from the config; it disappears once its instances exited.
	void remove_service(const std::string &name);
	Service *find_service(std::string_view name);
	bool uses_listener(const Listener &l) const;

	// A worker started elsewhere says Hello(service, version): checks the service's register rule
	// against the peer's credentials, and joins the generation of that version, or creates it.
	// Returns the new instance, or the refusal.
	// `pidfd` holds the process that connected, whose pid is `pid`.
	std::variant<Instance *, Refusal> register_external(Service &svc, const std::string &version, proto::UniqueFd pidfd,
	                                                    pid_t pid, uid_t uid, const std::vector<gid_t> &groups);
	// The control connection of a registered instance closed: it counts as exited.
	void connection_closed(std::string_view token);

	Instance *find_by_token(std::string_view token);
	Instance *find_by_pid(pid_t pid);
	// The pidfd brokerd holds for `pid`, one of the instance's processes, or -1.
	int pidfd_of(const Instance &inst, pid_t pid) const;
	// The instance whose Events stream `sink` carries: still found after the process exited,
	// until the connection closes or the instance is pruned.
	Instance *find_by_sink(const EventSink *sink);
	const Listener *find_listener(std::string_view name) const;
	const std::list<Listener> &listeners() const { return listeners_; }

	// Reports from workers, through the control or notify socket.
	void instance_ready(Instance &inst, std::string_view how);
	// The text as proto::check_status_text() takes it; returns why it is refused (the caller says so).
	std::optional<std::string> instance_status(Instance &inst, std::string text);
	void instance_stopping(Instance &inst);
	// MAINPID=: the worker's main process is another one of its session (a forking server).
	void instance_main_pid(Instance &inst, pid_t pid);
	// Opens the instance's one Events stream; false when it has one already.
	bool attach_events(Instance &inst, EventSink *sink);
	void detach_events(EventSink *sink);

	// Connection handoff: a Handoff call from sender's Events connection, and a Received call
	// from a receiver's. See HandoffRouter.
	void handoff(Instance &sender, EventSink &sink, std::uint64_t batch, std::vector<HandoffItem> items,
	             std::uint64_t remaining);
	// Direct channels (Worker.Peers): one socket pair per receiver sender has not met, their
	// ends sent to both; an empty "peers" when the path is brokerd's (see handoff.cpp).
	void handoff_peers(Instance &sender, EventSink &sink);
	// What moved on them (Worker.Handed), for the counters: peer names the receiver.
	struct Handed {
		std::string peer;
		std::uint64_t sent = 0, landed = 0, returned = 0, remaining = 0;
	};
	// Returns why the counts cannot be: a peer it was never introduced to, or more landed and
	// returned than sent. Nothing changes then.
	std::optional<std::string> handoff_handed(Instance &sender, const Handed &h);
	std::optional<std::string> handoff_received(EventSink &sink, std::uint64_t batch,
	                                            const std::vector<std::uint64_t> &refused);
	// A Resume call from inst's Events connection, after a restart of brokerd: what it received
	// from the brokerd before, and its batches in doubt. See HandoffDoubts. Returns why it is
	// refused (receipts that name another service's instance), or nullopt.
	std::optional<std::string> handoff_resume(Instance &inst, EventSink &sink,
	                                          std::vector<HandoffDoubts::Receipt> received,
	                                          const std::vector<HandoffDoubts::InDoubt> &in_doubt);
	// How long after a crash restart the batches in doubt wait for every instance that may hold
	// part of them to speak.
	static constexpr usec_t kResumeTimeout = usec(std::chrono::seconds(10));

	// Operator requests. Each returns the refusal, or nullopt once the work has begun; the
	// observer (may be null) hears the progress and the end. begin_upgrade returns its first
	// progress event (Accepted) once begun, which the observer heard too.
	std::variant<Event, Refusal> begin_upgrade(Service &svc, UpgradeRequest req, Observer *observer);
	std::optional<Refusal> abort_upgrade(Service &svc);
	std::optional<Refusal> start_service(Service &svc, Observer *observer, std::optional<uid_t> by = std::nullopt);
	std::optional<Refusal> stop_service(Service &svc, Observer *observer);
	// Scale (supervisor/scale.cpp): the current generation runs `instances` from now on, and so
	// does every later one until a reload changes the config's count. Starts the missing
	// instances or drains the highest-index ones; the observer hears finished() once those are
	// ready or exited, failed(StartFailed) when a new one did not get ready. Returns the count
	// before and after, or the refusal (InvalidParameter's range is the caller's to check).
	struct Scaled {
		unsigned from = 0;
		unsigned to = 0;
		bool pending = false; // the observer hears the end; otherwise it is over already
	};
	std::variant<Scaled, Refusal> scale_service(Service &svc, unsigned instances, Observer *observer);
	// Sends sig to every live instance process of every generation of the service, through the
	// pidfd brokerd holds; returns the ids of the instances signalled.
	std::vector<std::string> signal_service(Service &svc, int sig);
	void detach_observer(Observer *observer);

	// Drains every instance, then SIGKILL at its drain timeout or at the end of `budget`,
	// whichever comes first; instances already draining keep their deadline only if it is
	// sooner. stopped() once all exited.
	void shutdown(config::Duration budget);
	// The kill step now (a second SIGTERM): SIGKILL for every instance's whole session, or its
	// process (registered, or the main pid MAINPID= named, through its pidfd).
	void kill_all();
	bool shutting_down() const { return shutting_down_; }
	bool stopped() const;
	// Every instance has had its first attempt: it got ready, or failed at least once (it may be
	// restarting), or was stopped for good. brokerd is ready then, whatever else cannot start.
	bool settled() const;
	// CLOCK_MONOTONIC usec of the last start timeout of an instance still on its first attempt,
	// or 0 when none is waiting for one.
	usec_t first_starts_deadline() const;

	// Self-upgrade (brokerctl reexec). busy(): what is starting, draining, restarting or
	// rolling out, or being handed off, or nullopt when nothing is, so that the state is only
	// what the Serializer writes.
	std::optional<std::string> busy() const;
	// save_state() and restore_state() are the Serializer's (supervisor/serialize.hpp).
	// A service it restored: its instances are watched again, and it serves as before.
	void adopt(std::unique_ptr<Service> svc);
	// A service from the crash state of a brokerd that was killed (Serializer::restore_crashed):
	// each process is found again by its identity and watched through a pidfd; one that is gone
	// counts as exited with an unknown status and its slot goes on under its restart policy; the
	// timers go on to the dead brokerd's deadlines. An upgrade the crash interrupted ends as
	// recover_upgrade() says.
	void readopt(std::unique_ptr<Service> svc);

	// What readopt() found: processes watched again, instances whose process was gone (their ids),
	// and how each interrupted upgrade ended.
	struct Recovery {
		pid_t crashed_pid = 0; // 0: this brokerd did not start after a crash
		usec_t at = 0;         // CLOCK_REALTIME
		unsigned kept = 0;
		std::vector<std::string> lost;    // ended while brokerd was down: restarted under their policy
		std::vector<std::string> drained; // ended while brokerd was down, draining as asked
		std::vector<std::string> interrupted;
		// Handoffs in flight at the crash, as settled since (HandoffDoubts).
		std::uint64_t doubt_batches = 0, doubt_connections = 0, doubt_landed = 0, doubt_returned = 0,
		              doubt_abandoned = 0;
		std::size_t doubt_pending = 0;
	};
	Recovery recovery() const
	{
		Recovery r = recovery_;
		r.doubt_pending = doubts_.pending();
		return r;
	}
	// Before the crashed brokerd's services are readopted.
	void begin_recovery(pid_t crashed_pid)
	{
		recovery_.crashed_pid = crashed_pid;
		recovery_.at = now_usec(CLOCK_REALTIME);
	}

	// For Status: every service, in the order they were added.
	const std::vector<std::unique_ptr<Service>> &services() const { return services_; }
	std::string summary() const;

	// Called after any state change, so the daemon can update READY=/STATUS= and finish a shutdown.
	std::function<void()> on_change;
	// Every event, for Watch.
	std::function<void(const Event &)> on_event;
	// Reads what workers sent the notify socket so far; called before an exit is judged.
	std::function<void()> read_notifications;
	// The service manager's fd store, when there is one: the read ends of the workers' output
	// pipes are kept there (as "pipe.<inode>"), so that they outlive a crash of brokerd and a
	// worker never gets EPIPE from logging. keep_fd says whether the store took it.
	std::function<bool(const std::string &name, int fd)> keep_fd;
	// A worker's output added to its last lines (kept in the crash state, which may wait for it).
	std::function<void()> output_kept;
	std::function<void(const std::string &name)> release_fd;
	// Where each line of a worker's output goes (stream 1 or 2): false when it cannot be taken
	// now (the journal is full); the pipe then waits, unread, for resume_output(). `last`: the
	// pipe ended, the line must be taken. Unset: brokerd's own stdout or stderr, with the
	// instance's name before it.
	std::function<bool(const Instance &inst, int stream, std::string_view line, bool last)> output_line;
	// Lines can be taken again: the pipes that waited pass theirs on and are read again.
	void resume_output();

private:
	// A new generation, recorded in the service's history as coming `how`, asked for `by`.
	Generation &new_generation(Service &svc, const config::ServiceConfig &cfg, GenerationOrigin how,
	                           std::optional<uid_t> by);
	Instance &add_instance(Generation &gen);
	void spawn(Instance &inst);
	std::optional<std::string> watch_child(Instance &inst, pid_t pid);
	void watch_pipes(Instance &inst, ChildPipes &pipes);
	void set_state(Instance &inst, InstanceState s);
	void drain(Instance &inst, std::optional<config::Duration> timeout = std::nullopt);
	// A drain's time, cut to what is left of the shutdown budget once shutting down.
	usec_t drain_time(config::Duration timeout) const;
	// Whether it was sent.
	bool signal(Instance &inst, int sig);
	void kill_instance(Instance &inst, std::string reason);
	void on_exit(Instance &inst, const siginfo_t &si);
	void on_exec_status(Instance &inst, bool exiting);
	void on_output(Instance &inst, OutputPipe &pipe, bool eof);
	// Passes on the pipe's lines not passed on yet; false when some must wait.
	bool forward_output(Instance &inst, OutputPipe &pipe, bool last);
	// A pipe's read end goes into the fd store, or leaves it and closes.
	void keep_pipe(OutputPipe &pipe);
	void close_pipe(OutputPipe &pipe);
	void schedule_restart(Instance &inst);
	// The instance's process is gone (or never started): restart, fail an upgrade, or retire.
	void after_exit(Instance &inst, bool clean);
	void arm_timer(Instance &inst, usec_t after, int (*cb)(sd_event_source *, std::uint64_t, void *));
	void emit(const Instance &inst, EventKind kind, const std::string &message = {});
	void emit_service(const Service &svc, EventKind kind, const std::string &message,
	                  std::optional<HandoffTotals> handoff = std::nullopt);
	// A service's event for Watch, with what emit_service fills in; emit_event sends any event.
	Event service_event(const Service &svc, EventKind kind, const std::string &message) const;
	void emit_event(const Event &e);
	void notify_observers(const Upgrade &up, const Event &e);
	void changed();
	void schedule_prune();
	void prune();
	void check_waiters(Service &svc);
	void check_scale_waiters(Service &svc);
	// A Scale's end: nullopt while it waits, else how it ended (a StartFailed, or none).
	std::optional<std::optional<Refusal>> scale_outcome(const Service &svc, const ScaleWaiter &w) const;

	// Upgrades: feed the rollout, then carry out what it asks.
	void apply(Service &svc, const RolloutStep &step);
	void finish_upgrade(Service &svc);
	std::vector<Instance *> handoff_receivers(const Instance &sender) const;
	std::vector<EventSink *> handoff_targets(const Instance &sender) const;
	void handoff_report(const HandoffRouter::Report &r);
	void handoff_progress(Service &svc);
	void settle_doubts(std::vector<HandoffDoubts::Resolved> resolved);
	static int doubts_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	// An event of the service's upgrade, for its observers.
	Event progress(const Service &svc, EventKind kind, const Instance *inst, const std::string &message) const;

	static int child_handler(sd_event_source *s, const siginfo_t *si, void *userdata);
	static int external_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	void external_exit(Instance &inst, const std::string &how);
	static int exec_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int output_handler(sd_event_source *s, int fd, std::uint32_t revents, void *userdata);
	static int start_timeout_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	static int drain_timeout_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	static int restart_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	static int registration_handler(sd_event_source *s, std::uint64_t usec, void *userdata);
	void begin_takeover(Service &svc, Generation &gen);
	Instance *find_awaiting_hello(Service &svc, const std::string &version, int pidfd, pid_t pid);
	void check_registrations(Upgrade &up);
	static int prune_handler(sd_event_source *s, void *userdata);
	void watch_restored(Instance &inst);
	void watch_output(Instance &inst);
	// Whether its process was still there.
	bool readopt(Instance &inst);
	void lost_while_down(Instance &inst, const std::string &why);
	void recover_upgrade(Service &svc);

	sd_event *event_;
	const std::list<Listener> &listeners_;
	std::string control_path_;
	std::string notify_address_;
	std::vector<std::unique_ptr<Service>> services_;
	EventSource prune_source_;
	bool shutting_down_ = false;
	usec_t shutdown_deadline_ = 0; // CLOCK_MONOTONIC: every instance is killed by then
	HandoffRouter router_;
	HandoffDoubts doubts_;
	EventSource doubts_timer_;
	rlimit child_nofile_{};
	Launcher launcher_ = fork_and_exec;
	// What the world may learn only once the crash state says it (the state is written at the
	// end of the turn of the loop, at the highest priority): children spawned in this turn wait
	// for their go byte (SpawnPlan::go_write), and instances drained in it for their drain
	// request or signal (Instance::drain_untold). held_source_ runs right after the state's write.
	void hold();
	static int held_handler(sd_event_source *s, void *userdata);
	void tell_drain(Instance &inst);
	usec_t drain_left(const Instance &inst) const;
	std::vector<proto::UniqueFd> pending_go_;
	EventSource held_source_;
	Recovery recovery_;
};

} // namespace brokerd
