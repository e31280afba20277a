// Re-exec state: service configs as JSON, and the memfd that carries the whole state.
#include "daemon/state.hpp"

#include "metrics/counters.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace brokerd::state {

using json = nlohmann::json;


json service_config(const config::ServiceConfig &c)
{
	return {{"name", c.name},
	        {"exec", c.exec},
	        {"sockets", c.sockets},
	        {"instances", c.instances},
	        {"version", c.version},
	        {"ready", config::ready_name(c.ready)},
	        {"start_timeout_ms", c.start_timeout.count()},
	        {"drain_timeout_ms", c.drain_timeout.count()},
	        {"drain_signal", c.drain_signal},
	        {"upgrade_batch", c.upgrade_batch},
	        {"restart", config::restart_name(c.restart)},
	        {"handoff", config::handoff_name(c.handoff)},
	        {"user", c.user},
	        {"group", c.group},
	        {"cwd", c.cwd},
	        {"env", c.env},
	        {"register_users", c.register_users},
	        {"register_groups", c.register_groups}};
}

config::ServiceConfig service_config(const json &j)
{
	try {
		config::ServiceConfig c;
		c.name = j.at("name").get<std::string>();
		c.exec = j.at("exec").get<std::vector<std::string>>();
		c.sockets = j.at("sockets").get<std::vector<std::string>>();
		c.instances = j.at("instances").get<unsigned>();
		c.version = j.at("version").get<std::string>();
		auto ready = config::parse_ready(j.at("ready").get<std::string>());
		if (!ready)
			throw std::runtime_error("re-exec state: unknown ready mode in service " + c.name);
		c.ready = *ready;
		c.start_timeout = config::Duration(j.at("start_timeout_ms").get<long long>());
		c.drain_timeout = config::Duration(j.at("drain_timeout_ms").get<long long>());
		c.drain_signal = j.at("drain_signal").get<int>();
		c.upgrade_batch = j.at("upgrade_batch").get<unsigned>();
		auto restart = config::parse_restart(j.at("restart").get<std::string>());
		if (!restart)
			throw std::runtime_error("re-exec state: unknown restart policy in service " + c.name);
		c.restart = *restart;
		// Absent from the state of a brokerd that predates it.
		auto handoff = config::parse_handoff(j.value("handoff", "direct"));
		if (!handoff)
			throw std::runtime_error("re-exec state: unknown handoff path in service " + c.name);
		c.handoff = *handoff;
		c.user = j.at("user").get<std::string>();
		c.group = j.at("group").get<std::string>();
		c.cwd = j.at("cwd").get<std::string>();
		c.env = j.at("env").get<std::map<std::string, std::string>>();
		c.register_users = j.at("register_users").get<std::vector<std::string>>();
		c.register_groups = j.at("register_groups").get<std::vector<std::string>>();
		// A re-exec loads the config again: names resolve here, as at start, not per spawn.
		config::resolve_accounts(c);
		return c;
	} catch (const json::exception &e) {
		throw std::runtime_error(std::string("re-exec state: a service's config: ") + e.what());
	}
}

void check(const json &state)
{
	try {
		config::parse(state.at("config_text").get<std::string>());
		for (const json &svc : state.at("services")) {
			service_config(svc.at("cfg"));
			if (svc.contains("previous"))
				service_config(svc.at("previous"));
			for (const json &gen : svc.at("generations"))
				service_config(gen.at("cfg"));
		}
		if (state.contains("metrics"))
			metrics::Counters::restore(state.at("metrics").at("counters"));
	} catch (const json::exception &e) {
		throw std::runtime_error(std::string("re-exec state: ") + e.what());
	} catch (const config::ConfigError &e) {
		throw std::runtime_error(std::string("re-exec state: the config: ") + e.what());
	}
}

void set_cloexec(int fd, bool on)
{
	int flags = ::fcntl(fd, F_GETFD);
	if (flags >= 0)
		::fcntl(fd, F_SETFD, on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC);
}

proto::UniqueFd write(const json &state)
{
	std::string text = state.dump(-1, ' ', false, json::error_handler_t::replace);
	proto::UniqueFd fd(::memfd_create("brokerd-state", MFD_CLOEXEC | MFD_ALLOW_SEALING));
	if (!fd)
		throw std::runtime_error(std::string("memfd_create: ") + std::strerror(errno));
	std::size_t done = 0;
	while (done < text.size()) {
		ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			throw std::runtime_error(std::string("writing the state: ") + std::strerror(errno));
		done += static_cast<std::size_t>(n);
	}
	// Nobody changes it on the way.
	::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
	return fd;
}

json read(int raw)
{
	proto::UniqueFd fd(raw);
	struct stat st{};
	if (::fstat(fd.get(), &st) < 0)
		throw std::runtime_error(std::string("re-exec state: fd ") + std::to_string(raw) + ": " + std::strerror(errno));
	std::string text(static_cast<std::size_t>(st.st_size), '\0');
	std::size_t done = 0;
	while (done < text.size()) {
		ssize_t n = ::pread(fd.get(), text.data() + done, text.size() - done, static_cast<off_t>(done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			throw std::runtime_error("re-exec state: short read");
		done += static_cast<std::size_t>(n);
	}
	json state = json::parse(text, nullptr, false);
	if (!state.is_object())
		throw std::runtime_error("re-exec state: not a JSON object");
	// An integer, exactly: value() would throw nlohmann's own error for a string, and read 1.5 as 1.
	auto format = state.find("format");
	bool known = format != state.end() && format->is_number_integer();
	if (!known || *format != kFormat)
		throw std::runtime_error("re-exec state: " +
		                         (known ? "format " + std::to_string(format->get<long long>()) : std::string("no format")) +
		                         ", this brokerd reads format " + std::to_string(kFormat));
	return state;
}

} // namespace brokerd::state
