// broker::Error, the one exception type of libbroker-client.
#include "broker/client.hpp"

namespace broker {

Error::Error(int errnum, const std::string &what, std::string varlink_error)
	: std::runtime_error(what), errnum_(errnum), varlink_error_(std::move(varlink_error))
{
}

} // namespace broker
