#include "os/paths.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

namespace brokerd {

std::optional<std::string> make_parent_directory(const std::string &path)
{
	std::size_t slash = path.rfind('/');
	if (slash == std::string::npos || slash == 0)
		return std::nullopt;
	std::string dir = path.substr(0, slash);
	if (::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST)
		return std::nullopt;
	if (errno == ENOENT) {
		if (auto why = make_parent_directory(dir))
			return why;
		if (::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST)
			return std::nullopt;
	}
	return "mkdir " + dir + ": " + std::strerror(errno);
}

} // namespace brokerd
