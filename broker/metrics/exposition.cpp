// The Prometheus text format: names checked, values and labels escaped, histograms cumulative.
#include "metrics/exposition.hpp"

#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace brokerd::metrics {

namespace {

const char *type_name(Type t)
{
	switch (t) {
	case Type::Counter:
		return "counter";
	case Type::Histogram:
		return "histogram";
	case Type::Gauge:
		break;
	}
	return "gauge";
}

// HELP text escapes backslash and newline; a label value escapes the double quote too.
void escape(std::string &out, std::string_view text, bool quote)
{
	for (char c : text) {
		if (c == '\\')
			out += "\\\\";
		else if (c == '\n')
			out += "\\n";
		else if (quote && c == '"')
			out += "\\\"";
		else
			out += c;
	}
}

// Integers as integers (a counter of 3 reads "3"), others with every digit a double has.
void number(std::string &out, double v)
{
	if (std::isinf(v)) {
		out += v > 0 ? "+Inf" : "-Inf";
		return;
	}
	if (std::isnan(v)) {
		out += "NaN";
		return;
	}
	char buf[32];
	if (v == std::trunc(v) && std::fabs(v) < 1e15)
		std::snprintf(buf, sizeof(buf), "%.0f", v);
	else
		std::snprintf(buf, sizeof(buf), "%.17g", v);
	out += buf;
}

std::string bound_text(double le)
{
	std::string s;
	number(s, le);
	return s;
}

// The bytes `text` takes as a JSON string's contents (nlohmann::json escapes these).
std::size_t json_size(std::string_view text)
{
	std::size_t n = text.size();
	for (unsigned char c : text)
		n += c == '"' || c == '\\' || c == '\n' || c == '\t' || c == '\r' || c == '\b' || c == '\f' ? 1
		     : c < 0x20                                                                                ? 5
		                                                                                               : 0;
	return n;
}

void family_text(std::string &out, const Family &f)
{
	if (!valid_name(f.name))
		throw std::logic_error("metric name \"" + f.name + "\" is not valid");
	out += "# HELP " + f.name + ' ';
	escape(out, f.help, false);
	out += "\n# TYPE " + f.name + ' ' + type_name(f.type) + '\n';
	for (const Sample &s : f.samples) {
		out += f.name;
		out += s.suffix;
		if (!s.labels.empty()) {
			out += '{';
			bool first = true;
			for (const auto &[name, value] : s.labels) {
				if (!valid_name(name, true))
					throw std::logic_error("label name \"" + name + "\" of " + f.name + " is not valid");
				if (!first)
					out += ',';
				first = false;
				out += name + "=\"";
				escape(out, value, true);
				out += '"';
			}
			out += '}';
		}
		out += ' ';
		number(out, s.value);
		out += '\n';
	}
}

} // namespace

void Histogram::observe(usec_t duration)
{
	double secs = static_cast<double>(duration) / 1e6;
	for (std::size_t i = 0; i < kBounds.size(); i++)
		if (secs <= kBounds[i]) {
			counts[i]++;
			break;
		}
	sum += duration;
	count++;
}

void Histogram::append_to(Family &family, const Labels &labels) const
{
	std::uint64_t cumulative = 0;
	for (std::size_t i = 0; i <= kBounds.size(); i++) {
		Labels with = labels;
		if (i < kBounds.size()) {
			cumulative += counts[i];
			with.emplace_back("le", bound_text(kBounds[i]));
		} else {
			cumulative = count;
			with.emplace_back("le", "+Inf");
		}
		family.samples.push_back({"_bucket", std::move(with), static_cast<double>(cumulative)});
	}
	family.samples.push_back({"_sum", labels, static_cast<double>(sum) / 1e6});
	family.samples.push_back({"_count", labels, static_cast<double>(count)});
}

bool valid_name(std::string_view name, bool label)
{
	if (name.empty() || (label && name.starts_with("__")))
		return false;
	for (std::size_t i = 0; i < name.size(); i++) {
		char c = name[i];
		bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (!label && c == ':');
		if (!letter && !(i > 0 && c >= '0' && c <= '9'))
			return false;
	}
	return true;
}

Rendered render(std::span<const Family> families, std::size_t json_budget)
{
	Rendered r;
	std::size_t used = 0;
	std::string one;
	for (const Family &f : families) {
		one.clear();
		family_text(one, f);
		std::size_t cost = json_size(one);
		if (used + cost > json_budget) {
			r.truncated = true;
			break; // a cut, not a sieve: what comes after it is left out too
		}
		used += cost;
		r.text += one;
	}
	return r;
}

} // namespace brokerd::metrics
