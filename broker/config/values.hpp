// Typed values read out of brokerd.json's JSON, each failure a ConfigError that names the key path
// (`services.web.drain.timeout: expected a duration like "30s", got "soon"`).
#pragma once

#include "config/config.hpp"

#include <nlohmann/json.hpp>

#include <sys/types.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace brokerd::config::values {

using json = nlohmann::json;

// brokerd.json's text as JSON: comments allowed; a syntax error (with its line and column), a
// duplicate key (with its path) or nesting past proto::limits::kMaxJsonDepth is a ConfigError.
json parse_json(std::string_view text);

// A name of letters, digits, '_', '.' and '-', not empty: written bare in a key path.
bool is_plain(std::string_view s);
// A string as JSON would write it, cut short so that a pasted blob does not flood the message.
std::string quote(std::string_view s);
// Key paths read like `services.web.drain.timeout`. Keys that would make that ambiguous or
// unreadable (spaces, quotes, empty) are written as `env["A B"]`.
std::string child(const std::string &path, std::string_view key);
std::string element(const std::string &path, std::size_t index);

[[noreturn]] void fail(const std::string &path, const std::string &message);
// "PATH: expected WHAT, got VALUE".
[[noreturn]] void expected(const std::string &path, std::string_view what, const json &got);

const json &object_at(const json &j, const std::string &path);
// Rejects keys the schema does not know: a typo must not silently fall back to a default.
void check_keys(const json &obj, const std::string &path, std::initializer_list<std::string_view> known);
const json *member(const json &obj, const char *key);

const std::string &string_at(const json &j, const std::string &path, std::string_view what = "a string");
// Strings that end up in argv, environ, paths or names: a NUL byte would silently cut them.
const std::string &text_at(const json &j, const std::string &path, std::string_view what = "a string");
const std::string &nonempty_text_at(const json &j, const std::string &path, std::string_view what);
bool bool_at(const json &j, const std::string &path);
std::uint64_t uint_at(const json &j, const std::string &path, std::uint64_t lo, std::uint64_t hi);
// A JSON number would be read as decimal (660 is not 0660), so modes are octal strings.
mode_t mode_at(const json &j, const std::string &path);
Duration duration_at(const json &j, const std::string &path);
// User and group names as the control server and the register rules compare them. Whether they
// exist is not checked: a name that does not resolve grants nothing.
std::vector<std::string> account_names_at(const json &j, const std::string &path);

// One of the named choices, like "on-failure"; the error lists them all.
template <typename T>
T choice_at(const json &j, const std::string &path, std::initializer_list<std::pair<std::string_view, T>> choices)
{
	std::string what;
	std::size_t i = 0;
	for (const auto &[name, value] : choices) {
		if (i > 0)
			what += i + 1 == choices.size() ? " or " : ", ";
		what += "\"" + std::string(name) + "\"";
		++i;
	}
	const std::string &s = string_at(j, path, what);
	for (const auto &[name, value] : choices)
		if (s == name)
			return value;
	expected(path, what, j);
}

} // namespace brokerd::config::values
