// The control socket's method table against what it must match: every method the .varlink files
// declare has exactly one row and no row is undeclared; each row's tier is the one
// docs/protocol.md's "Authorization" table gives it; and a caller's tier comes from its uid and
// groups as control.admin_* and control.read_* say.
#include "control/methods.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using brokerd::access::Tier;
namespace acc = brokerd::access;
namespace control = brokerd::control;

namespace {

std::string read_source(const std::string &relative)
{
	const char *root = std::getenv("SOURCE_ROOT");
	REQUIRE_MESSAGE(root, "SOURCE_ROOT names the source tree (meson test sets it)");
	std::ifstream in(std::string(root) + "/" + relative);
	REQUIRE_MESSAGE(in, relative);
	std::stringstream s;
	s << in.rdbuf();
	return s.str();
}

// "interface.Method" for every method the three interface files declare.
std::vector<std::string> declared_methods()
{
	std::vector<std::string> out;
	for (const char *file : {"broker/control/org.varlink.service.varlink", "docs/io.brokerd.Control.varlink",
	                         "docs/io.brokerd.Worker.varlink"}) {
		std::istringstream text(read_source(file));
		std::string line, interface;
		while (std::getline(text, line)) {
			if (line.starts_with("interface "))
				interface = line.substr(10);
			else if (line.starts_with("method "))
				out.push_back(interface + "." + line.substr(7, line.find('(') - 7));
		}
		CHECK_MESSAGE(!interface.empty(), file);
	}
	return out;
}

// docs/protocol.md's "Authorization" table: the tier whose row names each method. A row names a
// whole interface by its dotted name, and an io.brokerd.Control method by its own name.
std::map<std::string, Tier> documented_tiers(const std::vector<std::string> &declared)
{
	std::string doc = read_source("docs/protocol.md");
	std::size_t section = doc.find("\n## Authorization\n");
	REQUIRE(section != std::string::npos);
	std::istringstream text(doc.substr(section, doc.find("\n## ", section + 1) - section));
	std::map<std::string, Tier> out;
	auto name = [&](const std::string &method, Tier tier) {
		INFO(method, " is named by the rows of ", acc::tier_name(out[method]), " and ", acc::tier_name(tier));
		CHECK(out.count(method) == 0);
		out[method] = tier;
	};
	std::string line;
	while (std::getline(text, line)) {
		std::vector<std::string> cells;
		for (std::size_t at = 0; (at = line.find('|', at)) != std::string::npos && at + 1 < line.size(); at++)
			cells.push_back(line.substr(at + 1, line.find('|', at + 1) - at - 1));
		if (!line.starts_with("| ") || cells.size() < 3)
			continue;
		std::optional<Tier> tier;
		for (Tier t : {Tier::Worker, Tier::Reader, Tier::Admin, Tier::Root})
			if (cells[0] == std::string(" ") + acc::tier_name(t) + " ")
				tier = t;
		if (!tier)
			continue;
		const std::string &may = cells[2];
		for (std::size_t a = may.find('`'); a != std::string::npos; a = may.find('`', may.find('`', a + 1) + 1)) {
			std::string word = may.substr(a + 1, may.find('`', a + 1) - a - 1);
			if (word.find('.') == std::string::npos) {
				name("io.brokerd.Control." + word, *tier);
				continue;
			}
			for (const std::string &m : declared)
				if (m.starts_with(word + ".") && m.find('.', word.size() + 1) == std::string::npos)
					name(m, *tier);
		}
	}
	return out;
}

} // namespace

TEST_CASE("the method table has one row for each declared method, none for another, at the documented tier")
{
	std::vector<std::string> declared = declared_methods();
	CHECK(declared.size() == 26);
	std::map<std::string, Tier> documented = documented_tiers(declared);
	CHECK(documented.size() == declared.size());
	for (const std::string &m : declared) {
		INFO(m);
		std::size_t rows = 0;
		for (const control::Method &row : control::methods())
			rows += row.name == m;
		CHECK(rows == 1);
		REQUIRE(documented.count(m) == 1);
		REQUIRE(control::required(m).has_value());
		CHECK(std::string(acc::tier_name(*control::required(m))) == std::string(acc::tier_name(documented[m])));
		// Only a Handoff carries fds.
		CHECK(control::find_method(m)->takes_fds == (m == "io.brokerd.Worker.Handoff"));
	}
	for (const control::Method &row : control::methods()) {
		INFO(row.name);
		CHECK(std::count(declared.begin(), declared.end(), row.name) == 1);
		CHECK(row.handler != nullptr);
	}
	for (const char *iface : {"org.varlink.service", "io.brokerd.Control", "io.brokerd.Worker"})
		CHECK(control::serves_interface(iface));
	for (const char *iface : {"io.brokerd", "io", "", "io.brokerd.Control.Status", "org.varlink"})
		CHECK(!control::serves_interface(iface));
}

TEST_CASE("a caller's tier comes from its uid and groups as the access rules say")
{
	brokerd::AccessRules rules;
	rules.admin_uids = {1001};
	rules.admin_gids = {2001};
	rules.read_uids = {1002};
	rules.read_gids = {2002};
	constexpr uid_t kBroker = 990;
	struct Case {
		uid_t uid;
		std::vector<gid_t> groups;
		Tier tier;
	};
	for (const Case &c : {
		     Case{0, {0}, Tier::Root},
		     Case{kBroker, {990}, Tier::Root},
		     Case{1001, {1001}, Tier::Admin},
		     Case{1003, {1003, 2001}, Tier::Admin},  // by a supplementary group
		     Case{1002, {1002, 2001}, Tier::Admin},  // a reader in an admin group is an admin
		     Case{1002, {1002}, Tier::Reader},
		     Case{1003, {2002}, Tier::Reader},
		     Case{1003, {1003}, Tier::Worker},
		     Case{1003, {}, Tier::Worker},
		     Case{65534, {65534, 2003}, Tier::Worker},
	     }) {
		INFO("uid ", c.uid);
		CHECK(std::string(acc::tier_name(acc::tier_of(rules, c.uid, c.groups, kBroker))) == std::string(acc::tier_name(c.tier)));
	}
}
