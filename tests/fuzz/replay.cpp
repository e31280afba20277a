// The replay driver: a fuzz target without libFuzzer, run once on each input file, so that every
// build compiles the targets and the suite replays their seed corpora (`fuzz-replay-NAME`).
//
// usage: fuzz-replay-NAME [FILE|DIR...]
// Without arguments it replays the target's seed corpus (FUZZ_CORPUS, set by tests/fuzz/meson.build);
// a DIR stands for the files in it, in name order. Each input is copied into a buffer of exactly
// its size, as libFuzzer does, so AddressSanitizer sees a read past its end. A finding aborts
// (fuzz::fail, or a sanitizer report) right after the line that names the input. Exits 1 when an
// input cannot be read or there is nothing to replay.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#ifndef FUZZ_CORPUS
#error "FUZZ_CORPUS names the target's seed corpus"
#endif

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size);

namespace {

namespace fs = std::filesystem;

// The inputs an argument names: the file, or a directory's files sorted, so that each run replays
// them in the same order.
std::vector<fs::path> inputs_of(const fs::path &arg)
{
	if (!fs::is_directory(arg))
		return {arg};
	std::vector<fs::path> files;
	for (const fs::directory_entry &e : fs::directory_iterator(arg))
		if (e.is_regular_file())
			files.push_back(e.path());
	std::sort(files.begin(), files.end());
	return files;
}

bool replay(const fs::path &file)
{
	std::ifstream in(file, std::ios::binary);
	std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
	if (!in.is_open() || in.bad()) {
		std::fprintf(stderr, "replay: cannot read %s\n", file.c_str());
		return false;
	}
	auto data = std::make_unique<std::uint8_t[]>(bytes.size());
	std::memcpy(data.get(), bytes.data(), bytes.size());
	std::fprintf(stderr, "replay: %s (%zu bytes)\n", file.c_str(), bytes.size());
	std::fflush(stderr);
	LLVMFuzzerTestOneInput(data.get(), bytes.size());
	return true;
}

} // namespace

int main(int argc, char **argv)
{
	std::vector<fs::path> args(argv + 1, argv + argc);
	if (args.empty())
		args.emplace_back(FUZZ_CORPUS);
	// Listed before any runs, so that an exception out of a target is uncaught: a crash, as
	// under libFuzzer.
	std::vector<fs::path> inputs;
	try {
		for (const fs::path &arg : args)
			for (fs::path &file : inputs_of(arg))
				inputs.push_back(std::move(file));
	} catch (const fs::filesystem_error &e) {
		std::fprintf(stderr, "replay: %s\n", e.what());
		return 1;
	}
	if (inputs.empty()) {
		std::fprintf(stderr, "replay: no input to replay\n");
		return 1;
	}
	for (const fs::path &file : inputs)
		if (!replay(file))
			return 1;
	std::fprintf(stderr, "replay: %zu inputs, no finding\n", inputs.size());
	return 0;
}
