// libFuzzer target: a notify datagram, read line by line as NotifySocket::receive reads it.
//
// Every call takes at least one byte off the datagram, and values never hold a newline or reach
// outside the datagram.
#include "fuzz.hpp"
#include "os/notify.hpp"

#include "proto/limits.hpp"

#include <algorithm>
#include <string_view>

using namespace brokerd;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	if (size > proto::limits::kMaxNotifyMessage)
		return 0; // NotifySocket drops these before reading a line
	std::string_view datagram(reinterpret_cast<const char *>(data), size);
	std::string_view text = datagram;
	std::size_t lines = 0;
	while (!text.empty()) {
		std::size_t before = text.size();
		NotifyLine line = take_notify_line(text);
		lines++;
		fuzz::check(text.size() < before, "a line took nothing off the datagram");
		fuzz::check(line.value.find('\n') == std::string_view::npos, "a value holds a newline");
		fuzz::check(line.value.empty() || (line.value.data() >= datagram.data() &&
		                                   line.value.data() + line.value.size() <= datagram.data() + datagram.size()),
		            "a value outside the datagram");
		bool has_value = line.kind == NotifyLine::Kind::Status || line.kind == NotifyLine::Kind::MainPid;
		fuzz::check(has_value || line.value.empty(), "a value for an assignment that takes none");
	}
	fuzz::check(lines <= static_cast<std::size_t>(std::count(datagram.begin(), datagram.end(), '\n')) + 1,
	            "more lines than the datagram has");
	return 0;
}
