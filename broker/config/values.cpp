// Typed values read out of brokerd.json's JSON (see values.hpp).
#include "config/values.hpp"

#include "proto/limits.hpp"
#include "proto/suggest.hpp"
#include "proto/varlink.hpp"

#include <algorithm>
#include <climits>
#include <functional>
#include <set>
#include <system_error>

namespace brokerd::config::values {

namespace {

bool is_name_char(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
	       c == '.' || c == '-';
}

std::string describe(const json &j)
{
	switch (j.type()) {
	case json::value_t::object:
		return j.empty() ? "{}" : "an object";
	case json::value_t::array:
		return j.empty() ? "[]" : "an array";
	case json::value_t::string:
		return quote(j.get_ref<const std::string &>());
	default:
		return j.dump();
	}
}



// nlohmann keeps the last of two equal keys without a word; in a config that hides a mistake.
// The parser callback tracks where it is, to name the duplicate's path.
class DuplicateKeys {
public:
	bool operator()(int depth, json::parse_event_t event, json &parsed)
	{
		switch (event) {
		case json::parse_event_t::object_start:
		case json::parse_event_t::array_start: {
			// Each level costs a path here: a file nested thousands deep would cost gigabytes,
			// in the daemon too (reload, upgrade). The parser's depth counts what it parses,
			// so comments hide nothing; the parse stops here.
			if (!proto::varlink::depth_allowed(depth))
				throw ConfigError("invalid JSON: nested more than " + std::to_string(proto::limits::kMaxJsonDepth) +
				                  " levels deep");
			Frame f;
			f.array = event == json::parse_event_t::array_start;
			f.path = frames_.empty() ? std::string() : here(frames_.back());
			frames_.push_back(std::move(f));
			break;
		}
		case json::parse_event_t::key: {
			Frame &f = frames_.back();
			f.key = parsed.get<std::string>();
			if (!f.keys.insert(f.key).second && error_.empty())
				error_ = child(f.path, f.key) + ": duplicate key";
			break;
		}
		case json::parse_event_t::object_end:
		case json::parse_event_t::array_end:
			frames_.pop_back();
			[[fallthrough]];
		case json::parse_event_t::value:
			if (!frames_.empty() && frames_.back().array)
				++frames_.back().index;
			break;
		}
		return true;
	}

	const std::string &error() const { return error_; }

private:
	struct Frame {
		bool array = false;
		std::string path;
		std::string key;
		std::size_t index = 0;
		std::set<std::string> keys;
	};

	static std::string here(const Frame &f) { return f.array ? element(f.path, f.index) : child(f.path, f.key); }

	std::vector<Frame> frames_;
	std::string error_;
};

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line 1, column 2: syntax
// error while parsing value - invalid literal; last read: 'x'"; keep the part after the position.
std::string short_reason(const char *what)
{
	std::string_view s = what;
	if (auto bracket = s.find("] "); bracket != std::string_view::npos)
		s.remove_prefix(bracket + 2);
	if (auto colon = s.find(": "); colon != std::string_view::npos)
		s.remove_prefix(colon + 2);
	if (s.starts_with("syntax error while parsing "))
		if (auto dash = s.find(" - "); dash != std::string_view::npos)
			s.remove_prefix(dash + 3);
	// The line and column say where; the echo of the token read so far only adds noise.
	std::string reason(s);
	if (auto last = reason.find("; last read: '"); last != std::string::npos) {
		auto end = reason.find("'; ", last + 14);
		reason.erase(last, end == std::string::npos ? std::string::npos : end + 1 - last);
	}
	return reason;
}

} // namespace

bool is_plain(std::string_view s)
{
	return !s.empty() && std::all_of(s.begin(), s.end(), is_name_char);
}

// A string as JSON would write it, cut short so that a pasted blob does not flood the message.
std::string quote(std::string_view s)
{
	constexpr std::size_t kMaxShown = 80;
	bool cut = s.size() > kMaxShown;
	std::string text = json(std::string(s.substr(0, cut ? kMaxShown : s.size())))
	                           .dump(-1, ' ', false, json::error_handler_t::replace);
	return cut ? text + "..." : text;
}

// Key paths read like `services.web.drain.timeout`. Keys that would make that ambiguous or
// unreadable (spaces, quotes, empty) are written as `env["A B"]`.
std::string child(const std::string &path, std::string_view key)
{
	if (!is_plain(key))
		return path + "[" + quote(key) + "]";
	return path.empty() ? std::string(key) : path + "." + std::string(key);
}

std::string element(const std::string &path, std::size_t index)
{
	return path + "[" + std::to_string(index) + "]";
}

[[noreturn]] void fail(const std::string &path, const std::string &message)
{
	throw ConfigError((path.empty() ? std::string("top level") : path) + ": " + message);
}


[[noreturn]] void expected(const std::string &path, std::string_view what, const json &got)
{
	fail(path, "expected " + std::string(what) + ", got " + describe(got));
}


const json &object_at(const json &j, const std::string &path)
{
	if (!j.is_object())
		expected(path, "an object", j);
	return j;
}

// Rejects keys the schema does not know: a typo must not silently fall back to a default.
void check_keys(const json &obj, const std::string &path, std::initializer_list<std::string_view> known)
{
	for (const auto &item : obj.items()) {
		const std::string &key = item.key();
		if (std::find(known.begin(), known.end(), key) != known.end())
			continue;
		std::string message = "unknown key";
		if (auto best = proto::closest(key, std::span<const std::string_view>(known.begin(), known.size())))
			message += " (did you mean \"" + std::string(*best) + "\"?)";
		fail(child(path, key), message);
	}
}

const json *member(const json &obj, const char *key)
{
	auto it = obj.find(key);
	return it == obj.end() ? nullptr : &*it;
}

const std::string &string_at(const json &j, const std::string &path, std::string_view what)
{
	if (!j.is_string())
		expected(path, what, j);
	return j.get_ref<const std::string &>();
}

// Strings that end up in argv, environ, paths or names: a NUL byte would silently cut them.
const std::string &text_at(const json &j, const std::string &path, std::string_view what)
{
	const std::string &s = string_at(j, path, what);
	if (s.find('\0') != std::string::npos)
		fail(path, "must not contain a NUL byte");
	return s;
}

const std::string &nonempty_text_at(const json &j, const std::string &path, std::string_view what)
{
	const std::string &s = text_at(j, path, what);
	if (s.empty())
		expected(path, what, j);
	return s;
}

bool bool_at(const json &j, const std::string &path)
{
	if (!j.is_boolean())
		expected(path, "true or false", j);
	return j.get<bool>();
}

std::uint64_t uint_at(const json &j, const std::string &path, std::uint64_t lo, std::uint64_t hi)
{
	// Negative numbers parse as number_integer and fractions as number_float: both are rejected.
	if (!j.is_number_unsigned() || j.get<std::uint64_t>() < lo || j.get<std::uint64_t>() > hi) {
		std::string what = hi == UINT_MAX ? "an integer of at least " + std::to_string(lo)
		                                  : "an integer from " + std::to_string(lo) + " to " +
		                                            std::to_string(hi);
		expected(path, what, j);
	}
	return j.get<std::uint64_t>();
}

// A JSON number would be read as decimal (660 is not 0660), so modes are octal strings.
mode_t mode_at(const json &j, const std::string &path)
{
	constexpr std::string_view what = "an octal mode from \"0000\" to \"0777\", like \"0660\"";
	const std::string &s = string_at(j, path, what);
	if (s.empty() || s.size() > 4 || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '7'; }))
		expected(path, what, j);
	mode_t mode = 0;
	for (char c : s)
		mode = mode * 8 + static_cast<mode_t>(c - '0');
	if (mode > 0777)
		expected(path, what, j);
	return mode;
}

Duration duration_at(const json &j, const std::string &path)
{
	constexpr std::string_view what = "a duration like \"30s\"";
	auto d = parse_duration(string_at(j, path, what));
	if (!d)
		expected(path, what, j);
	return *d;
}

// User and group names as the control server and the register rules compare them. Whether they
// exist is not checked: a name that does not resolve grants nothing.
std::vector<std::string> account_names_at(const json &j, const std::string &path)
{
	constexpr std::string_view what = "a user or group name";
	if (!j.is_array())
		expected(path, "an array of names", j);
	std::vector<std::string> names;
	for (std::size_t i = 0; i < j.size(); ++i) {
		const std::string &name = nonempty_text_at(j[i], element(path, i), what);
		if (std::any_of(name.begin(), name.end(), [](char c) { return c == ':' || c == '/' || c <= ' '; }))
			expected(element(path, i), what, j[i]);
		names.push_back(name);
	}
	return names;
}


json parse_json(std::string_view text)
{
	DuplicateKeys dup;
	json root;
	try {
		root = json::parse(text, std::ref(dup), true, /*ignore_comments=*/true);
	} catch (const json::parse_error &e) {
		// e.byte counts from 1 and points at the character that broke the parse (or one past the end).
		std::size_t offset = std::min<std::size_t>(e.byte > 0 ? e.byte - 1 : 0, text.size());
		std::string_view before = text.substr(0, offset);
		std::size_t line = 1 + static_cast<std::size_t>(std::count(before.begin(), before.end(), '\n'));
		auto nl = before.rfind('\n');
		std::size_t column = nl == std::string_view::npos ? offset + 1 : offset - nl;
		throw ConfigError("invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(column) +
		                  ": " + short_reason(e.what()));
	} catch (const json::exception &e) {
		throw ConfigError("invalid JSON: " + short_reason(e.what()));
	}
	if (!dup.error().empty())
		throw ConfigError(dup.error());
	return root;
}

} // namespace brokerd::config::values
