// brokerd: owns the listening sockets and the workers of every service, and serves the control socket.
#include "broker_config.h"
#include "os/closer.hpp"
#include "config/config.hpp"
#include "control/server.hpp"
#include "os/event.hpp"
#include "os/listener.hpp"
#include "os/log.hpp"
#include "os/notify.hpp"
#include "daemon/state.hpp"
#include "supervisor/supervisor.hpp"
#include "os/systemd_notify.hpp"

#include <systemd/sd-daemon.h>

#include <CLI/CLI.hpp>

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <list>
#include <memory>
#include <optional>

namespace brokerd {
namespace {

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
	static int on_signal(sd_event_source *s, const signalfd_siginfo *si, void *userdata);
	void on_change();
	nlohmann::json reload();
	void close_unused_listeners();
	proto::UniqueFd adopt_control_socket(InheritedFds &inherited);
	void store_fd(const std::string &name, int fd);
	proto::UniqueFd open_listeners();
	proto::UniqueFd restore_listeners();
	void setup_watchdog();
	void extend_start();
	void reexec(const std::string &binary, int caller);
	void check_binary(const std::string &binary, int state_fd);

	std::string config_path_;
	config::Config cfg_;
	std::string cfg_text_;     // the file as cfg_ was parsed from it, for a re-exec
	nlohmann::json restored_;  // a previous brokerd's state, until run() has used it
	std::uint64_t start_usec_ = 0;
	std::uint64_t watchdog_usec_ = 0;
	std::unique_ptr<sd_event, EventUnref> event_;
	std::list<Listener> listeners_; // stable addresses: services point at their listeners
	std::unique_ptr<Supervisor> supervisor_;
	std::unique_ptr<NotifySocket> notify_;
	std::unique_ptr<ControlServer> control_;
	SystemdNotifier notifier_;
	EventSource sigterm_, sigint_, sighup_;
	EventSource watchdog_;
	std::uint64_t watchdog_period_ = 0; // usec: half of WATCHDOG_USEC
	bool announced_ready_ = false;
	std::uint64_t extended_until_ = 0; // CLOCK_MONOTONIC usec the start timeout was extended to
	std::string last_status_;
	rlimit started_nofile_{};
};

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

	// systemd's fds first, before anything else could take their numbers' meaning.
	InheritedFds inherited = InheritedFds::from_environment();
	proto::UniqueFd control_fd = adopt_control_socket(inherited);
	for (const auto &s : cfg_.sockets) {
		// A socket kept in the fd store by an earlier brokerd comes back under its own name,
		// with whatever its accept queue holds.
		auto stored = s.kind == config::SocketKind::Systemd ? inherited.by_name.end() : inherited.by_name.find(s.name);
		if (stored != inherited.by_name.end()) {
			proto::UniqueFd fd = std::move(stored->second);
			inherited.by_name.erase(stored);
			std::string why;
			if (auto l = adopt_stored(s, std::move(fd), why)) {
				listeners_.push_back(std::move(*l));
				continue;
			}
			log::warning("socket " + s.name + ": not adopting the service manager's stored socket: " + why +
			             "; releasing it");
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
	return control_fd;
}

int Daemon::run()
{
	const bool restoring = !restored_.is_null();
	start_usec_ = restoring ? restored_.at("start_usec").get<std::uint64_t>() : now_usec(CLOCK_MONOTONIC);
	const std::uint64_t start = start_usec_;
	proto::UniqueFd control_fd = restoring ? restore_listeners() : open_listeners();
	closer::start();

	sd_event *e = nullptr;
	int r = sd_event_new(&e);
	if (r < 0)
		throw std::runtime_error(std::string("sd_event_new: ") + std::strerror(-r));
	event_.reset(e);

	sd_event_source *s = nullptr;
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

	// The service manager's watchdog (WATCHDOG_USEC): fed at half its period from the loop, so a
	// stuck loop is exactly what it catches. sd_watchdog_enabled() unsets the variables, so a
	// re-executed brokerd learns the period from its predecessor.
	if (!restoring && notifier_.enabled() && sd_watchdog_enabled(1, &watchdog_usec_) <= 0)
		watchdog_usec_ = 0;
	setup_watchdog();

	supervisor_ = std::make_unique<Supervisor>(e, listeners_, cfg_.control.path);
	supervisor_->set_child_nofile(started_nofile_);
	proto::UniqueFd notify_fd;
	if (restoring) {
		notify_fd.reset(restored_.at("notify_fd").get<int>());
		state::set_cloexec(notify_fd.get(), true);
	}
	notify_ = std::make_unique<NotifySocket>(e, *supervisor_, std::move(notify_fd));
	supervisor_->set_notify_address(notify_->address());
	supervisor_->read_notifications = [this] { notify_->receive(); };
	DaemonHooks hooks;
	hooks.read_config = [this] { return config::load(config_path_); };
	hooks.reload = [this] { return reload(); };
	hooks.reexec = [this](const std::string &binary, int caller) { reexec(binary, caller); };
	control_ = std::make_unique<ControlServer>(e, cfg_.control, *supervisor_, std::move(hooks), start,
	                                           std::move(control_fd));
	supervisor_->on_event = [this](const nlohmann::json &ev) { control_->broadcast(ev); };

	if (restoring) {
		supervisor_->restore_state(restored_.at("services"));
		control_->restore_state(restored_.at("control"));
		log::notice("re-executed: brokerd " BROKER_VERSION " carries on with " +
		            std::to_string(restored_.at("services").size()) + " service(s), " +
		            std::to_string(control_->connections()) + " worker connection(s)");
		restored_ = nullptr;
	} else {
		log::info("control socket: " + cfg_.control.path + (control_->adopted() ? " (adopted from systemd)" : ""));
		// The service manager keeps what we bound in its fd store, so that a brokerd it
		// restarts after a crash finds the same sockets, accept queues and all.
		if (!control_->adopted())
			store_fd("control", control_->fd());
		for (const auto &l : listeners_)
			if (l.origin == "bound")
				store_fd(l.name, l.fd.get());
		for (const auto &svc : cfg_.services)
			supervisor_->add_service(svc);
	}
	// Readiness is judged once every service is there: one that fails at once must not make
	// READY=1 come before the others have started.
	supervisor_->on_change = [this] { on_change(); };
	on_change();

	r = sd_event_loop(e);
	if (r < 0)
		throw std::runtime_error(std::string("event loop: ") + std::strerror(-r));

	control_.reset();
	for (const auto &l : listeners_)
		remove_socket_file(l);
	log::notice("stopped");
	return r;
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
		log::notice(std::string("received SIG") + sigabbrev_np(static_cast<int>(si->ssi_signo)));
		d->notifier_.send("STOPPING=1");
		d->supervisor_->shutdown(d->cfg_.shutdown.timeout);
		return 0;
	});
}

// Applies the config file again: new sockets are bound and new services started; removed
// services drain, and a removed socket closes only once no service uses it any more.
nlohmann::json Daemon::reload()
{
	std::string next_text;
	config::Config next = config::load(config_path_, next_text);
	AccessRules rules = AccessRules::resolve(next.control);
	notifier_.send("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(now_usec(CLOCK_MONOTONIC)));
	nlohmann::json result = {{"added_sockets", nlohmann::json::array()},
	                         {"removed_sockets", nlohmann::json::array()},
	                         {"added_services", nlohmann::json::array()},
	                         {"removed_services", nlohmann::json::array()}};
	auto find_listener = [this](const std::string &name) -> Listener * {
		for (auto &l : listeners_)
			if (l.name == name)
				return &l;
		return nullptr;
	};

	// A running service keeps its sockets: its workers hold them at fd 3 and up, in order. One
	// that a reload removed comes back only once it has drained.
	for (const auto &sc : next.services) {
		const Service *svc = supervisor_->find_service(sc.name);
		std::string problem;
		if (svc && svc->removing)
			problem = "services." + sc.name + ": still draining since a reload removed it; reload again once it is gone";
		else if (svc && svc->cfg.sockets != sc.sockets)
			problem = "services." + sc.name + ".sockets: a running service's sockets cannot change; add the service "
			          "under another name, or remove it first";
		else if (svc && svc->cfg.exec.empty() != sc.exec.empty())
			problem = "services." + sc.name + ".exec: a running service cannot switch between workers brokerd starts "
			          "and registered ones; add the service under another name, or remove it first";
		if (!problem.empty()) {
			notifier_.send("READY=1");
			throw config::ConfigError(problem);
		}
	}

	// Sockets first, all or nothing, so new services find theirs.
	std::vector<Listener> opened;
	try {
		InheritedFds none;
		for (const auto &sc : next.sockets) {
			const config::SocketConfig *old = cfg_.find_socket(sc.name);
			if (old && find_listener(sc.name)) {
				if (old->listen != sc.listen || old->systemd_name != sc.systemd_name)
					throw config::ConfigError("sockets." + sc.name +
					                          ": changed address; a listener is never re-bound, add the new one under another name");
				continue;
			}
			opened.push_back(open_listener(sc, none));
		}
	} catch (...) {
		notifier_.send("READY=1");
		throw;
	}
	for (auto &l : opened) {
		log::info("reload: socket " + l.name + ": listening on " + l.address);
		result["added_sockets"].push_back(l.name);
		store_fd(l.name, l.fd.get());
		listeners_.push_back(std::move(l));
	}

	// The new config is in force before services change, so that a listener is judged unused
	// against it, and never against the old one.
	config::Config old = std::exchange(cfg_, std::move(next));
	cfg_text_ = std::move(next_text);
	control_->set_rules(std::move(rules));
	for (const auto &svc : old.services)
		if (!cfg_.find_service(svc.name)) {
			supervisor_->remove_service(svc.name);
			result["removed_services"].push_back(svc.name);
		}
	for (const auto &svc : cfg_.services) {
		if (!supervisor_->find_service(svc.name)) {
			supervisor_->add_service(svc);
			result["added_services"].push_back(svc.name);
		} else {
			// The next upgrade, or a registration, goes by the new settings.
			supervisor_->update_service(svc);
		}
	}
	for (const auto &sc : old.sockets)
		if (!cfg_.find_socket(sc.name))
			result["removed_sockets"].push_back(sc.name);
	close_unused_listeners();
	log::notice("reloaded " + config_path_);
	notifier_.send("READY=1");
	return result;
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

// Runs `binary --check-state` on the very state it would get, and checks that it reads it: a
// binary that is missing, does not run, reads another format or rejects the config is refused
// before anything is handed over.
void Daemon::check_binary(const std::string &binary, int state_fd)
{
	if (::access(binary.c_str(), X_OK) < 0)
		throw std::runtime_error(binary + ": " + std::strerror(errno));
	int pipefd[2];
	if (::pipe2(pipefd, O_CLOEXEC) < 0)
		throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
	proto::UniqueFd rd(pipefd[0]), wr(pipefd[1]);
	proto::UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
	std::string path = binary;
	char arg[] = "--check-state";
	char *argv[] = {path.data(), arg, nullptr};
	char *envp[] = {nullptr};
	pid_t pid = ::fork();
	if (pid < 0)
		throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, nullptr);
		::dup2(state_fd, 0);
		::dup2(wr.get(), 1);
		::dup2(wr.get(), 2);
		::execve(argv[0], argv, envp);
		::_exit(127);
	}
	wr.reset();
	// A few seconds at most: the answer is one line, printed before anything else happens.
	std::string out;
	// Bounded by 5 s, and by half the watchdog's feeding period: the loop waits meanwhile.
	std::uint64_t bound = 5'000'000;
	if (watchdog_period_ > 0) {
		notifier_.send("WATCHDOG=1");
		bound = std::min<std::uint64_t>(bound, watchdog_period_ / 2);
	}
	std::uint64_t deadline = now_usec(CLOCK_MONOTONIC) + bound;
	for (;;) {
		std::uint64_t now = now_usec(CLOCK_MONOTONIC);
		pollfd p{rd.get(), POLLIN, 0};
		int n = now < deadline ? ::poll(&p, 1, static_cast<int>((deadline - now) / 1000) + 1) : 0;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			::kill(pid, SIGKILL);
			break;
		}
		char buf[256];
		ssize_t got = ::read(rd.get(), buf, sizeof(buf));
		if (got <= 0)
			break;
		out.append(buf, static_cast<std::size_t>(got));
		if (out.size() > 1024) {
			::kill(pid, SIGKILL); // the answer is one short line
			break;
		}
	}
	// It closed its output: it exits now, or is made to at the deadline.
	proto::UniqueFd child(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
	std::uint64_t now = now_usec(CLOCK_MONOTONIC);
	pollfd p{child.get(), POLLIN, 0};
	if (child && (now >= deadline || ::poll(&p, 1, static_cast<int>((deadline - now) / 1000) + 1) <= 0))
		::kill(pid, SIGKILL);
	int status = 0;
	while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
	}
	out = out.substr(0, out.find('\n')); // its first line says it
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		throw std::runtime_error(binary + " --check-state did not run (" +
		                         (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
		                                            : std::string("killed by a signal")) +
		                         (out.empty() ? std::string() : ": " + out.substr(0, 300)) +
		                         "): not a brokerd that can carry on from this one");
	if (out != std::to_string(state::kFormat))
		throw std::runtime_error(binary + " reads re-exec state format \"" + out.substr(0, 40) +
		                         "\", this brokerd writes format " + std::to_string(state::kFormat));
}

// brokerctl reexec: the state goes into a memfd, every fd the next brokerd needs loses CLOEXEC,
// and brokerd execs itself (the same pid: children stay children, and the service manager
// sees the same main process). Returns only when it could not: everything is as before.
void Daemon::reexec(const std::string &requested, int caller)
{
	std::string why;
	if (!supervisor_->quiet(why))
		throw std::runtime_error("not now: " + why + "; try again once it is done");
	std::string binary = requested;
	if (binary.empty()) {
		char self[PATH_MAX];
		ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
		if (n < 0)
			throw std::runtime_error(std::string("/proc/self/exe: ") + std::strerror(errno));
		binary.assign(self, static_cast<std::size_t>(n));
		// A package upgrade replaced the file we run from: the new one is at the same path.
		const std::string deleted = " (deleted)";
		if (binary.size() > deleted.size() && binary.ends_with(deleted))
			binary.resize(binary.size() - deleted.size());
	}
	std::vector<int> keep;
	nlohmann::json listeners = nlohmann::json::array();
	for (const auto &l : listeners_) {
		listeners.push_back({{"name", l.name},
		                     {"fd", l.fd.get()},
		                     {"address", l.address},
		                     {"kind", l.kind},
		                     {"origin", l.origin},
		                     {"unlink_path", l.unlink_path}});
		keep.push_back(l.fd.get());
	}
	keep.push_back(notify_->fd());
	nlohmann::json st = {{"format", state::kFormat},
	                     {"version", BROKER_VERSION},
	                     {"config_path", config_path_},
	                     {"config_text", cfg_text_},
	                     {"start_usec", start_usec_},
	                     {"nofile", {started_nofile_.rlim_cur, started_nofile_.rlim_max}},
	                     {"watchdog_usec", watchdog_usec_},
	                     {"announced_ready", announced_ready_},
	                     {"last_status", last_status_},
	                     {"listeners", std::move(listeners)},
	                     {"notify_fd", notify_->fd()},
	                     {"services", supervisor_->save_state(keep)},
	                     {"control", control_->save_state(caller, keep)}};
	proto::UniqueFd memfd = state::write(st);
	check_binary(binary, memfd.get());
	keep.push_back(memfd.get());
	std::string fd_arg = std::to_string(memfd.get());
	std::string config_arg = config_path_;
	std::vector<char *> argv = {binary.data(), const_cast<char *>("--config"), config_arg.data(),
	                            const_cast<char *>("--restore-state"), fd_arg.data(), nullptr};

	log::notice("re-executing " + binary + " (" + std::to_string(keep.size()) + " fds carried over)");
	for (int fd : keep)
		state::set_cloexec(fd, false);
	::execve(binary.c_str(), argv.data(), environ);
	int err = errno;
	for (int fd : keep)
		state::set_cloexec(fd, true);
	throw std::runtime_error("execve " + binary + ": " + std::strerror(err));
}

void Daemon::store_fd(const std::string &name, int fd)
{
	if (notifier_.enabled() && !notifier_.send_with_fd("FDSTORE=1\nFDNAME=" + name, fd))
		log::warning("socket " + name + ": the service manager did not take it into its fd store");
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
	std::uint64_t now = now_usec(CLOCK_MONOTONIC);
	notifier_.send("EXTEND_TIMEOUT_USEC=" + std::to_string((until > now ? until - now : 0) + kSlack));
}

void Daemon::on_change()
{
	if (!supervisor_->shutting_down() && listeners_.size() > cfg_.sockets.size())
		close_unused_listeners();
	if (supervisor_->shutting_down()) {
		if (supervisor_->stopped())
			sd_event_exit(event_.get(), 0);
		return;
	}
	std::string status = supervisor_->summary();
	if (!announced_ready_ && supervisor_->settled()) {
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

} // namespace
} // namespace brokerd

int main(int argc, char **argv)
{
	CLI::App app{"brokerd: owns listening sockets and hands them to each new version of a service, "
	             "so upgrades drop no connection"};
	std::string config_path = BROKER_DEFAULT_CONFIG;
	std::optional<std::string> check_path;
	bool version = false;
	bool check_state = false;
	std::optional<int> restore_fd;
	app.add_option("-c,--config", config_path, "Configuration file")->capture_default_str();
	// Internal, for brokerctl reexec: whether this binary reads a given state, and the state itself.
	app.add_flag("--check-state", check_state)->group("");
	app.add_option("--restore-state", restore_fd)->group("");
	app.add_option("--check-config", check_path, "Validate FILE and exit (0 when valid)")->type_name("FILE");
	app.add_flag("--version", version, "Print the version and exit");
	try {
		app.parse(argc, argv);
	} catch (const CLI::ParseError &e) {
		int r = app.exit(e);
		return r == 0 ? 0 : 2;
	}
	if (version) {
		std::cout << "brokerd " << BROKER_VERSION << "\n";
		return 0;
	}
	if (check_state) {
		// The state a running brokerd would hand over, on stdin: it must parse here, config and all.
		try {
			brokerd::state::check(brokerd::state::read(0));
		} catch (const std::exception &e) {
			std::cout << e.what() << "\n";
			return 1;
		}
		std::cout << brokerd::state::kFormat << "\n";
		return 0;
	}

	if (check_path) {
		try {
			brokerd::config::load(*check_path);
			brokerd::AccessRules::resolve(brokerd::config::load(*check_path).control);
		} catch (const std::exception &e) {
			std::cerr << "brokerd: " << e.what() << "\n";
			return 1;
		}
		std::cout << *check_path << ": configuration is valid\n";
		return 0;
	}

	// sd-event takes these through signalfd and pidfds; a worker never inherits the mask.
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	sigprocmask(SIG_BLOCK, &mask, nullptr);
	signal(SIGPIPE, SIG_IGN);

	try {
		if (restore_fd) {
			brokerd::Daemon daemon(brokerd::state::read(*restore_fd));
			return daemon.run();
		}
		std::string text;
		brokerd::config::Config cfg = brokerd::config::load(config_path, text);
		brokerd::Daemon daemon(config_path, std::move(cfg), std::move(text));
		return daemon.run();
	} catch (const std::exception &e) {
		brokerd::log::error(e.what());
		return 1;
	}
}
