// Lenient readers of the broker's replies: a missing or mistyped member reads as a fallback and
// never throws, so an older or newer broker still gets a readable answer.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace brokerctl {

inline const nlohmann::json &member(const nlohmann::json &object, const char *key)
{
	static const nlohmann::json missing;
	if (!object.is_object())
		return missing;
	auto it = object.find(key);
	return it == object.end() ? missing : *it;
}

inline std::string text(const nlohmann::json &object, const char *key, std::string fallback = "-")
{
	const nlohmann::json &v = member(object, key);
	return v.is_string() ? v.get<std::string>() : fallback;
}

inline std::optional<std::int64_t> integer(const nlohmann::json &object, const char *key)
{
	const nlohmann::json &v = member(object, key);
	if (v.is_number_integer())
		return v.get<std::int64_t>();
	return std::nullopt;
}

inline std::string number_text(const nlohmann::json &object, const char *key)
{
	auto n = integer(object, key);
	return n ? std::to_string(*n) : "-";
}

inline const nlohmann::json &array(const nlohmann::json &object, const char *key)
{
	static const nlohmann::json empty = nlohmann::json::array();
	const nlohmann::json &v = member(object, key);
	return v.is_array() ? v : empty;
}

} // namespace brokerctl
