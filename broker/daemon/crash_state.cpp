// The crash state kept up to date, once per turn of the loop in which something changed.
#include "daemon/crash_state.hpp"

#include "os/log.hpp"

#include <cstring>
#include <stdexcept>

namespace brokerd {

CrashState::CrashState(sd_event *event, persist::StateFile file, Snapshot snapshot)
	: event_(event), file_(std::move(file)), snapshot_(std::move(snapshot))
{
	sd_event_source *s = nullptr;
	int r = sd_event_add_defer(event, &s, on_turn, this);
	if (r < 0)
		throw std::runtime_error(std::string("crash state: sd_event_add_defer: ") + std::strerror(-r));
	turn_.reset(s);
	sd_event_source_set_enabled(s, SD_EVENT_OFF);
	// Before anything else pending: children wait for their go byte until the state naming
	// them is written (Supervisor's go source, at the default priority).
	sd_event_source_set_priority(s, SD_EVENT_PRIORITY_IMPORTANT);
}

void CrashState::changed()
{
	sd_event_source_set_enabled(turn_.get(), SD_EVENT_ONESHOT);
}

void CrashState::changed_soon()
{
	if (soon_)
		return;
	sd_event_source *s = nullptr;
	if (sd_event_add_time_relative(event_, &s, CLOCK_MONOTONIC, kSoonUsec, kSoonUsec / 10, on_soon, this) < 0) {
		changed(); // no timer to be had: now, then
		return;
	}
	soon_.reset(s);
}

int CrashState::on_soon(sd_event_source *, std::uint64_t, void *userdata)
{
	return guarded("crash state", [&]() -> int {
		auto *cs = static_cast<CrashState *>(userdata);
		cs->soon_.reset();
		cs->changed();
		return 0;
	});
}

int CrashState::on_turn(sd_event_source *, void *userdata)
{
	return guarded("crash state", [&]() -> int {
		static_cast<CrashState *>(userdata)->write();
		return 0;
	});
}

void CrashState::write_last(const std::string &text)
{
	snapshot_ = [text] { return text; };
	write();
}

void CrashState::write()
{
	sd_event_source_set_enabled(turn_.get(), SD_EVENT_OFF);
	std::string text = snapshot_();
	if (text == last_)
		return;
	if (auto why = file_.write(text)) {
		if (!failing_)
			log::error("crash state: " + *why + "; a brokerd started after a crash would find an older one");
		failing_ = true;
		return;
	}
	if (failing_)
		log::notice("crash state: written again");
	failing_ = false;
	last_ = std::move(text);
}

} // namespace brokerd
