// Varlink framing: NUL-terminated JSON messages with fds queued in order (see varlink.hpp).
#include "proto/varlink.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace proto::varlink {

namespace {

// Bytes one receive() reads at most.
constexpr std::size_t kReadChunk = 1 << 16;

// Collects fd indices under members named "fd"; returns false on a non-integer or negative one.
// A null "fd" is an unset `?int` (as the Worker interface's Listener.fd is when no fds were
// asked for) and refers to nothing.
bool collect_fd_refs(const json &value, std::vector<long long> &out)
{
	if (value.is_object()) {
		for (auto it = value.begin(); it != value.end(); ++it) {
			if (it.key() == "fd") {
				if (it.value().is_null())
					continue;
				if (!it.value().is_number_integer() || it.value().get<long long>() < 0)
					return false;
				out.push_back(it.value().get<long long>());
			} else if (!collect_fd_refs(it.value(), out)) {
				return false;
			}
		}
	} else if (value.is_array()) {
		for (const auto &v : value)
			if (!collect_fd_refs(v, out))
				return false;
	}
	return true;
}

} // namespace

int count_fd_refs(const json &body)
{
	if (!body.is_object())
		return -EBADMSG;
	auto params = body.find("parameters");
	if (params == body.end())
		return 0;
	return count_fd_refs_in(*params);
}

int count_fd_refs_in(const json &parameters)
{
	std::vector<long long> refs;
	if (!collect_fd_refs(parameters, refs))
		return -EBADMSG;
	if (refs.size() > limits::kMaxFdsPerMessage)
		return -EBADMSG;
	std::vector<bool> seen(refs.size(), false);
	for (long long r : refs) {
		if (r >= static_cast<long long>(refs.size()) || seen[r])
			return -EBADMSG;
		seen[r] = true;
	}
	return static_cast<int>(refs.size());
}

json parse(std::string_view text)
{
	struct TooDeep {};
	auto bound = [](int depth, json::parse_event_t event, json &) {
		if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
		    !depth_allowed(depth))
			throw TooDeep{};
		return true;
	};
	try {
		return json::parse(text, bound);
	} catch (const json::exception &) {
	} catch (const TooDeep &) {
	}
	return json(json::value_t::discarded);
}

Stream::Stream(UniqueFd fd, std::size_t max_message, std::size_t max_queued_fds)
	: fd_(std::move(fd)), max_message_(max_message), max_input_(max_message), max_queued_fds_(max_queued_fds)
{
}

int Stream::receive()
{
	if (broken_)
		return -EPROTO;

	char buf[kReadChunk];
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * limits::kMaxFdsPerMessage)];
	// A peer held to small messages is read no further ahead than one of them.
	std::size_t chunk = std::min(sizeof(buf), max_input_ + 1);
	iovec iov{buf, chunk};
	msghdr msg{};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control;
	msg.msg_controllen = sizeof(control);

	ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	if (n < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;

	// Every fd is ours the moment recvmsg returns: take ownership before any check.
	std::size_t received = 0;
	for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		const unsigned char *data = CMSG_DATA(c);
		for (std::size_t i = 0; i < count; i++) {
			int fd;
			std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
			in_fds_.push_back(UniqueFd::from_peer(fd));
			received++;
		}
	}
	if ((msg.msg_flags & MSG_CTRUNC) && allow_lost_fds_ && n > 0) {
		// One read carries the fds of one message, those that fit first: the rest of that
		// message's fds are missing from here on.
		in_fds_.emplace_back();
	} else if (msg.msg_flags & MSG_CTRUNC) {
		broken_ = true;
		in_fds_.clear();
		return -EPROTO;
	}
	if (in_fds_.size() > max_queued_fds_) {
		broken_ = true;
		in_fds_.clear();
		return -EPROTO;
	}
	if (received > 0 && n == 0) {
		// fds always travel with the first byte of their message.
		broken_ = true;
		in_fds_.clear();
		return -EPROTO;
	}

	in_.append(buf, static_cast<std::size_t>(n));
	// Bytes a caller has not taken yet are bounded too, even while it takes none.
	if (in_.size() > max_input_ + chunk) {
		broken_ = true;
		in_fds_.clear();
		return -EMSGSIZE;
	}
	return static_cast<int>(n);
}

int Stream::next(Message &out)
{
	if (broken_)
		return -EPROTO;

	std::size_t end = in_.find('\0', scanned_);
	if (end == std::string::npos) {
		scanned_ = in_.size();
		if (in_.size() > max_input_) {
			broken_ = true;
			in_fds_.clear();
			return -EMSGSIZE;
		}
		return 0;
	}
	if (end > max_input_) {
		broken_ = true;
		in_fds_.clear();
		return -EMSGSIZE;
	}

	std::string_view text(in_.data(), end);
	json body = parse(text);
	in_.erase(0, end + 1);
	scanned_ = 0;
	// One large message must not keep its buffer for the life of the stream.
	if (in_.empty() && in_.capacity() > 2 * kReadChunk)
		std::string().swap(in_);

	int nfds = body.is_discarded() ? -EBADMSG : count_fd_refs(body);
	if (nfds < 0) {
		broken_ = true;
		in_fds_.clear();
		return nfds;
	}
	// The fds that came, up to a lost-fds mark; the mark stands for all the message still lacks.
	std::size_t came = 0;
	bool lost = false;
	for (const UniqueFd &f : in_fds_) {
		if (came == static_cast<std::size_t>(nfds))
			break;
		if (!f) {
			lost = true;
			break;
		}
		came++;
	}
	if (!lost && came < static_cast<std::size_t>(nfds)) {
		broken_ = true;
		in_fds_.clear();
		return -EPROTO;
	}

	out.body = std::move(body);
	out.fds.clear();
	for (std::size_t i = 0; i < came; i++) {
		out.fds.push_back(std::move(in_fds_.front()));
		in_fds_.pop_front();
	}
	if (lost) {
		in_fds_.pop_front();
		out.fds.resize(static_cast<std::size_t>(nfds));
	}

	// fds arrive with the first byte of the message that owns them, so queued fds with no
	// buffered byte to claim them are surplus.
	if (!in_fds_.empty() && in_.empty()) {
		broken_ = true;
		in_fds_.clear();
		out.fds.clear();
		return -EPROTO;
	}
	return 1;
}

int Stream::enqueue(const json &body, std::vector<UniqueFd> fds)
{
	std::size_t n = fds.size();
	return queue(body, n, Outgoing{{}, 0, std::move(fds), {}, false});
}

int Stream::enqueue_borrowed(const json &body, std::vector<int> fds)
{
	std::size_t n = fds.size();
	return queue(body, n, Outgoing{{}, 0, {}, std::move(fds), n > 0});
}

int Stream::enqueue_reply(const json &parameters, bool continues, std::vector<UniqueFd> fds)
{
	if (fds.size() > limits::kMaxFdsPerMessage)
		return -E2BIG;
	if (count_fd_refs_in(parameters) != static_cast<int>(fds.size()))
		return -EBADMSG;
	Outgoing o{{}, 0, std::move(fds), {}, false};
	o.data = "{\"parameters\":";
	o.data += parameters.is_null() ? std::string("{}") : parameters.dump(-1, ' ', false, json::error_handler_t::replace);
	o.data += continues ? ",\"continues\":true}" : "}";
	return queue_text(std::move(o));
}

int Stream::queue(const json &body, std::size_t nfds, Outgoing o)
{
	if (nfds > limits::kMaxFdsPerMessage)
		return -E2BIG;
	int refs = count_fd_refs(body);
	if (refs < 0 || static_cast<std::size_t>(refs) != nfds)
		return -EBADMSG;
	o.data = body.dump(-1, ' ', false, json::error_handler_t::replace);
	return queue_text(std::move(o));
}

int Stream::queue_text(Outgoing o)
{
	if (o.data.size() > max_message_)
		return -EMSGSIZE;
	if (out_bytes_ + o.data.size() + 1 > max_write_queue_)
		return -ENOBUFS;
	o.data.push_back('\0');
	out_bytes_ += o.data.size();
	out_.push_back(std::move(o));
	return 0;
}

int Stream::flush()
{
	while (!out_.empty()) {
		Outgoing &o = out_.front();
		iovec iov{o.data.data() + o.offset, o.data.size() - o.offset};
		msghdr msg{};
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;

		alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * limits::kMaxFdsPerMessage)];
		std::size_t nfds = o.fds.size() + o.borrowed.size();
		if (nfds > 0) {
			std::size_t len = sizeof(int) * nfds;
			msg.msg_control = control;
			msg.msg_controllen = CMSG_SPACE(len);
			std::memset(control, 0, msg.msg_controllen);
			cmsghdr *c = CMSG_FIRSTHDR(&msg);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(len);
			unsigned char *p = CMSG_DATA(c);
			for (std::size_t i = 0; i < o.fds.size(); i++) {
				int fd = o.fds[i].get();
				std::memcpy(p + i * sizeof(int), &fd, sizeof(int));
			}
			if (!o.borrowed.empty())
				std::memcpy(p, o.borrowed.data(), len);
		}

		ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EWOULDBLOCK)
				return -EAGAIN;
			if (errno == EINTR)
				continue;
			return -errno;
		}
		o.fds.clear(); // delivered with the first byte: our copies close now
		o.borrowed.clear();
		o.offset += static_cast<std::size_t>(n);
		out_bytes_ -= static_cast<std::size_t>(n);
		if (o.offset == o.data.size())
			out_.pop_front();
	}
	return 0;
}

std::size_t Stream::unsent_borrowed() const
{
	std::size_t n = 0;
	for (const Outgoing &o : out_)
		n += o.borrowing; // written whole, it is no longer queued
	return n;
}

bool Stream::save(std::string &in, std::string &out) const
{
	if (!in_fds_.empty())
		return false;
	for (const Outgoing &o : out_)
		if (!o.fds.empty() || !o.borrowed.empty())
			return false;
	in = in_;
	out.clear();
	for (const Outgoing &o : out_)
		out.append(o.data, o.offset, std::string::npos);
	return true;
}

void Stream::restore(std::string in, std::string out)
{
	in_ = std::move(in);
	scanned_ = 0;
	if (!out.empty()) {
		out_bytes_ += out.size();
		out_.push_back(Outgoing{std::move(out), 0, {}, {}, false});
	}
}

json make_call(std::string_view method, json parameters, bool more, bool oneway)
{
	json call = {{"method", method}};
	if (!parameters.is_null())
		call["parameters"] = std::move(parameters);
	if (more)
		call["more"] = true;
	if (oneway)
		call["oneway"] = true;
	return call;
}

json make_reply(json parameters, bool continues)
{
	json reply = {{"parameters", parameters.is_null() ? json::object() : std::move(parameters)}};
	if (continues)
		reply["continues"] = true;
	return reply;
}

json make_error(std::string_view error, json parameters)
{
	return {{"error", error}, {"parameters", parameters.is_null() ? json::object() : std::move(parameters)}};
}

} // namespace proto::varlink
