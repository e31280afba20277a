// brokerctl reexec: brokerd hands its state to a new binary and execs it, in the same process.
#include "daemon/reexec.hpp"

#include "daemon/binary_check.hpp"
#include "daemon/daemon.hpp"

#include "broker_config.h"
#include "daemon/state.hpp"
#include "os/log.hpp"
#include "supervisor/serialize.hpp"

#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace brokerd {

std::string reexec_binary(const std::string &requested)
{
	if (!requested.empty())
		return requested;
	char self[PATH_MAX];
	ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n < 0)
		throw std::runtime_error(std::string("/proc/self/exe: ") + std::strerror(errno));
	std::string binary(self, static_cast<std::size_t>(n));
	// A package upgrade replaced the file we run from: the new one is at the same path.
	const std::string deleted = " (deleted)";
	if (binary.size() > deleted.size() && binary.ends_with(deleted))
		binary.resize(binary.size() - deleted.size());
	return binary;
}

// brokerctl reexec, begun: the binary is checked on the very state it would get, off the loop
// (brokerd serves on meanwhile), and reexec_checked() carries on from its verdict. Throws
// std::runtime_error when it is refused at once; otherwise `failed` hears why it did not happen.
void Daemon::reexec(const std::string &requested, int caller, ReexecFailed failed)
{
	if (reexec_)
		throw std::runtime_error("a reexec is already being checked");
	if (auto why = supervisor_->busy())
		throw std::runtime_error("not now: " + *why + "; try again once it is done");
	auto pending = std::make_unique<PendingReexec>();
	pending->binary = reexec_binary(requested);
	pending->caller = caller;
	pending->failed = std::move(failed);
	pending->cfg_text = cfg_text_;
	std::vector<int> keep;
	proto::UniqueFd memfd = state::write(save_state(caller, keep));
	// 5 s, and a quarter of WATCHDOG_USEC: a binary slower than that to answer would
	// leave the watchdog unfed once it runs in our place.
	std::uint64_t bound = 5'000'000;
	if (watchdog_period_ > 0)
		bound = std::min<std::uint64_t>(bound, watchdog_period_ / 2);
	pending->check = std::make_unique<BinaryCheck>(event_.get(), pending->binary, memfd.get(), bound,
	                                               [this](const std::string &error) { reexec_checked(error); });
	log::info("reexec: checking " + pending->binary + " (pid " + std::to_string(pending->check->pid()) + ")");
	reexec_ = std::move(pending);
}

// The check ended. The loop ran meanwhile: brokerd must still be quiet, and the state is saved
// afresh for the exec.
void Daemon::reexec_checked(const std::string &error)
{
	std::unique_ptr<PendingReexec> pending = std::move(reexec_);
	std::string why = error;
	std::optional<std::string> busy = why.empty() ? supervisor_->busy() : std::nullopt;
	if (busy)
		why = "not now: " + *busy + "; try again once it is done";
	else if (why.empty() && cfg_text_ != pending->cfg_text)
		why = "the config was reloaded while " + pending->binary + " was being checked; try again";
	if (why.empty()) {
		try {
			exec(pending->binary, pending->caller);
		} catch (const std::exception &e) {
			why = e.what();
		}
	}
	pending->failed(why);
}

// SIGTERM or SIGINT: shutdown wins over a reexec being checked; its check is killed and reaped.
void Daemon::cancel_reexec(const std::string &why)
{
	if (std::unique_ptr<PendingReexec> pending = std::move(reexec_)) {
		pending->check.reset();
		pending->failed(why);
	}
}

// Its caller went away while the binary was being checked: nobody would hear how it went, and
// an interrupted brokerctl reexec means "not now". The check is killed and reaped.
void Daemon::drop_reexec()
{
	std::unique_ptr<PendingReexec> pending = std::move(reexec_);
	if (!pending)
		return;
	pending->check.reset();
	log::notice("reexec: its caller went away while " + pending->binary + " was being checked; dropped it");
}

// The state goes into a memfd, every fd the next brokerd needs loses CLOEXEC, and brokerd execs
// the binary (the same pid: children stay children, and the service manager sees the same main
// process). Returns only when it could not: everything is as before.
void Daemon::exec(std::string binary, int caller)
{
	std::vector<int> keep;
	proto::UniqueFd memfd = state::write(save_state(caller, keep));
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

// Everything the next brokerd carries on with; the fds it needs go to `keep`.
nlohmann::json Daemon::save_state(int caller, std::vector<int> &keep) const
{
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
	nlohmann::json extra = nlohmann::json::object();
	if (crash_state_) {
		extra["crash_state_fd"] = crash_state_->fd();
		keep.push_back(crash_state_->fd());
	}
	if (sentinel_ && sentinel_->fd() >= 0) {
		extra["sentinel"] = {{"fd", sentinel_->fd()}, {"pid", sentinel_->pid()}};
		keep.push_back(sentinel_->fd());
	}
	if (holder_ && notifier_.fd() >= 0) {
		nlohmann::json kept = nlohmann::json::array();
		for (const auto &[message, fd] : notifier_.kept())
			kept.push_back({message, fd});
		extra["fd_holder"] = {{"fd", notifier_.fd()}, {"pid", holder_->pid()}, {"child", holder_->child()}, {"kept", kept}};
		keep.push_back(notifier_.fd());
	}
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
	        {"services", Serializer::save(*supervisor_, keep)},
	        {"control", control_->save_state(caller, keep)},
	        {"metrics", save_metrics(keep)}};
	st.update(extra);
	return st;
}

} // namespace brokerd
