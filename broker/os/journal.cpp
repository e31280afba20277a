// The journal's native protocol on brokerd's own non-blocking socket, and the queue behind it.
#include "os/journal.hpp"

#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

namespace brokerd::journal {

std::string encode(std::span<const Field> fields)
{
	std::string out;
	for (const Field &f : fields) {
		out += f.name;
		if (f.value.find('\n') == std::string_view::npos) {
			out += '=';
		} else {
			out += '\n';
			std::uint64_t n = f.value.size();
			for (int i = 0; i < 8; i++)
				out += static_cast<char>((n >> (8 * i)) & 0xff);
		}
		out += f.value;
		out += '\n';
	}
	return out;
}

std::optional<std::pair<int, std::string_view>> priority_prefix(std::string_view line)
{
	if (line.size() < 3 || line[0] != '<' || line[1] < '0' || line[1] > '7' || line[2] != '>')
		return std::nullopt;
	return std::pair{line[1] - '0', line.substr(3)};
}

std::string worker_message(const WorkerLine &w)
{
	std::string_view message = w.line;
	int priority = 6;
	if (auto p = priority_prefix(w.line)) {
		priority = p->first;
		message = p->second;
	}
	const std::string level = std::to_string(priority);
	const std::string generation = std::to_string(w.generation);
	const std::string pid = std::to_string(w.pid);
	const Field fields[] = {
		{"MESSAGE", message},
		{"PRIORITY", level},
		{"SYSLOG_IDENTIFIER", w.service},
		{"SYSLOG_FACILITY", "3"},
		{"BROKER_SERVICE", w.service},
		{"BROKER_INSTANCE", w.instance},
		{"BROKER_GENERATION", generation},
		{"BROKER_STREAM", w.stream == 2 ? "stderr" : "stdout"},
		{"OBJECT_PID", pid},
	};
	// A worker that never started has no pid to name.
	return encode(std::span(fields, w.pid > 0 ? std::size(fields) : std::size(fields) - 1));
}

proto::UniqueFd connect_socket(const std::string &path)
{
	sockaddr_un addr{};
	addr.sun_family = AF_UNIX;
	if (path.size() >= sizeof(addr.sun_path)) {
		errno = ENAMETOOLONG;
		return {};
	}
	std::memcpy(addr.sun_path, path.data(), path.size());
	proto::UniqueFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
	if (!fd)
		return {};
	// Connected: a full peer then wakes EPOLLOUT when it has room again, where an unconnected
	// sender would be told it is always writable.
	if (::connect(fd.get(), reinterpret_cast<const sockaddr *>(&addr), sizeof(addr)) < 0)
		return {};
	return fd;
}

Sent Journal::write(std::string_view message)
{
	for (;;) {
		if (::send(fd_.get(), message.data(), message.size(), MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
			return Sent::Ok;
		if (errno == EINTR)
			continue;
		// ENOBUFS: the socket's own buffer is full, which a wakeup also ends.
		if (errno == EAGAIN || errno == ENOBUFS)
			return Sent::Again;
		return Sent::Failed;
	}
}

Sent Journal::send(std::string_view message)
{
	if (!queue_.empty()) {
		wait_writable();
		return Sent::Again;
	}
	Sent s = write(message);
	if (s == Sent::Again)
		wait_writable();
	return s;
}

void Journal::queue(std::string message)
{
	queue_.push_back(std::move(message));
	if (queue_.size() > kMaxQueuedMessages) {
		queue_.pop_front();
		dropped_++;
	}
	flush();
}

void Journal::flush()
{
	while (!queue_.empty()) {
		Sent s = write(queue_.front());
		if (s == Sent::Again) {
			wait_writable();
			return;
		}
		if (s == Sent::Failed) {
			dropped_++;
			if (failed)
				failed(errno);
		}
		queue_.pop_front();
	}
}

void Journal::wait_writable()
{
	if (source_) {
		sd_event_source_set_enabled(source_.get(), SD_EVENT_ONESHOT);
		return;
	}
	sd_event_source *s = nullptr;
	if (sd_event_add_io(event_, &s, fd_.get(), EPOLLOUT, on_writable, this) < 0)
		return;
	sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
	source_.reset(s);
}

int Journal::on_writable(sd_event_source *, int, std::uint32_t, void *userdata)
{
	return guarded("journal", [&]() -> int {
		auto *j = static_cast<Journal *>(userdata);
		j->flush();
		if (j->queue_.empty() && j->writable)
			j->writable();
		return 0;
	});
}

} // namespace brokerd::journal
