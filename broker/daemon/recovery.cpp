// A brokerd started after a crash of the one before: the service manager passes back what that one
// kept in its fd store (the crash state, the notify socket, the workers' output pipes, beside the
// listeners and the control socket), and this brokerd carries on with the same workers.
#include "daemon/daemon.hpp"

#include "broker_config.h"
#include "daemon/persist.hpp"
#include "daemon/state.hpp"
#include "os/log.hpp"
#include "os/peer.hpp"
#include "supervisor/spawner.hpp"

#include <unistd.h>

#include <charconv>

namespace brokerd {

namespace {

std::vector<proto::UniqueFd> take_named(InheritedFds &inherited, const std::string &name)
{
	std::vector<proto::UniqueFd> fds;
	auto [first, last] = inherited.by_name.equal_range(name);
	for (auto it = first; it != last; ++it)
		fds.push_back(std::move(it->second));
	inherited.by_name.erase(first, last);
	return fds;
}

} // namespace

// What the store passed that only a crash restart uses comes out of `inherited` here. A crash
// state this brokerd can carry on from replaces the config it was started with by the one the
// state ran (as a reexec does); one it cannot is refused with why, and brokerd starts clean,
// leaving whatever the brokerd before started as it is: nothing it cannot name is killed.
void Daemon::take_crash_state(InheritedFds &inherited)
{
	std::vector<proto::UniqueFd> states = take_named(inherited, "state");
	std::vector<proto::UniqueFd> notify = take_named(inherited, "notify");
	Serializer::CrashFds fds;
	for (auto it = inherited.by_name.begin(); it != inherited.by_name.end();) {
		std::string_view name = it->first;
		std::uint64_t inode = 0;
		if (!name.starts_with(kPipeStorePrefix) ||
		    std::from_chars(name.data() + kPipeStorePrefix.size(), name.data() + name.size(), inode).ec != std::errc()) {
			++it;
			continue;
		}
		fds.pipes[inode] = std::move(it->second);
		it = inherited.by_name.erase(it);
	}
	// Without a state to carry on from, the notify socket means nothing either. The output
	// pipes stay in the store (this brokerd's copies close): a worker of the brokerd before that
	// writes to one then never gets EPIPE or SIGPIPE, and the store drops each once its writers
	// are gone.
	auto release_rest = [&] {
		if (!notify.empty())
			notifier_.send("FDSTOREREMOVE=1\nFDNAME=notify");
	};
	auto release_all = [&] {
		notifier_.send("FDSTOREREMOVE=1\nFDNAME=state");
		release_rest();
	};
	if (states.empty()) {
		if (!notify.empty() || !fds.pipes.empty())
			log::warning("the fd store holds a notify socket or output pipes but no crash state; releasing the socket");
		release_rest();
		return;
	}
	auto refuse = [&](const std::string &why) {
		log::error("crash state refused: " + why +
		           "; starting clean, and leaving the processes of the brokerd before as they are");
		release_all();
	};
	if (states.size() > 1)
		return refuse("the fd store holds " + std::to_string(states.size()) + " of them");

	auto loaded = persist::read(states[0].get());
	if (auto *f = std::get_if<Failure>(&loaded))
		return refuse(f->why);
	auto file = persist::StateFile::adopt(std::move(states[0]));
	if (auto *f = std::get_if<Failure>(&file))
		return refuse(f->why);
	auto crash = std::make_unique<CrashRestart>(std::move(std::get<persist::StateFile>(file)));
	const auto &slot = std::get<std::optional<persist::Loaded>>(loaded);
	if (!slot) {
		// Killed before it wrote one: nothing to carry on with, but the memfd serves on.
		log::notice("the crash state in the fd store was never written; starting clean");
		release_rest();
		crash_ = std::move(crash);
		return;
	}
	peer::ProcessIdentity writer;
	std::string text;
	try {
		crash->state = nlohmann::json::parse(slot->payload);
		const nlohmann::json &st = crash->state;
		int format = st.at("format").get<int>();
		if (format == kCrashFormat && st.value("stopped", false)) {
			// It stopped cleanly, its workers with it; the memfd serves on.
			log::info("the brokerd before stopped cleanly; starting afresh");
			crash->state = nullptr;
			release_rest();
			crash_ = std::move(crash);
			return;
		}
		if (format != kCrashFormat)
			return refuse("it is format " + std::to_string(format) + " (of brokerd " +
			              st.value("version", std::string("?")) + "), this brokerd " BROKER_VERSION " reads format " +
			              std::to_string(kCrashFormat));
		std::string path = st.at("config_path").get<std::string>();
		if (path != config_path_)
			return refuse("it is the state of a brokerd with config " + path + ", not " + config_path_);
		writer = {st.at("pid").get<pid_t>(), st.at("pid_start").get<std::uint64_t>()};
		text = st.at("config_text").get<std::string>();
	} catch (const nlohmann::json::exception &e) {
		return refuse(std::string("it does not read as a state: ") + e.what());
	}
	// Alive, not merely unreaped: a brokerd killed by hand stays a zombie until its parent waits.
	if (std::holds_alternative<proto::UniqueFd>(peer::reopen(writer)))
		throw std::runtime_error("the brokerd that keeps the crash state, pid " + std::to_string(writer.pid) +
		                         ", still runs: two cannot supervise the same workers");
	try {
		cfg_ = config::parse(text);
	} catch (const std::exception &e) {
		return refuse(std::string("its config: ") + e.what());
	}
	cfg_text_ = std::move(text);
	crash->crashed_pid = writer.pid;
	crash->notify_kept = !notify.empty();
	crash->notify = notify.empty() ? proto::UniqueFd() : std::move(notify[0]);
	crash->fds = std::move(fds);
	crash_ = std::move(crash);
}

// The services of the crashed brokerd, their processes found again; what is not in the store
// yet (a socket bound afresh, as the store had lost it) goes in.
void Daemon::recover()
{
	CrashRestart &crash = *crash_;
	if (!control_->adopted())
		store_fd("control", control_->fd());
	else if (crash.state.value("control_owned", false))
		control_->own_file(); // the crashed brokerd bound it: its file goes when this one stops
	for (const auto &l : listeners_)
		if (l.origin == "bound")
			store_fd(l.name, l.fd.get());
	if (!crash.notify_kept)
		store_fd("notify", notify_->fd());
	supervisor_->begin_recovery(crash.crashed_pid);
	Serializer::restore_crashed(*supervisor_, crash.state.at("services"), crash.fds);
	for (const auto &[inode, fd] : crash.fds.pipes)
		notifier_.send("FDSTOREREMOVE=1\nFDNAME=" + pipe_store_name(inode));
	crash.fds.pipes.clear();
	crash.state = nullptr;
	const Supervisor::Recovery &r = supervisor_->recovery();
	log::notice("carrying on after a crash of brokerd pid " + std::to_string(crash.crashed_pid) + ": " +
	            std::to_string(r.kept) + " process(es) found again, " + std::to_string(r.lost.size()) +
	            " gone meanwhile");
}

// The stop sentinel of the brokerd before (daemon/sentinel.hpp), from the store: it runs on, and
// this brokerd keeps its write end, when this brokerd carries on with the workers it watches
// over. Otherwise it is told that brokerd stopped cleanly (it exits, ending nothing: what the
// state cannot name is left as it is), and its write end leaves the store.
void Daemon::take_sentinel(InheritedFds &inherited)
{
	std::vector<proto::UniqueFd> ends = take_named(inherited, kSentinelStoreName);
	if (ends.empty())
		return;
	if (crash_ && !crash_->state.is_null() && ends.size() == 1) {
		crash_->sentinel = std::move(ends[0]);
		return;
	}
	for (const auto &fd : ends)
		dismiss_sentinel(fd.get());
	notifier_.send(std::string("FDSTOREREMOVE=1\nFDNAME=") + kSentinelStoreName);
}

// Under a service manager, a sentinel watches over the workers: the one that ran before a crash
// or a re-exec, else a new one.
void Daemon::keep_sentinel()
{
	proto::UniqueFd carried;
	pid_t child = 0;
	if (!restored_.is_null() && restored_.contains("sentinel")) {
		carried.reset(restored_.at("sentinel").at("fd").get<int>());
		state::set_cloexec(carried.get(), true);
		child = restored_.at("sentinel").at("pid").get<pid_t>();
	} else if (crash_) {
		carried = std::move(crash_->sentinel);
	}
	if (!notifier_.enabled() || !crash_state_)
		return;
	SentinelKeeper::Hooks hooks;
	hooks.store = [this](int fd) { return store_fd(kSentinelStoreName, fd); };
	hooks.release = [this] { notifier_.send(std::string("FDSTOREREMOVE=1\nFDNAME=") + kSentinelStoreName); };
	sentinel_ = std::make_unique<SentinelKeeper>(event_.get(), crash_state_->fd(), std::move(hooks));
	if (carried)
		sentinel_->carry_on(std::move(carried), child);
	else
		sentinel_->start();
}

} // namespace brokerd

namespace brokerd {

// Without a service manager, the fd holder plays its store (daemon/fd_holder.hpp): what it keeps
// joins what LISTEN_FDS passed, as the store's fds would, and the notifier sends to it from now
// on. A by-hand start after a crash thus carries on as one after systemd restarted brokerd.
void Daemon::take_fd_holder(InheritedFds &inherited)
{
	if (notifier_.enabled())
		return;
	auto link = std::make_unique<FdHolderLink>(fd_holder_path(cfg_.control.path));
	std::vector<FdHolderLink::Fetched> fetched;
	proto::UniqueFd conn = link->open(fetched);
	if (!conn)
		return;
	notifier_.use(std::move(conn));
	for (auto &f : fetched) {
		notifier_.remember(SystemdNotifier::store_message(f.name, f.poll), f.fd.get());
		inherited.by_name.emplace(f.name, std::move(f.fd));
	}
	holder_ = std::move(link);
	holder_started_ = now_usec(CLOCK_MONOTONIC);
}

// A re-exec carries the holder over: the same connection, and what it keeps.
void Daemon::carry_fd_holder(const nlohmann::json &saved)
{
	proto::UniqueFd conn(saved.at("fd").get<int>());
	state::set_cloexec(conn.get(), true);
	holder_ = std::make_unique<FdHolderLink>(fd_holder_path(cfg_.control.path));
	holder_->carry_on(conn.get(), saved.at("pid").get<pid_t>(), saved.at("child").get<bool>());
	notifier_.use(std::move(conn));
	for (const auto &k : saved.at("kept"))
		notifier_.remember(k.at(0).get<std::string>(), k.at(1).get<int>());
	holder_started_ = now_usec(CLOCK_MONOTONIC);
}

void Daemon::on_holder_lost()
{
	log::warning("fd holder: pid " + std::to_string(holder_->pid()) +
	             " is gone while brokerd runs; starting another and storing everything in it again");
	restart_holder_soon();
}

// One that cannot run is not started again in a tight loop: a second after the last start.
void Daemon::restart_holder_soon()
{
	constexpr usec_t kInterval = 1'000'000;
	usec_t at = holder_started_ + kInterval;
	if (now_usec(CLOCK_MONOTONIC) >= at)
		return restart_holder();
	auto again = [](sd_event_source *, std::uint64_t, void *userdata) -> int {
		return guarded("fd holder", [&]() -> int {
			static_cast<Daemon *>(userdata)->restart_holder();
			return 0;
		});
	};
	sd_event_source *s = nullptr;
	if (sd_event_add_time(event_.get(), &s, CLOCK_MONOTONIC, at, 0, again, this) >= 0)
		holder_again_.reset(s);
}

void Daemon::restart_holder()
{
	holder_again_.reset();
	holder_started_ = now_usec(CLOCK_MONOTONIC);
	proto::UniqueFd conn = holder_->start();
	if (!conn) {
		log::warning("fd holder: trying again in a second");
		return restart_holder_soon();
	}
	notifier_.use(std::move(conn));
	notifier_.resend_kept();
	holder_->watch(event_.get(), [this] { on_holder_lost(); });
	log::notice("fd holder: pid " + std::to_string(holder_->pid()) + " keeps brokerd's " +
	            std::to_string(notifier_.kept().size()) + " fd(s) again");
}

} // namespace brokerd
