// Directories for the sockets brokerd binds by path.
#pragma once

#include <optional>
#include <string>

namespace brokerd {

// Makes the directory `path` is in, and its parents, mode 0755, as systemd's RuntimeDirectory
// would (/run/brokerd on a machine where brokerd never ran). nullopt once it exists; else why
// not ("mkdir DIR: reason").
std::optional<std::string> make_parent_directory(const std::string &path);

} // namespace brokerd
