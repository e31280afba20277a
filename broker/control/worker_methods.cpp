// io.brokerd.Worker: Hello, Ready, Status, Events, Handoff, Received, Peers, Handed and Resume.
#include "control/connection.hpp"

#include "proto/errors.hpp"
#include "proto/handoff.hpp"
#include "os/closer.hpp"
#include "os/log.hpp"
#include "os/peer.hpp"

#include <fcntl.h>
#include <unistd.h>

namespace brokerd {

using json = nlohmann::json;
namespace vl = proto::varlink;

Instance *ControlServer::Connection::worker()
{
	if (token_.empty()) {
		error(proto::errors::kNotAuthenticated);
		return nullptr;
	}
	Instance *inst = server_.supervisor_.find_by_token(token_);
	if (!inst)
		error(proto::errors::kInvalidToken);
	return inst;
}

void ControlServer::Connection::worker_hello(control::Call &call)
{
	const json &params = call.params;
	std::string token, service, version;
	bool want_fds = false, accept_handoff = false;
	for (auto it = params.begin(); it != params.end(); ++it) {
		const std::string &k = it.key();
		if (it->is_null())
			continue;
		if (k == "token" && it->is_string())
			token = it->get<std::string>();
		else if (k == "want_fds" && it->is_boolean())
			want_fds = it->get<bool>();
		else if (k == "accept_handoff" && it->is_boolean())
			accept_handoff = it->get<bool>();
		else if (k == "service" && it->is_string())
			service = it->get<std::string>();
		else if (k == "version" && it->is_string())
			version = it->get<std::string>();
		else
			return error(vl::kInvalidParameter, {{"parameter", k}});
	}
	if (!token_.empty())
		return error(vl::kInvalidParameter, {{"parameter", "token"}}); // one Hello per connection

	Instance *inst = token.empty() ? hello_register(service, version) : hello_token(token);
	if (!inst)
		return;
	token_ = inst->token;
	idle_.reset();
	inst->accepts_handoff = accept_handoff;
	// A worker may hand off connections from now on: two messages' worth may be in flight.
	stream_.set_max_queued_fds(proto::limits::kMaxQueuedFds);
	try {
		closer::pass_rights(stream_.fd(), true);
		stream_.fd_from_peer(); // fds in flight on it close with it
	} catch (const std::exception &e) {
		close(std::string("cannot take handoffs: ") + e.what());
		return;
	}
	hello_reply(*inst, want_fds);
}

// A worker brokerd spawned, by the token in its environment. Replies the error itself.
Instance *ControlServer::Connection::hello_token(const std::string &token)
{
	Instance *inst = server_.supervisor_.find_by_token(token);
	if (!inst) {
		log::client(log::Level::Warning, "control: Hello with an unknown token from " + who() + " denied");
		error(proto::errors::kInvalidToken);
		return nullptr;
	}
	if (auto why = foreign_to(*inst)) {
		log::client(log::Level::Warning, "control: Hello with the token of instance " + inst->id + " from " + who() +
		                                     " denied: " + *why);
		error(vl::kPermissionDenied, {{"message", *why}});
		return nullptr;
	}
	return inst;
}

// A worker started elsewhere registers for an external service, by its credentials. Replies
// the error itself.
Instance *ControlServer::Connection::hello_register(const std::string &service, const std::string &version)
{
	if (service.empty()) {
		error(vl::kInvalidParameter, {{"parameter", "service"}});
		return nullptr;
	}
	Service *svc = server_.supervisor_.find_service(service);
	if (!svc) {
		error(proto::errors::kWorkerNoSuchService, {{"service", service}});
		return nullptr;
	}
	// The process is taken from the connection, never by its pid alone: signals brokerd sends
	// it later must not reach another process that got the pid since.
	auto process = peer::process(stream_.fd(), peer_.pid, connected_);
	if (auto *gone = std::get_if<Failure>(&process)) {
		log::client(log::Level::Warning, "service " + service + ": registration from " + who() + " refused: " + gone->why);
		error(proto::errors::kPeerExited, {{"message", gone->why + ": a worker registers on a connection it opened itself"}});
		return nullptr;
	}
	proto::UniqueFd pidfd = std::move(std::get<proto::UniqueFd>(process));
	std::vector<gid_t> groups = peer_groups(stream_.fd());
	groups.push_back(peer_.gid);
	auto registered = server_.supervisor_.register_external(*svc, version, std::move(pidfd), peer_.pid, peer_.uid, groups);
	if (const Refusal *why = std::get_if<Refusal>(&registered)) {
		refused(*why);
		return nullptr;
	}
	return std::get<Instance *>(registered);
}

// Hello's reply: the instance's sockets, with their fds when it wants them.
void ControlServer::Connection::hello_reply(const Instance &inst, bool want_fds)
{
	json sockets = json::array();
	std::vector<proto::UniqueFd> fds;
	for (const Listener *l : inst.service->sockets) {
		json s = {{"name", l->name}, {"address", l->address}, {"kind", l->kind}};
		if (want_fds) {
			proto::UniqueFd dup(::fcntl(l->fd.get(), F_DUPFD_CLOEXEC, 3));
			if (!dup) {
				log::error("instance " + inst.id + ": cannot duplicate socket " + l->name + ": " + errno_text(errno));
				return error(vl::kInvalidParameter, {{"parameter", "want_fds"}});
			}
			s["fd"] = fds.size();
			fds.push_back(std::move(dup));
		}
		sockets.push_back(std::move(s));
	}
	json params_out = {{"service", inst.service->name},
	                   {"instance", inst.id},
	                   {"generation", inst.generation->number},
	                   {"sockets", std::move(sockets)},
	                   {"peer_handoff", inst.generation->cfg.handoff == config::HandoffPath::Direct}};
	if (oneway_)
		return;
	int r = stream_.enqueue(vl::make_reply(std::move(params_out)), std::move(fds));
	if (r == 0)
		r = stream_.flush();
	if (r < 0 && r != -EAGAIN)
		close("send: " + errno_text(-r));
}

// A token is its instance's alone: the Hello must come from the instance's process, one it
// started (its descendants, or the processes of the session brokerd made for it, which a
// double-forked daemon stays in), with the instance's uid unless the instance runs as root
// (whose children may drop privileges). Returns why the peer is not, or nullopt.
std::optional<std::string> ControlServer::Connection::foreign_to(const Instance &inst)
{
	auto process = peer::process(stream_.fd(), peer_.pid, connected_);
	if (auto *gone = std::get_if<Failure>(&process))
		return gone->why;
	const proto::UniqueFd &pidfd = std::get<proto::UniqueFd>(process);
	std::vector<pid_t> roots = {inst.pid};
	if (inst.main_pid)
		roots.push_back(inst.main_pid);
	bool related = peer::descends_from(peer_.pid, roots) || (inst.session > 0 && ::getsid(peer_.pid) == inst.session);
	if (!related)
		return "the token belongs to instance " + inst.id + ", and pid " + std::to_string(peer_.pid) +
		       " is neither its process, nor started by it, nor in its session";
	std::optional<uid_t> uid = peer::process_uid(inst.pid);
	if (!uid || (*uid != 0 && *uid != peer_.uid))
		return "the token belongs to instance " + inst.id + ", which runs as another user";
	// The checks above read /proc by pid: they were about the peer only if it still runs.
	if (!peer::alive(pidfd.get()))
		return "pid " + std::to_string(peer_.pid) + ", which connected, has exited";
	return std::nullopt;
}

void ControlServer::Connection::worker_ready(control::Call &)
{
	if (Instance *inst = worker()) {
		server_.supervisor_.instance_ready(*inst, "Ready");
		reply(json::object());
	}
}

void ControlServer::Connection::worker_status(control::Call &call)
{
	const json &params = call.params;
	auto it = params.find("text");
	if (it == params.end() || !it->is_string())
		return error(vl::kInvalidParameter, {{"parameter", "text"}});
	if (Instance *inst = worker()) {
		if (auto why = server_.supervisor_.instance_status(*inst, it->get<std::string>())) {
			log::client(log::Level::Warning, "instance " + inst->id + ": status text refused: " + *why);
			return error(vl::kInvalidParameter, {{"parameter", "text"}});
		}
		reply(json::object());
	}
}

void ControlServer::Connection::worker_events(control::Call &call)
{
	if (!more_)
		return error(vl::kExpectedMore);
	// Parameters it does not know are a newer library's: ignored, as Events always did.
	bool peer_handoff = false;
	if (auto it = call.params.find("peer_handoff"); it != call.params.end() && !it->is_null()) {
		if (!it->is_boolean())
			return error(vl::kInvalidParameter, {{"parameter", "peer_handoff"}});
		peer_handoff = it->get<bool>();
	}
	Instance *inst = worker();
	if (!inst)
		return;
	// One stream per instance: its drain requests and handed-off connections have one recipient.
	if (!server_.supervisor_.attach_events(*inst, this)) {
		log::client(log::Level::Warning, "control: instance " + inst->id + ": a second Events stream from " + who() +
		                                     " refused, the first one stays");
		return error(proto::errors::kEventsInUse, {{"instance", inst->id}});
	}
	inst->peer_handoff = peer_handoff;
	claim_instance();
}

// Handoff is oneway: its outcome comes back as a "handoff" event on this connection's Events
// stream, so one connection carries everything. A call that cannot be understood returns every
// connection it carried: the sender still holds them all.
void ControlServer::Connection::worker_handoff(control::Call &call)
{
	const json &params = call.params;
	std::vector<proto::UniqueFd> &fds = call.fds;
	// By its Events stream, not its token: a sender may exit right after writing its batches,
	// and its exit be handled first. What reached brokerd still goes to the successor, as the
	// sender's own copies are gone.
	Instance *inst = server_.supervisor_.find_by_sink(this);
	if (!inst) {
		if (worker())
			close("Handoff without an Events stream on the same connection");
		return;
	}
	auto batch = params.find("batch");
	if (batch == params.end() || !batch->is_number_unsigned())
		return close("Handoff without a batch id");
	std::uint64_t id = batch->get<std::uint64_t>();
	auto refuse = [&](const std::string &why) {
		log::warning("instance " + inst->id + ": Handoff batch " + std::to_string(id) + ": " + why);
		HandoffResult all{id, 0, std::vector<std::uint64_t>(fds.size()), {}, why};
		for (std::size_t i = 0; i < fds.size(); i++)
			all.returned[i] = i;
		send_handoff_result(all);
	};
	auto conns = params.find("connections");
	if (conns == params.end() || !conns->is_array() || conns->size() != fds.size())
		return refuse("\"connections\" must list one entry per fd");
	std::uint64_t remaining = 0;
	if (auto r = params.find("remaining"); r != params.end() && !r->is_null()) {
		if (!r->is_number_unsigned())
			return refuse("\"remaining\" must be a count");
		remaining = r->get<std::uint64_t>();
	}
	for (auto it = params.begin(); it != params.end(); ++it)
		if (it.key() != "batch" && it.key() != "connections" && it.key() != "remaining")
			return refuse("unknown parameter \"" + it.key() + "\"");

	std::vector<HandoffItem> items(fds.size());
	for (std::size_t i = 0; i < conns->size(); i++) {
		const json &c = (*conns)[i];
		if (!c.is_object())
			return refuse("connection " + std::to_string(i) + " is not an object");
		// count_fd_refs() proved the indices are exactly 0..n-1.
		items[c.at("fd").get<std::size_t>()].fd = std::move(fds[c.at("fd").get<std::size_t>()]);
		if (auto st = c.find("state"); st != c.end() && !st->is_null()) {
			if (!st->is_string() || !proto::handoff::base64_valid(st->get_ref<const std::string &>(), proto::handoff::kMaxState))
				return refuse("connection " + std::to_string(i) + ": state must be base64 of at most " +
				              std::to_string(proto::handoff::kMaxState) + " bytes");
			items[c.at("fd").get<std::size_t>()].state = st->get<std::string>();
		}
		for (auto m = c.begin(); m != c.end(); ++m)
			if (m.key() != "fd" && m.key() != "state")
				return refuse("connection " + std::to_string(i) + ": unknown member \"" + m.key() + "\"");
	}
	server_.supervisor_.handoff(*inst, *this, id, std::move(items), remaining);
}

void ControlServer::Connection::worker_received(control::Call &call)
{
	const json &params = call.params;
	// Not worker(): a receiver may die right after acknowledging, and its exit may be handled
	// before its last words are read. What it acknowledged it had, and closed as it died; given
	// back, those connections would be served twice. The router checks that this connection was
	// sent the batch.
	if (token_.empty())
		return error(proto::errors::kNotAuthenticated);
	auto batch = params.find("batch");
	if (batch == params.end() || !batch->is_number_unsigned())
		return close("Received without a batch id");
	std::vector<std::uint64_t> refused;
	if (auto r = params.find("refused"); r != params.end() && !r->is_null()) {
		if (!r->is_array())
			return close("Received: \"refused\" must be a list of indices");
		for (const json &i : *r) {
			if (!i.is_number_unsigned())
				return close("Received: \"refused\" must be a list of indices");
			refused.push_back(i.get<std::uint64_t>());
		}
	}
	if (auto why = server_.supervisor_.handoff_received(*this, batch->get<std::uint64_t>(), refused))
		return close("Received: " + *why);
	reply(json::object());
}

// A sender's instance, by the Events stream on this connection that said peer_handoff: what the
// direct channel's calls need (their answers go there). Closes the connection otherwise: the
// library never calls them without it.
Instance *ControlServer::Connection::peer_sender(const char *method)
{
	Instance *inst = server_.supervisor_.find_by_sink(this);
	if (!inst || !inst->peer_handoff) {
		if (worker())
			close(std::string(method) + " without an Events stream that said peer_handoff on the same connection");
		return nullptr;
	}
	return inst;
}

// Peers is oneway: the answer is a "peers" event.
void ControlServer::Connection::worker_peers(control::Call &call)
{
	if (!call.params.empty())
		return close("Peers takes no parameters");
	if (Instance *inst = peer_sender("Peers"))
		server_.supervisor_.handoff_peers(*inst, *this);
}

// Counts only, so a bad one closes the connection (the library never sends one) and changes
// nothing. A receiver is named by its instance, of the sender's own service.
void ControlServer::Connection::worker_handed(control::Call &call)
{
	Instance *inst = peer_sender("Handed");
	if (!inst)
		return;
	Supervisor::Handed h;
	// Each count fits in 32 bits: no call can wrap the counters.
	auto count = [&](const char *key, std::uint64_t &out, bool optional) {
		auto it = call.params.find(key);
		if (it == call.params.end() || it->is_null())
			return optional;
		if (!it->is_number_unsigned() || it->get<std::uint64_t>() > UINT32_MAX)
			return false;
		out = it->get<std::uint64_t>();
		return true;
	};
	auto peer = call.params.find("peer");
	if (peer == call.params.end() || !peer->is_string() ||
	    !peer->get_ref<const std::string &>().starts_with(inst->service->name + "/"))
		return close("Handed: \"peer\" must name an instance of service " + inst->service->name);
	h.peer = peer->get<std::string>();
	if (!count("sent", h.sent, false) || !count("landed", h.landed, false) || !count("returned", h.returned, false) ||
	    !count("remaining", h.remaining, true))
		return close("Handed: sent, landed, returned and remaining must be counts under 2^32");
	for (auto it = call.params.begin(); it != call.params.end(); ++it)
		if (it.key() != "peer" && it.key() != "sent" && it.key() != "landed" && it.key() != "returned" &&
		    it.key() != "remaining")
			return close("Handed: unknown parameter \"" + it.key() + "\"");
	if (auto why = server_.supervisor_.handoff_handed(*inst, h))
		return close("Handed: " + *why);
}

// After a restart of brokerd, on the connection with the Events stream (so its "handoff" events
// have somewhere to go): what this instance received from the brokerd before, and its batches in
// doubt. Oneway like Handoff; a malformed one closes the connection, as the library never sends it.
void ControlServer::Connection::worker_resume(control::Call &call)
{
	const json &params = call.params;
	Instance *inst = server_.supervisor_.find_by_sink(this);
	if (!inst) {
		if (worker())
			close("Resume without an Events stream on the same connection");
		return;
	}
	// A member that is a count of at most max.
	auto count_of = [](const json &j, const char *key, std::uint64_t max, std::uint64_t &out) {
		auto it = j.is_object() ? j.find(key) : j.end();
		if (it == j.end() || !it->is_number_unsigned() || it->get<std::uint64_t>() > max)
			return false;
		out = it->get<std::uint64_t>();
		return true;
	};
	auto list = [&](const char *key, std::size_t max) -> std::optional<json> {
		auto it = params.find(key);
		if (it == params.end() || it->is_null())
			return json::array();
		if (!it->is_array() || it->size() > max)
			return std::nullopt;
		return *it;
	};
	for (auto it = params.begin(); it != params.end(); ++it)
		if (it.key() != "in_doubt" && it.key() != "received")
			return close("Resume: unknown parameter \"" + it.key() + "\"");
	constexpr std::uint64_t kMaxChunk = proto::limits::kMaxFdsPerMessage;
	auto doubts = list("in_doubt", HandoffRouter::kMaxBatchesInFlight);
	auto receipts = list("received", proto::limits::kMaxResumeReceipts);
	if (!doubts)
		return close("Resume: \"in_doubt\" must list at most " + std::to_string(HandoffRouter::kMaxBatchesInFlight) +
		             " batches");
	if (!receipts)
		return close("Resume: \"received\" must list at most " + std::to_string(proto::limits::kMaxResumeReceipts) + " chunks");
	std::vector<HandoffDoubts::InDoubt> in_doubt;
	for (const json &d : *doubts) {
		HandoffDoubts::InDoubt out;
		if (!count_of(d, "batch", UINT64_MAX, out.batch) || !count_of(d, "count", kMaxChunk, out.count) || d.size() != 2)
			return close("Resume: a batch in doubt must be {batch, count} with at most " + std::to_string(kMaxChunk) +
			             " connections");
		in_doubt.push_back(out);
	}
	std::vector<HandoffDoubts::Receipt> received;
	for (const json &r : *receipts) {
		HandoffDoubts::Receipt out;
		std::uint64_t pid = 0;
		auto from = r.is_object() ? r.find("instance") : r.end();
		if (from == r.end() || !from->is_string() || !count_of(r, "pid", INT32_MAX, pid) ||
		    !count_of(r, "batch", UINT64_MAX, out.batch) || !count_of(r, "first", kMaxChunk, out.first) ||
		    !count_of(r, "count", kMaxChunk, out.count))
			return close("Resume: a receipt must be {instance, pid, batch, first, count, refused}, a chunk of at most " +
			             std::to_string(kMaxChunk) + " connections");
		if (auto ref = r.find("refused"); ref != r.end() && !ref->is_null()) {
			if (!ref->is_array() || ref->size() > out.count)
				return close("Resume: a receipt's \"refused\" must list indices into its chunk");
			for (const json &i : *ref) {
				if (!i.is_number_unsigned() || i.get<std::uint64_t>() >= out.count)
					return close("Resume: a receipt's \"refused\" must list indices into its chunk");
				out.refused.push_back(i.get<std::uint64_t>());
			}
		}
		for (auto m = r.begin(); m != r.end(); ++m)
			if (m.key() != "instance" && m.key() != "pid" && m.key() != "batch" && m.key() != "first" &&
			    m.key() != "count" && m.key() != "refused")
				return close("Resume: a receipt's member \"" + m.key() + "\" is unknown");
		out.instance = from->get<std::string>();
		out.pid = static_cast<pid_t>(pid);
		received.push_back(std::move(out));
	}
	if (auto why = server_.supervisor_.handoff_resume(*inst, *this, std::move(received), in_doubt))
		return close("Resume: " + *why);
}

} // namespace brokerd
