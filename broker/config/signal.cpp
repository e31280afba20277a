// Signal names as kill(1) spells them, for drain.signal (parse_signal), and those an operator may
// send a service (operator_signal, for Signal).
#include "config/config.hpp"

#include <signal.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <utility>

namespace brokerd::config {

std::optional<int> parse_signal(std::string_view text)
{
	if (text.empty() || text.size() > 32)
		return std::nullopt;
	auto known = [](int sig) { return sig > 0 && (sigabbrev_np(sig) || (sig >= SIGRTMIN && sig <= SIGRTMAX)); };
	if (std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
		int n = 0;
		for (char c : text) {
			n = n * 10 + (c - '0');
			if (n >= 1000)
				return std::nullopt;
		}
		return known(n) ? std::optional<int>(n) : std::nullopt;
	}

	std::string name(text);
	std::transform(name.begin(), name.end(), name.begin(),
	               [](char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c; });
	if (name.starts_with("SIG"))
		name.erase(0, 3);
	for (int sig = 1; sig < SIGRTMIN; ++sig)
		if (const char *abbrev = sigabbrev_np(sig); abbrev && name == abbrev)
			return sig;
	// Older names that sigabbrev_np does not return.
	if (name == "IOT")
		return SIGABRT;
	if (name == "POLL")
		return SIGIO;
	if (name == "CLD")
		return SIGCHLD;
	// RTMIN, RTMIN+n, RTMAX, RTMAX-n, as kill(1) spells them.
	auto offset = [](std::string_view rest) -> std::optional<int> {
		if (rest.empty() || rest.size() > 2 ||
		    !std::all_of(rest.begin(), rest.end(), [](char c) { return c >= '0' && c <= '9'; }))
			return std::nullopt;
		int n = 0;
		for (char c : rest)
			n = n * 10 + (c - '0');
		return n;
	};
	std::optional<int> sig;
	std::string_view rest = std::string_view(name).substr(std::min<std::size_t>(name.size(), 6));
	if (name == "RTMIN")
		sig = SIGRTMIN;
	else if (name == "RTMAX")
		sig = SIGRTMAX;
	else if (auto n = offset(rest); n && name.starts_with("RTMIN+"))
		sig = SIGRTMIN + *n;
	else if (n && name.starts_with("RTMAX-"))
		sig = SIGRTMAX - *n;
	if (sig && *sig >= SIGRTMIN && *sig <= SIGRTMAX)
		return sig;
	return std::nullopt;
}

namespace {

// The signals a worker may be told something by: reload, reopen logs, more or fewer workers
// (TTIN/TTOU, as einhorn and unicorn read them), stop, pause and go on.
constexpr std::pair<std::string_view, int> kOperatorNames[] = {
	{"HUP", SIGHUP},   {"INT", SIGINT},   {"QUIT", SIGQUIT}, {"USR1", SIGUSR1},   {"USR2", SIGUSR2},
	{"TERM", SIGTERM}, {"KILL", SIGKILL}, {"CONT", SIGCONT}, {"STOP", SIGSTOP},   {"WINCH", SIGWINCH},
	{"TTIN", SIGTTIN}, {"TTOU", SIGTTOU},
};

} // namespace

const char *const kOperatorSignals = "HUP, INT, QUIT, USR1, USR2, TERM, KILL, CONT, STOP, WINCH, TTIN, TTOU";

std::optional<int> operator_signal(std::string_view text)
{
	if (text.empty() || text.size() > 8)
		return std::nullopt;
	if (std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
		int n = 0;
		for (char c : text)
			n = n * 10 + (c - '0');
		return n >= 1 && n <= 31 ? std::optional<int>(n) : std::nullopt;
	}
	std::string name(text);
	std::transform(name.begin(), name.end(), name.begin(),
	               [](char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c; });
	if (name.starts_with("SIG"))
		name.erase(0, 3);
	for (const auto &[known, sig] : kOperatorNames)
		if (name == known)
			return sig;
	return std::nullopt;
}

} // namespace brokerd::config
