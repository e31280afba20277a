// Pure parsing of brokerctl's own argument values (see arguments.hpp).
#include "arguments.hpp"

#include "format.hpp"

namespace brokerctl {

std::optional<std::vector<std::string>> take_exec(std::vector<std::string> &args)
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
		if (inline_value)
			exec.emplace_back(arg.substr(kFlag.size() + 1));
		exec.insert(exec.end(), args.begin() + static_cast<std::ptrdiff_t>(i) + 1, args.end());
		args.resize(i);
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
