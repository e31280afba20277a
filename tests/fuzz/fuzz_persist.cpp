// libFuzzer target: the crash state's memfd (daemon/persist.*), as a restarted brokerd finds it
// in the fd store after anything at all happened to it.
//
// Input: a little-endian u16 n, then n bytes for slot 0 and the rest for slot 1, each written at
// its slot's offset. read() either gives the newest whole payload or refuses with a reason; an
// adopted state then takes a write and reads it back; no fd is left open.
#include "fuzz.hpp"
#include "daemon/persist.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>

using namespace brokerd;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	if (size < 2)
		return 0;
	const int base = fuzz::lowest_free_fd();
	std::size_t first = std::min<std::size_t>(size - 2, data[0] | (std::size_t{data[1]} << 8));
	const char *bytes = reinterpret_cast<const char *>(data) + 2;
	const std::size_t rest = size - 2 - first;
	{
		proto::UniqueFd fd(::memfd_create("fuzz-persist", MFD_CLOEXEC));
		if (!fd || ::pwrite(fd.get(), bytes, first, 0) != static_cast<ssize_t>(first) ||
		    ::pwrite(fd.get(), bytes + first, rest, static_cast<off_t>(persist::kSlotSize)) != static_cast<ssize_t>(rest))
			fuzz::fail("memfd");
		auto loaded = persist::read(fd.get());
		if (auto *f = std::get_if<Failure>(&loaded)) {
			fuzz::check(!f->why.empty(), "a refusal without a reason");
			fuzz::check(std::holds_alternative<Failure>(persist::StateFile::adopt(std::move(fd))),
			            "adopt took a state that read refuses");
		} else {
			const auto &newest = std::get<std::optional<persist::Loaded>>(loaded);
			auto adopted = persist::StateFile::adopt(std::move(fd));
			auto *state = std::get_if<persist::StateFile>(&adopted);
			fuzz::check(state != nullptr, "adopt refused a state that read takes");
			fuzz::check(state->seq() == (newest ? newest->seq : 0), "adopt goes on from another seq");
			if (state->seq() < UINT64_MAX - 1) {
				fuzz::check(!state->write("next"), "a write after adopt failed");
				auto again = persist::read(state->fd());
				auto *now = std::get_if<std::optional<persist::Loaded>>(&again);
				fuzz::check(now && *now && (*now)->payload == "next", "the write after adopt is not what is read");
			}
		}
	}
	fuzz::check(fuzz::lowest_free_fd() == base, "the state fd was left open");
	return 0;
}
