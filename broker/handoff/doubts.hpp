// HandoffDoubts: the handoffs a killed brokerd had in flight, settled by the brokerd that took
// over from its crash state.
//
// When brokerd dies mid-handoff, every connection of a batch in flight is still held by its
// sender (it keeps its copies until told), and some of them may have reached a receiver, which
// serves them already. Only the two workers know their halves: the sender which batches it never
// heard of again, each receiver which chunks it got (a "connections" event names its origin).
// Each says its half on reconnecting (Worker.Resume). A batch is settled once no instance of
// its service that may hold part of it is still to speak: what a receiver names landed, the rest
// goes back to its sender. Never served twice, never lost: a connection is given back only when
// every instance that could have it has said it does not, or has exited (its copies closed with
// it). At the deadline, connections that a silent instance may still hold are abandoned: the
// sender closes its copy, as it did before this existed.
#pragma once

#include "handoff/router.hpp"

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace brokerd {

class HandoffDoubts {
public:
	// A chunk a receiver got from the brokerd before, as its "connections" event said.
	struct Receipt {
		std::string instance; // the sender's
		pid_t pid = 0;
		std::uint64_t batch = 0;
		std::uint64_t first = 0;
		std::uint64_t count = 0;
		std::vector<std::uint64_t> refused; // into the chunk
	};
	// A Handoff call whose outcome its sender never heard.
	struct InDoubt {
		std::uint64_t batch = 0;
		std::uint64_t count = 0;
	};
	// An outcome to tell a sender.
	struct Resolved {
		std::string service;
		EventSink *sender = nullptr;
		HandoffResult result;
	};

	// An instance of service that had an Events stream when brokerd died: until it speaks or
	// exits, it may hold connections of any batch of its service.
	void expect(const std::string &service, const std::string &instance);
	// The instance said its half: the chunks it received, and (as the process pid, on sink) the
	// batches it sent and never heard of. Its receipts count the first time only; its batches in
	// doubt are those it names in its latest call.
	void resume(const std::string &service, const std::string &instance, pid_t pid, EventSink &sink,
	            std::vector<Receipt> received, const std::vector<InDoubt> &in_doubt);
	// The instance exited, or its stream closed: it will not speak (its copies closed with it).
	void gone(const std::string &instance);
	// A sender's connection closed: its batches are nobody's to tell any more.
	void forget(const EventSink &sink);

	// The batches that can be settled now.
	std::vector<Resolved> take_resolved();
	// The deadline: every batch left is settled with what is known, and the books close; what a
	// Resume says after this is abandoned.
	std::vector<Resolved> expire();

	// Instances still to speak, and batches still in doubt.
	std::size_t silent() const;
	std::size_t pending() const { return doubts_.size(); }
	bool closed() const { return closed_; }

private:
	using Key = std::tuple<std::string, pid_t, std::uint64_t>; // sender instance, pid, batch
	struct Doubt {
		std::string service;
		EventSink *sender = nullptr;
		std::uint64_t batch = 0;
		std::uint64_t count = 0;
	};
	bool silent_in(const std::string &service) const;
	Resolved settle(const Key &key, const Doubt &d, bool unknown_abandoned) const;

	std::map<std::string, std::string> expected_; // instance → service, until it speaks or goes
	std::map<Key, std::vector<Receipt>> receipts_;
	std::map<Key, Doubt> doubts_;
	std::set<std::string> spoke_; // instances whose receipts are in
	bool closed_ = false;
};

} // namespace brokerd
