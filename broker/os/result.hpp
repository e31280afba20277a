// A value, or why there is none: what a step returns when it can fail for a reason worth telling
// (brokerd's error styles are listed in docs/design.md, "Errors").
#pragma once

#include <string>
#include <variant>

namespace brokerd {

struct Failure {
	std::string why;
};

template <typename T>
using Result = std::variant<T, Failure>;

} // namespace brokerd
