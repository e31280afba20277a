// The one doctest main() shared by every test program. A run in which no test case ran fails:
// meson names each case with --test-case, and a filter that matches nothing (a renamed case, a
// comma, which doctest reads as a separator) must not pass silently.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

namespace {

int cases_run = 0;

struct CountCases : doctest::IReporter {
	explicit CountCases(const doctest::ContextOptions &) {}
	void report_query(const doctest::QueryData &) override {}
	void test_run_start() override {}
	void test_run_end(const doctest::TestRunStats &) override {}
	void test_case_start(const doctest::TestCaseData &) override { cases_run++; }
	void test_case_reenter(const doctest::TestCaseData &) override {}
	void test_case_end(const doctest::CurrentTestCaseStats &) override {}
	void test_case_exception(const doctest::TestCaseException &) override {}
	void subcase_start(const doctest::SubcaseSignature &) override {}
	void subcase_end() override {}
	void log_assert(const doctest::AssertData &) override {}
	void log_message(const doctest::MessageData &) override {}
	void test_case_skipped(const doctest::TestCaseData &) override {}
};

} // namespace

REGISTER_LISTENER("count-cases", 1, CountCases);

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
	return r;
}
