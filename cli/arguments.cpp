// Pure parsing of brokerctl's own argument values (see arguments.hpp).
#include "arguments.hpp"

#include "format.hpp"

namespace brokerctl {

std::optional<std::vector<std::string>> take_exec(std::vector<std::string> &args, bool *one_word)
{
	constexpr std::string_view kFlag = "--exec";
	for (std::size_t i = 1; i < args.size(); ++i) {
		std::string_view arg = args[i];
		if (arg == "--")
			return std::nullopt;
		bool inline_value = arg.starts_with(kFlag) && arg.size() > kFlag.size() && arg[kFlag.size()] == '=';
		if (arg != kFlag && !inline_value)
			continue;
		std::vector<std::string> exec;
		std::size_t end = i + 1; // one past what --exec takes
		bool rest = !inline_value && end < args.size() && args[end] == "--";
		if (inline_value) {
			exec.emplace_back(arg.substr(kFlag.size() + 1));
		} else if (rest) {
			exec.assign(args.begin() + static_cast<std::ptrdiff_t>(end) + 1, args.end());
			end = args.size();
		} else if (end < args.size()) {
			exec.push_back(args[end++]);
		}
		if (one_word)
			*one_word = !rest;
		args.erase(args.begin() + static_cast<std::ptrdiff_t>(i), args.begin() + static_cast<std::ptrdiff_t>(end));
		return exec;
	}
	return std::nullopt;
}

std::optional<std::pair<std::string, std::string>> parse_env(std::string_view text)
{
	auto eq = text.find('=');
	if (eq == 0 || eq == std::string_view::npos || text.find('\0') != std::string_view::npos)
		return std::nullopt;
	return std::pair{std::string(text.substr(0, eq)), std::string(text.substr(eq + 1))};
}

std::optional<std::int64_t> duration_ms(std::string_view text)
{
	auto d = parse_duration(text);
	if (!d || d->count() <= 0)
		return std::nullopt;
	return d->count();
}

} // namespace brokerctl
