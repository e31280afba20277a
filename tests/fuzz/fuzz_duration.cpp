// libFuzzer target: brokerctl's duration parser (--timeout, --drain-timeout), against the
// config's parser of the same grammar and against brokerctl's own formatting.
//
// Never more than a year; where both parsers accept a text they agree; what format_duration
// prints for a parsed value parses again, to no more than that value.
#include "config/config.hpp"
#include "format.hpp"
#include "fuzz.hpp"

#include <string_view>

using namespace std::chrono_literals;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	std::string_view text(reinterpret_cast<const char *>(data), size);
	auto cli = brokerctl::parse_duration(text);
	auto cfg = brokerd::config::parse_duration(text);
	if (cfg)
		fuzz::check(cfg->count() >= 0, "the config's parser gave a negative duration");
	if (!cli)
		return 0;
	fuzz::check(cli->count() >= 0 && *cli <= std::chrono::milliseconds(366LL * 86'400'000), "a duration over a year");
	if (cfg)
		fuzz::check(*cfg == *cli, "brokerctl and the config read a duration differently");
	auto again = brokerctl::parse_duration(brokerctl::format_duration(*cli));
	fuzz::check(again && *again <= *cli, "format_duration printed what parse_duration cannot read back");
	return 0;
}
