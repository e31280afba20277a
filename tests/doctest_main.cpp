// The one doctest main() shared by every test program. A run in which no test case ran fails:
// meson names each case with --test-case, and a filter that matches nothing (a renamed case, a
// comma, which doctest reads as a separator) must not pass silently. A run in which a case called
// record_skip (tests/skip.hpp) and none failed exits 77, meson's SKIP, after printing each reason.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "skip.hpp"

#include <cstdio>
#include <string>
#include <vector>

namespace {

int cases_run = 0;
// Where a skip is recorded: the running case and the subcases it is in.
std::string current_case;
std::vector<std::string> current_subcases;
std::vector<std::string> skips;

struct CountCases : doctest::IReporter {
	explicit CountCases(const doctest::ContextOptions &) {}
	void report_query(const doctest::QueryData &) override {}
	void test_run_start() override {}
	void test_run_end(const doctest::TestRunStats &) override {}
	void test_case_start(const doctest::TestCaseData &tc) override
	{
		cases_run++;
		current_case = tc.m_name;
		current_subcases.clear();
	}
	void test_case_reenter(const doctest::TestCaseData &) override { current_subcases.clear(); }
	void test_case_end(const doctest::CurrentTestCaseStats &) override {}
	void test_case_exception(const doctest::TestCaseException &) override {}
	void subcase_start(const doctest::SubcaseSignature &s) override { current_subcases.emplace_back(s.m_name.c_str()); }
	void subcase_end() override
	{
		if (!current_subcases.empty())
			current_subcases.pop_back();
	}
	void log_assert(const doctest::AssertData &) override {}
	void log_message(const doctest::MessageData &) override {}
	void test_case_skipped(const doctest::TestCaseData &) override {}
};

} // namespace

REGISTER_LISTENER("count-cases", 1, CountCases);

void record_skip(const std::string &reason)
{
	std::string where = current_case;
	for (const std::string &s : current_subcases)
		where += " / " + s;
	skips.push_back(where + ": " + reason);
}

int main(int argc, char **argv)
{
	doctest::Context context(argc, argv);
	int r = context.run();
	if (context.shouldExit())
		return r;
	if (r == 0 && cases_run == 0) {
		std::fprintf(stderr, "no test case ran: check the --test-case filter\n");
		return 1;
	}
	for (const std::string &s : skips)
		std::printf("SKIPPED: %s\n", s.c_str());
	std::fflush(stdout);
	if (r == 0 && !skips.empty())
		return 77;
	return r;
}
