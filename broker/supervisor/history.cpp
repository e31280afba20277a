// A service's bounded history of generations (see history.hpp).
#include "supervisor/history.hpp"

#include <algorithm>

namespace brokerd {

namespace {

constexpr GenerationOrigin kOrigins[] = {GenerationOrigin::Start,   GenerationOrigin::Upgrade,
                                         GenerationOrigin::Rollback, GenerationOrigin::Restart,
                                         GenerationOrigin::Takeover, GenerationOrigin::Registration};
constexpr GenerationResult kResults[] = {GenerationResult::Serving, GenerationResult::Replaced,
                                         GenerationResult::RolledBack, GenerationResult::Failed,
                                         GenerationResult::Stopped};

} // namespace

std::string_view origin_name(GenerationOrigin how)
{
	switch (how) {
	case GenerationOrigin::Start:
		return "start";
	case GenerationOrigin::Upgrade:
		return "upgrade";
	case GenerationOrigin::Rollback:
		return "rollback";
	case GenerationOrigin::Restart:
		return "restart";
	case GenerationOrigin::Takeover:
		return "takeover";
	case GenerationOrigin::Registration:
		break;
	}
	return "registration";
}

std::string_view result_name(GenerationResult result)
{
	switch (result) {
	case GenerationResult::Serving:
		return "serving";
	case GenerationResult::Replaced:
		return "replaced";
	case GenerationResult::RolledBack:
		return "rolled-back";
	case GenerationResult::Failed:
		return "failed";
	case GenerationResult::Stopped:
		break;
	}
	return "stopped";
}

std::optional<GenerationOrigin> origin_named(std::string_view name)
{
	for (GenerationOrigin how : kOrigins)
		if (origin_name(how) == name)
			return how;
	return std::nullopt;
}

std::optional<GenerationResult> result_named(std::string_view name)
{
	for (GenerationResult result : kResults)
		if (result_name(result) == name)
			return result;
	return std::nullopt;
}

std::uint64_t History::fresh_revision()
{
	static std::uint64_t last = 0; // one loop thread owns every History
	return ++last;
}

void History::begin(HistoryRecord record)
{
	revision_ = fresh_revision();
	records_.push_back(std::move(record));
	while (records_.size() > kLength)
		records_.pop_front();
}

void History::end(std::uint64_t generation, GenerationResult result, usec_t now)
{
	end_if([generation](const HistoryRecord &r) { return r.generation == generation; }, result, now);
}

void History::end_all(GenerationResult result, usec_t now)
{
	end_if([](const HistoryRecord &) { return true; }, result, now);
}

void History::end_if(const std::function<bool(const HistoryRecord &)> &which, GenerationResult result, usec_t now)
{
	for (HistoryRecord &r : records_)
		if (r.result == GenerationResult::Serving && which(r)) {
			r.result = result;
			r.ended = now;
			revision_ = fresh_revision();
		}
}

const HistoryRecord *History::find(std::uint64_t generation) const
{
	auto it = std::ranges::find(records_, generation, &HistoryRecord::generation);
	return it == records_.end() ? nullptr : &*it;
}

std::vector<std::uint64_t> History::known() const
{
	std::vector<std::uint64_t> out;
	for (const HistoryRecord &r : records_)
		out.push_back(r.generation);
	return out;
}

} // namespace brokerd
