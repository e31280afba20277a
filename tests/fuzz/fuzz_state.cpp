// libFuzzer target: the re-exec state, read from a memfd and checked as `brokerd --check-state`
// does (state::read, then state::check).
//
// Any bytes either pass or give a std::runtime_error that says what is wrong; the fd is closed
// either way.
#include "fuzz.hpp"
#include "daemon/state.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <stdexcept>

using namespace brokerd;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
{
	const int base = fuzz::lowest_free_fd();
	int fd = ::memfd_create("fuzz-state", MFD_CLOEXEC);
	if (fd < 0 || ::write(fd, data, size) != static_cast<ssize_t>(size))
		fuzz::fail("memfd");
	try {
		state::check(state::read(fd));
	} catch (const std::runtime_error &e) {
		fuzz::check(*e.what() != '\0', "a refusal without a message");
	}
	fuzz::check(fuzz::lowest_free_fd() == base, "the state fd was left open");
	return 0;
}
