// What brokerctl shows while an upgrade, a rollback or a restart rolls out, and the lines of
// `watch`: text built from the broker's replies, written to a stream the caller owns.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>

namespace brokerctl {

// The three calls that answer with a stream of Progress replies.
enum class Rollout { Upgrade, Rollback, Restart };

// The Progress inside a reply ({"progress": Progress}); a reply without the wrapper is read as the
// Progress itself.
const nlohmann::json &progress_of(const nlohmann::json &reply);

// "[###.......]": `done` of `total` rounded down, so the bar is full only once all is done.
std::string progress_bar(std::int64_t done, std::int64_t total, std::size_t width = 10);

// The live line for a Progress: "upgrading web to gen 4: 2/4 new ready, 1/4 old drained [###.......]".
// The bar counts new instances ready and old ones drained together. After a "rollback" event the
// counts no longer describe the target, so it reads "rolling back web to gen 3 (gen 4 failed)".
std::string progress_line(Rollout kind, const nlohmann::json &progress, bool rolling_back);

// One event as a line of its own: "web/4/0 started (pid 1234)", "web/4/1 failed: not ready in 30s",
// "rolling back web to gen 3: web/4/1 failed".
std::string event_line(const nlohmann::json &progress);

// Events worth a permanent line above the live one; the rest only move the counts.
bool is_notable(std::string_view event);

// The first reply: "upgrading web to gen 4 (from gen 3)".
std::string accepted_line(Rollout kind, const nlohmann::json &progress);

// With --no-wait, the whole output: "web: upgrade to gen 4 accepted".
std::string submitted_line(Rollout kind, const nlohmann::json &progress);

// The last line: "web: upgraded to gen 4 in 3.2s", with brokerd's duration_usec, or the time the
// caller waited (`elapsed`) from a brokerd that sends none.
std::string done_line(Rollout kind, const nlohmann::json &progress, std::chrono::microseconds elapsed);

// Shows a stream of replies ({"progress": Progress}) in one of three ways.
class ProgressDisplay {
public:
	enum class Mode {
		Live,  // a terminal: notable events as lines, below them one line redrawn with '\r'
		Lines, // a pipe or a file: one plain line per event
		Json,  // each reply's parameters as one JSON line
	};

	// `width` is the terminal's, in columns: the live line is cut to fit, since a wrapped
	// line cannot be redrawn with '\r'.
	ProgressDisplay(std::ostream &out, Mode mode, Rollout kind, std::size_t width = 80);

	// The terminal may be resized while a rollout runs.
	void set_width(std::size_t width) { width_ = width > 1 ? width : 80; }

	// Shows one reply; returns true for the final one ("done"), which ends with done_line.
	bool update(const nlohmann::json &reply, std::chrono::microseconds elapsed);

	// Erases the live line, so that an error message starts on a clean line.
	void clear();

private:
	void draw_live(const nlohmann::json &progress);

	std::ostream &out_;
	Mode mode_;
	Rollout kind_;
	std::size_t width_;
	bool live_shown_ = false;
	bool rolling_back_ = false;
};

// One Watch reply as a line, with its time in the local time zone (or `now_usec` when the reply
// has none): "2024-11-25 16:40:01.123 [instance] web gen 4 web/4/0 (pid 1234) ready". A reload's
// changed settings follow, one per line, indented.
std::string watch_line(const nlohmann::json &event, std::int64_t now_usec);

// What `brokerctl watch` prints once brokerd answers again after it went away, from its Status:
// {event: "reconnected", time, pid, message, recovered?} (recovered as Status has it, when
// brokerd carried on after a crash).
nlohmann::json reconnected_event(const nlohmann::json &status, std::int64_t now_usec);

} // namespace brokerctl
