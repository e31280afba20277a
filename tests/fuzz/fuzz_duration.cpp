// libFuzzer target: the one duration grammar (proto/duration.hpp), which brokerd's config and
// brokerctl's --timeout and --drain-timeout read, against its own formatting.
//
// Never negative and never over kMaxDuration; what format_duration prints for a parsed value
// parses again, to no more than that value.
#include "fuzz.hpp"
#include "proto/duration.hpp"

#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	std::string_view text(reinterpret_cast<const char *>(data), size);
	auto d = proto::parse_duration(text);
	if (!d)
		return 0;
	fuzz::check(d->count() >= 0 && *d <= proto::kMaxDuration, "a duration below zero or over the cap");
	auto again = proto::parse_duration(proto::format_duration(*d));
	fuzz::check(again && *again <= *d, "format_duration printed what parse_duration cannot read back");
	return 0;
}
