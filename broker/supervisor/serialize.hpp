// The supervisor's state as JSON, for the brokerd a reexec starts and for the crash state. The
// only part of the supervisor that knows a wire format; what it reads back, Supervisor::adopt()
// watches again, or Supervisor::readopt() after a crash.
#pragma once

#include "proto/unique_fd.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace brokerd {

class Supervisor;

struct Serializer {
	// Every service, generation and instance; the fds the next brokerd must inherit are added to
	// keep_fds. Call it only when Supervisor::busy() says nothing is.
	static nlohmann::json save(const Supervisor &supervisor, std::vector<int> &keep_fds);
	// The object `around` with "services" added as save() gives them, as text (dump()), for the
	// crash state, which is written on every turn of the loop that changed anything. A service's
	// history (up to History::kLength whole configs) rarely changes: its text is kept in `cache`
	// and made again only when History::revision() moved. No fds are carried by a crash state.
	struct HistoryTexts {
		std::map<std::string, std::pair<std::uint64_t, std::string>> by_service;
	};
	static std::string save_text(const Supervisor &supervisor, nlohmann::json around, HistoryTexts &cache);
	// A saved state as text: a worker's last lines of output are its bytes, not always UTF-8.
	static std::string dump(const nlohmann::json &j);
	// In the next brokerd, before any service is added. Throws std::runtime_error (or
	// nlohmann::json's exceptions) on a state it cannot read.
	static void restore(Supervisor &supervisor, const nlohmann::json &services);

	// What a brokerd started after a crash has in place of the fd numbers a state names, which
	// were the dead brokerd's: the workers' output pipes the fd store kept, by inode. restore()
	// takes those it names; the processes are found again by their identity (pid, start time).
	struct CrashFds {
		std::map<std::uint64_t, proto::UniqueFd> pipes;
	};
	static void restore_crashed(Supervisor &supervisor, const nlohmann::json &services, CrashFds &fds);

private:
	static void restore_services(Supervisor &supervisor, const nlohmann::json &services, CrashFds *crash);
};

} // namespace brokerd
