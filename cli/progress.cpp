// What brokerctl shows while a rollout runs, and the lines of `watch` (see progress.hpp).
#include "progress.hpp"

#include "format.hpp"
#include "render.hpp"
#include "reply.hpp"

#include "proto/names.hpp"

#include <ostream>

namespace brokerctl {

using json = nlohmann::json;

namespace {

// The events of an upgrade's progress that brokerctl shows in a way of their own.
namespace progress_event = proto::names::control::progress_event;

// Erases the terminal's current line: back to its start, then clear to its end.
constexpr std::string_view kEraseLine = "\r\x1b[K";

struct Words {
	const char *verb;   // "upgrading web to gen 4"
	const char *target; // "to gen", or "as gen" for a new generation of the same or an older config
	const char *noun;   // "upgrade to gen 4 accepted"
	const char *past;   // "upgraded to gen 4 in 3.2s"
};

Words words(Rollout kind)
{
	switch (kind) {
	case Rollout::Rollback:
		return {"rolling back", "as gen", "rollback", "rolled back"};
	case Rollout::Restart:
		return {"restarting", "as gen", "restart", "restarted"};
	case Rollout::Upgrade:
		break;
	}
	return {"upgrading", "to gen", "upgrade", "upgraded"};
}

std::string service_of(const json &progress)
{
	return printable(text(progress, "service"));
}

// "to gen 4", "as gen 5"
std::string target(Rollout kind, const json &progress)
{
	return std::string(words(kind).target) + " " + number_text(progress, "generation");
}

// "migrating connections 6120/8000", "..., 12 returned"; empty while nothing was handed off.
std::string migration(const json &upgrade)
{
	const json &h = member(upgrade, "handoff");
	if (!h.is_object() || integer(h, "expected").value_or(0) <= 0)
		return {};
	std::string out = "migrating connections " + number_text(h, "received") + "/" + number_text(h, "expected");
	if (integer(h, "returned").value_or(0) > 0)
		out += ", " + number_text(h, "returned") + " returned";
	return out;
}

// "2/4 new ready, 1/4 old drained", then the migration, if any
std::string counts(const json &upgrade)
{
	std::string out = number_text(upgrade, "ready") + "/" + number_text(upgrade, "total_new") + " new ready, " +
	                  number_text(upgrade, "drained") + "/" + number_text(upgrade, "total_old") + " old drained";
	if (std::string m = migration(upgrade); !m.empty())
		out += ", " + m;
	return out;
}

// The first `columns` code points of `line`.
std::string fit(const std::string &line, std::size_t columns)
{
	std::size_t seen = 0;
	for (std::size_t i = 0; i < line.size(); ++i) {
		if ((static_cast<unsigned char>(line[i]) & 0xc0) == 0x80)
			continue;
		if (seen++ == columns)
			return line.substr(0, i);
	}
	return line;
}

} // namespace

const json &progress_of(const json &reply)
{
	const json &p = member(reply, "progress");
	return p.is_object() ? p : reply;
}

std::string progress_bar(std::int64_t done, std::int64_t total, std::size_t width)
{
	std::size_t filled = 0;
	if (total > 0 && done > 0)
		filled = done >= total ? width : static_cast<std::size_t>(done * static_cast<std::int64_t>(width) / total);
	std::string bar = "[";
	bar.append(filled, '#');
	bar.append(width - filled, '.');
	bar += ']';
	return bar;
}

std::string progress_line(Rollout kind, const json &progress, bool rolling_back)
{
	const json &up = member(progress, "upgrade");
	if (rolling_back)
		return "rolling back " + service_of(progress) + " to gen " + number_text(up, "from") + " (gen " +
		       number_text(progress, "generation") + " failed)";
	std::int64_t done = integer(up, "ready").value_or(0) + integer(up, "drained").value_or(0);
	std::int64_t total = integer(up, "total_new").value_or(0) + integer(up, "total_old").value_or(0);
	return std::string(words(kind).verb) + " " + service_of(progress) + " " + target(kind, progress) + ": " +
	       counts(up) + " " + progress_bar(done, total);
}

std::string event_line(const json &progress)
{
	std::string event = printable(text(progress, "event", "?"));
	std::string message = printable(text(progress, "message", ""));
	std::string out;
	if (event == progress_event::kRollback) {
		out = "rolling back " + service_of(progress) + " to gen " + number_text(member(progress, "upgrade"), "from");
	} else {
		std::string instance = printable(text(progress, "instance", ""));
		out = (instance.empty() ? service_of(progress) : instance) + " " + event;
		if (auto pid = integer(progress, "pid"); pid && *pid > 0)
			out += " (pid " + std::to_string(*pid) + ")";
	}
	if (!message.empty())
		out += ": " + message;
	return out;
}

bool is_notable(std::string_view event)
{
	// Migration progress only moves the live line's counts.
	return event != progress_event::kAccepted && event != progress_event::kDone && event != progress_event::kHandoff;
}

std::string accepted_line(Rollout kind, const json &progress)
{
	return std::string(words(kind).verb) + " " + service_of(progress) + " " + target(kind, progress) +
	       " (from gen " + number_text(member(progress, "upgrade"), "from") + ")";
}

std::string submitted_line(Rollout kind, const json &progress)
{
	return service_of(progress) + ": " + words(kind).noun + " " + target(kind, progress) + " accepted";
}

std::string done_line(Rollout kind, const json &progress, std::chrono::microseconds elapsed)
{
	auto took = integer(progress, "duration_usec");
	std::string out = service_of(progress) + ": " + words(kind).past + " " + target(kind, progress) + " in " +
	                  format_elapsed(took && *took >= 0 ? std::chrono::microseconds(*took) : elapsed);
	const json &h = member(member(progress, "upgrade"), "handoff");
	if (auto handed = integer(h, "handed"); handed && *handed > 0) {
		out += ", " + number_text(h, "received") + "/" + std::to_string(*handed) + " connections migrated";
		if (integer(h, "returned").value_or(0) > 0)
			out += " (" + number_text(h, "returned") + " returned to their sender)";
	}
	return out;
}

ProgressDisplay::ProgressDisplay(std::ostream &out, Mode mode, Rollout kind, std::size_t width)
	: out_(out), mode_(mode), kind_(kind), width_(width > 1 ? width : 80)
{
}

bool ProgressDisplay::update(const json &reply, std::chrono::microseconds elapsed)
{
	const json &progress = progress_of(reply);
	std::string event = text(progress, "event", "");
	bool done = event == progress_event::kDone;

	if (mode_ == Mode::Json) {
		out_ << reply.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
	} else if (done) {
		clear();
		out_ << done_line(kind_, progress, elapsed) << '\n';
	} else if (mode_ == Mode::Lines) {
		if (event == progress_event::kAccepted)
			out_ << accepted_line(kind_, progress) << '\n';
		else if (event == progress_event::kHandoff)
			out_ << service_of(progress) << ": " << migration(member(progress, "upgrade")) << '\n';
		else if (event == progress_event::kRollback)
			out_ << event_line(progress) << '\n';
		else
			out_ << event_line(progress) << "; " << counts(member(progress, "upgrade")) << '\n';
	} else {
		if (event == progress_event::kRollback)
			rolling_back_ = true;
		if (is_notable(event)) {
			out_ << kEraseLine << event_line(progress) << '\n';
			live_shown_ = false;
		}
		draw_live(progress);
	}
	// Each line as it happens: the reader may be a pipe into a log, or a person waiting.
	out_.flush();
	return done;
}

void ProgressDisplay::clear()
{
	if (!live_shown_)
		return;
	out_ << kEraseLine;
	out_.flush();
	live_shown_ = false;
}

void ProgressDisplay::draw_live(const json &progress)
{
	// One column short of the width: a line that fills it leaves some terminals' cursor on the next.
	out_ << '\r' << fit(progress_line(kind_, progress, rolling_back_), width_ - 1) << "\x1b[K";
	live_shown_ = true;
}

std::string watch_line(const json &event, std::int64_t now_usec)
{
	std::string out = format_local_time(integer(event, "time").value_or(now_usec)) + " [" +
	                  printable(text(event, "event", "?")) + "]";
	std::string subject;
	auto add = [&subject](const std::string &part) {
		if (!subject.empty())
			subject += ' ';
		subject += part;
	};
	if (std::string s = text(event, "service", ""); !s.empty())
		add(printable(s));
	if (auto g = integer(event, "generation"))
		add("gen " + std::to_string(*g));
	if (std::string s = text(event, "instance", ""); !s.empty())
		add(printable(s));
	if (auto pid = integer(event, "pid"); pid && *pid > 0)
		add("(pid " + std::to_string(*pid) + ")");
	if (std::string s = text(event, "state", ""); !s.empty())
		add(printable(s));
	if (!subject.empty())
		out += " " + subject;
	if (std::string m = text(event, "message", ""); !m.empty())
		out += (subject.empty() ? " " : ": ") + printable(m);
	// A reload's changed settings, one per line under it.
	for (const json &change : array(event, "changed"))
		out += "\n  " + change_line(change);
	return out;
}

json reconnected_event(const json &status, std::int64_t now_usec)
{
	json event = {{"event", "reconnected"}, {"time", now_usec}, {"pid", integer(status, "pid").value_or(0)}};
	auto rec = status.find("recovered");
	if (rec == status.end() || !rec->is_object()) {
		event["message"] = "brokerd started afresh: what ran before it is not its";
		return event;
	}
	std::string message = "brokerd carries on after a crash of pid " +
	                      std::to_string(integer(*rec, "crashed_pid").value_or(0)) + ": " +
	                      std::to_string(integer(*rec, "kept").value_or(0)) + " process(es) found again";
	auto list = [&](const char *key, const std::string &what) {
		auto it = rec->find(key);
		if (it == rec->end() || !it->is_array() || it->empty())
			return;
		std::string items;
		for (const json &v : *it)
			if (v.is_string())
				items += (items.empty() ? "" : ", ") + v.get<std::string>();
		message += "; " + what + items;
	};
	list("lost", "gone meanwhile, restarted under their policy: ");
	list("interrupted", "");
	event["message"] = message;
	event["recovered"] = *rec;
	return event;
}

} // namespace brokerctl
