// The daemon's composition: the loop, its signals, the listeners and the fd store, the
// watchdog, and what the service manager is told as things change.
#include "daemon/daemon.hpp"

#include "broker_config.h"
#include "daemon/state.hpp"
#include "os/closer.hpp"
#include "os/log.hpp"
#include "os/peer.hpp"
#include "os/socket_stats.hpp"
#include "supervisor/serialize.hpp"

#include <systemd/sd-daemon.h>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

namespace brokerd {

Daemon::Daemon(nlohmann::json restored) : restored_(std::move(restored))
{
	config_path_ = restored_.at("config_path").get<std::string>();
	cfg_text_ = restored_.at("config_text").get<std::string>();
	cfg_ = config::parse(cfg_text_);
}

// Binds or adopts every configured socket; returns the control socket if systemd passed one.
proto::UniqueFd Daemon::open_listeners()
{
	// Connections being handed off pass through brokerd, up to 16 batches of 253 per draining
	// worker: raise the soft fd limit to the hard one, as the service manager recommends, and
	// give workers the limit we were started with.
	if (getrlimit(RLIMIT_NOFILE, &started_nofile_) == 0 && started_nofile_.rlim_cur < started_nofile_.rlim_max) {
		rlimit raised = started_nofile_;
		raised.rlim_cur = raised.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &raised) < 0)
			log::warning(std::string("cannot raise the fd limit: ") + std::strerror(errno));
	}

	// systemd's fds first, before anything else could take their numbers' meaning. A crash state
	// among them brings the config the crashed brokerd ran.
	InheritedFds inherited = InheritedFds::from_environment();
	take_fd_holder(inherited);
	take_crash_state(inherited);
	take_sentinel(inherited);
	proto::UniqueFd control_fd = adopt_control_socket(inherited);
	for (const auto &s : cfg_.sockets) {
		// A socket kept in the fd store by an earlier brokerd comes back under its own name,
		// with whatever its accept queue holds.
		auto stored = s.kind == config::SocketKind::Systemd ? inherited.by_name.end() : inherited.by_name.find(s.name);
		if (stored != inherited.by_name.end()) {
			proto::UniqueFd fd = std::move(stored->second);
			inherited.by_name.erase(stored);
			auto stored_listener = adopt_stored(s, std::move(fd));
			if (auto *l = std::get_if<Listener>(&stored_listener)) {
				listeners_.push_back(std::move(*l));
				continue;
			}
			log::warning("socket " + s.name + ": not adopting the service manager's stored socket: " +
			             std::get<Failure>(stored_listener).why + "; releasing it");
			notifier_.send("FDSTOREREMOVE=1\nFDNAME=" + s.name);
		}
		listeners_.push_back(open_listener(s, inherited));
	}
	for (auto &[name, fd] : inherited.by_name) {
		log::warning("systemd passed socket \"" + name + "\", which no config entry names; closing it");
		notifier_.send("FDSTOREREMOVE=1\nFDNAME=" + name);
	}
	inherited.by_name.clear();
	for (const auto &l : listeners_) {
		const char *how = l.origin == "systemd" ? "adopted " : l.origin == "fdstore" ? "kept by the service manager: "
		                                                                            : "listening on ";
		log::info("socket " + l.name + ": " + how + l.address);
	}
	return control_fd;
}

// Everything the previous brokerd held, at the same fd numbers; CLOEXEC again at once.
proto::UniqueFd Daemon::restore_listeners()
{
	const nlohmann::json &st = restored_;
	started_nofile_.rlim_cur = st.at("nofile").at(0).get<rlim_t>();
	started_nofile_.rlim_max = st.at("nofile").at(1).get<rlim_t>();
	for (const auto &j : st.at("listeners")) {
		Listener l;
		l.name = j.at("name").get<std::string>();
		l.fd.reset(j.at("fd").get<int>());
		state::set_cloexec(l.fd.get(), true);
		l.address = j.at("address").get<std::string>();
		l.kind = j.at("kind").get<std::string>();
		l.origin = j.at("origin").get<std::string>();
		l.unlink_path = j.at("unlink_path").get<std::string>();
		listeners_.push_back(std::move(l));
	}
	proto::UniqueFd control_fd(st.at("control").at("fd").get<int>());
	state::set_cloexec(control_fd.get(), true);
	watchdog_usec_ = st.at("watchdog_usec").get<std::uint64_t>();
	announced_ready_ = st.at("announced_ready").get<bool>();
	last_status_ = st.at("last_status").get<std::string>();
	if (st.contains("fd_holder"))
		carry_fd_holder(st.at("fd_holder"));
	return control_fd;
}

int Daemon::run()
{
	const bool restoring = !restored_.is_null();
	start_usec_ = restoring ? restored_.at("start_usec").get<std::uint64_t>() : now_usec(CLOCK_MONOTONIC);
	if (auto self = peer::identity(::getpid()))
		pid_start_ = self->start_ticks;
	proto::UniqueFd control_fd = restoring ? restore_listeners() : open_listeners();
	closer::start();

	sd_event *e = nullptr;
	int r = sd_event_new(&e);
	if (r < 0)
		throw std::runtime_error(std::string("sd_event_new: ") + std::strerror(-r));
	event_.reset(e);
	notifier_.attach(e);
	if (holder_)
		holder_->watch(e, [this] { on_holder_lost(); });
	add_signals();

	// The service manager's watchdog (WATCHDOG_USEC): fed at half its period from the loop, so a
	// stuck loop is exactly what it catches. sd_watchdog_enabled() unsets the variables, so a
	// re-executed brokerd learns the period from its predecessor.
	if (!restoring && notifier_.enabled() && sd_watchdog_enabled(1, &watchdog_usec_) <= 0)
		watchdog_usec_ = 0;
	setup_watchdog();

	compose(std::move(control_fd));
	open_metrics();
	keep_crash_state();
	keep_sentinel();
	if (restoring)
		carry_on();
	else if (crash_ && !crash_->state.is_null())
		recover();
	else
		start_services();
	crash_.reset();
	// Lines a crashed brokerd read but had not passed on yet.
	supervisor_->resume_output();
	// Readiness is judged once every service is there: one that fails at once must not make
	// READY=1 come before the others have started.
	supervisor_->on_change = [this] { on_change(); };
	on_change();

	if (holder_)
		holder_->running();
	r = sd_event_loop(e);
	if (r < 0)
		throw std::runtime_error(std::string("event loop: ") + std::strerror(-r));

	control_.reset();
	close_metrics();
	for (const auto &l : listeners_)
		remove_socket_file(l);
	// Every worker is gone: a brokerd started next finds nothing to carry on with.
	if (crash_state_)
		crash_state_->write_last(nlohmann::json{{"format", kCrashFormat},
		                                        {"version", BROKER_VERSION},
		                                        {"pid", ::getpid()},
		                                        {"pid_start", pid_start_},
		                                        {"stopped", true}}
		                             .dump());
	// Nothing is left for it to end.
	if (sentinel_)
		sentinel_->stop();
	// Nor for the fd holder to keep.
	if (holder_)
		holder_->stop();
	log::notice("stopped");
	return r;
}

// SIGTERM and SIGINT stop brokerd; SIGHUP reloads the config.
void Daemon::add_signals()
{
	sd_event *e = event_.get();
	sd_event_source *s = nullptr;
	int r = 0;
	if ((r = sd_event_add_signal(e, &s, SIGTERM, on_signal, this)) < 0)
		throw std::runtime_error(std::string("signal: ") + std::strerror(-r));
	sigterm_.reset(s);
	if ((r = sd_event_add_signal(e, &s, SIGINT, on_signal, this)) < 0)
		throw std::runtime_error(std::string("signal: ") + std::strerror(-r));
	sigint_.reset(s);
	// SIGHUP reloads the config, as with most daemons (and brokerctl reload).
	auto on_hup = [](sd_event_source *, const signalfd_siginfo *, void *userdata) -> int {
		return guarded("SIGHUP", [&]() -> int {
			auto *d = static_cast<Daemon *>(userdata);
			if (d->supervisor_->shutting_down())
				return 0;
			log::notice("received SIGHUP, reloading");
			try {
				d->reload();
			} catch (const std::exception &e) {
				log::error(std::string("reload failed, keeping the running config: ") + e.what());
			}
			return 0;
		});
	};
	if ((r = sd_event_add_signal(e, &s, SIGHUP, on_hup, this)) < 0)
		throw std::runtime_error(std::string("signal: ") + std::strerror(-r));
	sighup_.reset(s);
}

// The supervisor, the workers' notify socket and the control server, wired to each other.
void Daemon::compose(proto::UniqueFd control_fd)
{
	sd_event *e = event_.get();
	supervisor_ = std::make_unique<Supervisor>(e, listeners_, cfg_.control.path);
	supervisor_->set_child_nofile(started_nofile_);
	proto::UniqueFd notify_fd;
	if (!restored_.is_null()) {
		notify_fd.reset(restored_.at("notify_fd").get<int>());
		state::set_cloexec(notify_fd.get(), true);
	} else if (crash_ && !crash_->state.is_null()) {
		// The workers' NOTIFY_SOCKET: what they sent while brokerd was down waits in it.
		notify_fd = std::move(crash_->notify);
	}
	notify_ = std::make_unique<NotifySocket>(e, *supervisor_, std::move(notify_fd));
	supervisor_->set_notify_address(notify_->address());
	supervisor_->read_notifications = [this] { notify_->receive(); };
	supervisor_->output_kept = [this] {
		if (crash_state_)
			crash_state_->changed_soon();
	};
	notify_->persist = [this] {
		if (crash_state_)
			crash_state_->write();
	};
	journal_ = std::make_unique<JournalLink>(e, *supervisor_);
	journal_->apply(cfg_.logging.journal);
	supervisor_->keep_fd = [this](const std::string &name, int fd) { return store_fd(name, fd); };
	supervisor_->release_fd = [this](const std::string &name) {
		notifier_.send("FDSTOREREMOVE=1\nFDNAME=" + name);
	};
	DaemonHooks hooks;
	hooks.read_config = [this] { return config::load(config_path_); };
	hooks.reload = [this] { return reload(); };
	hooks.reexec = [this](const std::string &binary, int caller, ReexecFailed failed) {
		reexec(binary, caller, std::move(failed));
	};
	hooks.drop_reexec = [this] { drop_reexec(); };
	sock_diag_ = open_sock_diag();
	hooks.sock_diag = sock_diag_.get();
	hooks.metrics = [this] { return metric_families(); };
	control_ = std::make_unique<ControlServer>(e, cfg_.control, *supervisor_, std::move(hooks), start_usec_,
	                                           std::move(control_fd));
	supervisor_->on_event = [this](const Event &ev) {
		counters_.observe(ev);
		control_->broadcast(ev);
		journal_->event(ev);
	};
}

// After a re-exec: the services and connections the previous brokerd had, as they were.
void Daemon::carry_on()
{
	Serializer::restore(*supervisor_, restored_.at("services"));
	control_->restore_state(restored_.at("control"));
	// A brokerd before metrics left none: they start at 0, as after a crash.
	if (restored_.contains("metrics"))
		counters_ = metrics::Counters::restore(restored_.at("metrics").at("counters"));
	log::EventRecord record = reexec_record(BROKER_VERSION, restored_.at("services").size(), control_->connections());
	log::event(record);
	Event e;
	e.kind = EventKind::Reexec;
	e.pid = ::getpid();
	e.version = BROKER_VERSION;
	e.message = record.message;
	broadcast_own(std::move(e));
	restored_ = nullptr;
}

void Daemon::broadcast_own(Event e)
{
	e.time = now_usec(CLOCK_REALTIME);
	control_->broadcast(e);
}

// A fresh start: the fd store gets what we bound, and every configured service starts.
void Daemon::start_services()
{
	log::info("control socket: " + cfg_.control.path + (control_->adopted() ? " (adopted from systemd)" : ""));
	// The service manager keeps what we bound in its fd store, so that a brokerd it
	// restarts after a crash finds the same sockets, accept queues and all.
	if (!control_->adopted())
		store_fd("control", control_->fd());
	for (const auto &l : listeners_)
		if (l.origin == "bound")
			store_fd(l.name, l.fd.get());
	// What workers send while brokerd is down waits in its queue.
	store_fd("notify", notify_->fd());
	for (const auto &svc : cfg_.services)
		supervisor_->add_service(svc);
}

int Daemon::on_signal(sd_event_source *, const signalfd_siginfo *si, void *userdata)
{
	return guarded("on_signal", [&]() -> int {
		auto *d = static_cast<Daemon *>(userdata);
		if (d->supervisor_->shutting_down()) {
			// Whoever asks twice does not want to wait for the drain: the kill step now.
			log::notice(std::string("received SIG") + sigabbrev_np(static_cast<int>(si->ssi_signo)) +
			            " again, killing every instance");
			d->supervisor_->kill_all();
			return 0;
		}
		log::EventRecord record = shutdown_record(std::string("SIG") + sigabbrev_np(static_cast<int>(si->ssi_signo)),
		                                          usec(d->cfg_.shutdown.timeout));
		log::event(record);
		// Before any stream closes: the drain that follows ends them.
		Event e;
		e.kind = EventKind::Shutdown;
		e.message = record.message;
		d->broadcast_own(std::move(e));
		d->cancel_reexec("brokerd is shutting down");
		d->notifier_.send("STOPPING=1");
		d->supervisor_->shutdown(d->cfg_.shutdown.timeout);
		return 0;
	});
}

// The control socket, when systemd passes one named "control" (brokerd.socket, or ours from the
// fd store) at control.path. One elsewhere is released: brokerctl and the workers look for
// control.path.
proto::UniqueFd Daemon::adopt_control_socket(InheritedFds &inherited)
{
	auto it = inherited.by_name.find("control");
	if (it == inherited.by_name.end())
		return {};
	proto::UniqueFd fd = std::move(it->second);
	inherited.by_name.erase(it);
	std::string have = socket_address(fd.get());
	std::string want = "unix:" + cfg_.control.path;
	bool listening = sd_is_socket_unix(fd.get(), SOCK_STREAM, 1, nullptr, 0) > 0;
	if (have == want && listening && unix_file_present(cfg_.control.path))
		return fd;
	std::string why = have != want   ? "it is " + (have.empty() ? std::string("not a socket") : have) +
	                                     ", not control.path " + cfg_.control.path
	                  : !listening ? std::string("it is not a listening stream socket")
	                               : "its file " + cfg_.control.path + " is gone";
	log::warning("not adopting the control socket systemd passed: " + why + "; releasing it");
	notifier_.send("FDSTOREREMOVE=1\nFDNAME=control");
	return {};
}

void Daemon::setup_watchdog()
{
	if (watchdog_usec_ < 2)
		return;
	watchdog_period_ = watchdog_usec_ / 2;
	auto tick = [](sd_event_source *src, std::uint64_t now, void *userdata) -> int {
		return guarded("watchdog", [&]() -> int {
			auto *d = static_cast<Daemon *>(userdata);
			d->notifier_.send("WATCHDOG=1");
			sd_event_source_set_time(src, now + d->watchdog_period_);
			sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
			return 0;
		});
	};
	sd_event_source *s = nullptr;
	if (sd_event_add_time(event_.get(), &s, CLOCK_MONOTONIC, now_usec(CLOCK_MONOTONIC), watchdog_period_ / 10, tick,
	                      this) >= 0) {
		watchdog_.reset(s);
		log::info("feeding the service manager's watchdog every " + std::to_string(watchdog_period_ / 1000) + "ms");
	}
}

bool Daemon::store_fd(const std::string &name, int fd, bool poll)
{
	if (!notifier_.enabled())
		return false;
	if (notifier_.send_with_fd(SystemdNotifier::store_message(name, poll), fd))
		return true;
	log::warning(name + ": " + notifier_.target() + " did not take it into its fd store");
	return false;
}

void Daemon::close_unused_listeners()
{
	for (auto it = listeners_.begin(); it != listeners_.end();) {
		if (cfg_.find_socket(it->name) || supervisor_->uses_listener(*it)) {
			++it;
			continue;
		}
		log::notice("socket " + it->name + ": no longer configured or used, closing it");
		if (it->origin != "systemd")
			notifier_.send("FDSTOREREMOVE=1\nFDNAME=" + it->name);
		remove_socket_file(*it);
		it = listeners_.erase(it);
	}
}

// Until READY=1, the service manager's start timeout (TimeoutStartSec=) is pushed past the last
// start timeout of a first attempt: READY=1 comes by then at the latest, as every instance has
// had its first attempt, so a start_timeout above TimeoutStartSec fails no start.
void Daemon::extend_start()
{
	// From the start timeout's SIGKILL to READY=1: the exit to be reaped, and the loop to turn.
	constexpr std::uint64_t kSlack = 5'000'000;
	std::uint64_t until = supervisor_->first_starts_deadline();
	if (until <= extended_until_)
		return;
	extended_until_ = until;
	usec_t now = now_usec(CLOCK_MONOTONIC);
	notifier_.send("EXTEND_TIMEOUT_USEC=" + std::to_string((until > now ? until - now : 0) + kSlack));
}

// The crash state: kept from now on, written as things change (daemon/crash_state.hpp).
void Daemon::keep_crash_state()
{
	auto snapshot = [this] { return crash_snapshot(); };
	if (crash_) {
		// The crashed brokerd's: in the fd store already, written on after its newest slot.
		crash_state_ = std::make_unique<CrashState>(event_.get(), std::move(crash_->file), snapshot);
		return;
	}
	if (!restored_.is_null() && restored_.contains("crash_state_fd")) {
		// A re-exec carries the one in the fd store over.
		proto::UniqueFd fd(restored_.at("crash_state_fd").get<int>());
		state::set_cloexec(fd.get(), true);
		auto kept = persist::StateFile::adopt(std::move(fd));
		if (auto *f = std::get_if<persist::StateFile>(&kept)) {
			crash_state_ = std::make_unique<CrashState>(event_.get(), std::move(*f), snapshot);
			return;
		}
		log::warning("crash state: the one carried over is refused: " + std::get<Failure>(kept).why + "; a new one replaces it");
		notifier_.send("FDSTOREREMOVE=1\nFDNAME=state");
	}
	auto file = persist::StateFile::create();
	if (auto *f = std::get_if<Failure>(&file)) {
		log::warning("crash state: " + f->why + "; none is kept");
		return;
	}
	crash_state_ = std::make_unique<CrashState>(event_.get(), std::move(std::get<persist::StateFile>(file)), snapshot);
	// A memfd is no pollable fd: the service manager must keep it without watching it.
	store_fd("state", crash_state_->fd(), false);
}

// What a brokerd started after a crash of this one needs: the config, the listeners and the
// services, as a re-exec carries them. Fd numbers in the services are this process's and mean
// nothing after it; a listener is known again by its address and its inode.
std::string Daemon::crash_snapshot() const
{
	nlohmann::json listeners = nlohmann::json::array();
	for (const auto &l : listeners_) {
		struct stat st {};
		::fstat(l.fd.get(), &st);
		listeners.push_back({{"name", l.name},
		                     {"address", l.address},
		                     {"kind", l.kind},
		                     {"origin", l.origin},
		                     {"inode", st.st_ino}});
	}
	nlohmann::json state = {{"format", kCrashFormat},
	                        {"version", BROKER_VERSION},
	                        {"pid", ::getpid()},
	                        {"pid_start", pid_start_},
	                        {"config_path", config_path_},
	                        {"config_text", cfg_text_},
	                        {"listeners", std::move(listeners)},
	                        {"control_owned", control_->owns_file()}};
	return Serializer::save_text(*supervisor_, std::move(state), history_texts_);
}

void Daemon::on_change()
{
	if (crash_state_)
		crash_state_->changed();
	if (!supervisor_->shutting_down() && listeners_.size() > cfg_.sockets.size())
		close_unused_listeners();
	if (supervisor_->shutting_down()) {
		if (supervisor_->stopped())
			sd_event_exit(event_.get(), 0);
		return;
	}
	std::string status = supervisor_->summary();
	if (!announced_ready_ && supervisor_->settled()) {
		// What the service manager hears of is in the crash state first.
		if (crash_state_)
			crash_state_->write();
		announced_ready_ = true;
		log::notice("ready: " + status);
		notifier_.send("READY=1\nSTATUS=" + status);
		last_status_ = status;
	} else if (!announced_ready_) {
		extend_start();
	} else if (status != last_status_) {
		notifier_.send("STATUS=" + status);
		last_status_ = status;
	}
}

} // namespace brokerd
