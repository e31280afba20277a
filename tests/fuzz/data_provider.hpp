// The part of libFuzzer's FuzzedDataProvider that the targets use, taking the same bytes the same
// way, so an input means one thing under libFuzzer and in the replay driver that gcc builds
// (which has no <fuzzer/FuzzedDataProvider.h>).
//
// Integers come off the end of the input, strings off its front, as in LLVM's header: a corpus
// file or a crash libFuzzer wrote replays to the same calls. Every build uses this one, libFuzzer's
// included, so the two cannot drift apart.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

namespace fuzz {

class DataProvider {
public:
	DataProvider(const std::uint8_t *data, std::size_t size) : data_(data), remaining_(size) {}
	DataProvider(const DataProvider &) = delete;
	DataProvider &operator=(const DataProvider &) = delete;

	std::size_t remaining_bytes() const { return remaining_; }

	// A value in [min, max] from the last bytes of the input, one byte for each 8 bits of the
	// range; min when no byte is left.
	template <typename T>
	T ConsumeIntegralInRange(T min, T max)
	{
		static_assert(std::is_integral_v<T> && sizeof(T) <= sizeof(std::uint64_t));
		if (min > max)
			std::abort();
		const std::uint64_t range = static_cast<std::uint64_t>(max) - static_cast<std::uint64_t>(min);
		std::uint64_t result = 0;
		for (std::size_t offset = 0; offset < sizeof(T) * CHAR_BIT && (range >> offset) > 0 && remaining_ != 0;
		     offset += CHAR_BIT) {
			--remaining_;
			result = (result << CHAR_BIT) | data_[remaining_];
		}
		if (range != std::numeric_limits<std::uint64_t>::max())
			result %= range + 1;
		return static_cast<T>(static_cast<std::uint64_t>(min) + result);
	}

	template <typename T>
	T ConsumeIntegral()
	{
		return ConsumeIntegralInRange(std::numeric_limits<T>::min(), std::numeric_limits<T>::max());
	}

	bool ConsumeBool() { return (ConsumeIntegral<std::uint8_t>() & 1) != 0; }

	// Up to max_length bytes off the front: a backslash escapes a backslash, and a backslash
	// before anything else ends the string (both taken), so an inserted byte lengthens it.
	std::string ConsumeRandomLengthString(std::size_t max_length)
	{
		std::string result;
		for (std::size_t i = 0; i < max_length && remaining_ != 0; ++i) {
			char next = take();
			if (next == '\\' && remaining_ != 0) {
				next = take();
				if (next != '\\')
					break;
			}
			result += next;
		}
		return result;
	}

	std::string ConsumeRemainingBytesAsString()
	{
		std::string result(reinterpret_cast<const char *>(data_), remaining_);
		data_ += remaining_;
		remaining_ = 0;
		return result;
	}

private:
	char take()
	{
		char c = static_cast<char>(*data_++);
		--remaining_;
		return c;
	}

	const std::uint8_t *data_;
	std::size_t remaining_;
};

} // namespace fuzz
