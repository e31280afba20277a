#!/usr/bin/env python3
"""Writes proto/names.hpp from .varlink files: every method and error name of each interface, and
the values of every field that has a fixed set of them.

    gen_names.py OUTPUT FILE.varlink...

Each interface becomes a namespace named after its last part, lowercased (io.brokerd.Control:
proto::names::control), holding kInterface and one constant per method and error, with its full
name: proto::names::control::kUpgrade = "io.brokerd.Control.Upgrade". kMembers lists them all, so
a test can compare them with the files.

A field's values are declared once, in the file, in one of two forms:
  - a Varlink enum, inline (`state: (running, stopped, failed)`) or as a named type
    (`type InstanceState (starting, ready, ...)`); Varlink sends an enum's values as these strings;
  - for a string whose values are not all Varlink names (a name has no "-": "crash-loop"), a
    sentence in the doc comment of its type or method: `event is one of "accepted", "crash-loop"
    or "done"`. The field must then be declared `string` (or `?string`) there.
Each such field gets a namespace inside its interface's, named after its type or method and the
field, in snake case (Progress.event: proto::names::control::progress_event; a named enum type
after the type alone: InstanceState: proto::names::control::instance_state). It holds one constant
per value, named after the value in camel case (kAccepted = "accepted", kCrashLoop = "crash-loop"),
and kValues, all of them in file order. kValueLists lists every such field, so a test can compare
them with the files.
"""
import re
import sys

INTERFACE = re.compile(r"^interface\s+([A-Za-z][A-Za-z0-9-]*(?:\.[A-Za-z0-9][A-Za-z0-9-]*)+)$")
DECLARATION = re.compile(r"^(type|method|error)\s+([A-Z][A-Za-z0-9]*)\b(.*)$")
NAME = re.compile(r"^[A-Za-z](?:_?[A-Za-z0-9])*$")
# `field: (a, b)`, also optional (`?(a, b)`) or in arrays and maps (`[](a, b)`).
INLINE_ENUM = re.compile(r"\b([A-Za-z]\w*)\s*:\s*\??(?:\[\w*\]\??)*\(([^():]*)\)")
NAMED_ENUM = re.compile(r"^\s*\(([^():]*)\)\s*$")
# `event is one of "a", "b" or "c"` in a doc comment.
VALUE_LIST = re.compile(r'\b([a-z][a-z0-9_]*)\s+is\s+one\s+of\s+((?:"[^"]+",\s+)*"[^"]+",?\s+or\s+"[^"]+")')
QUOTED = re.compile(r'"([^"]+)"')


def snake(name):
    """"ServiceInfo" -> "service_info"."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def camel(value):
    """"crash-loop" -> "CrashLoop"."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]", value))


class Declaration:
    def __init__(self, kind, name, doc, line):
        self.kind, self.name, self.doc, self.line = kind, name, doc, line
        self.body = ""


def declarations(path):
    """(interface, [Declaration]) from one file, in file order; each with its doc comment (the
    comment lines right above it) and its text without comments."""
    interface, decls, doc = None, [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            code, _, comment = raw.partition("#")
            code = code.strip()
            if not code:
                doc = doc + [comment.strip()] if comment else []
                continue
            m = INTERFACE.match(code)
            if m:
                if interface:
                    sys.exit("%s:%d: a second interface line" % (path, n))
                interface, doc = m.group(1), []
                continue
            m = DECLARATION.match(code)
            if m:
                decls.append(Declaration(m.group(1), m.group(2), " ".join(doc), n))
                doc, code = [], m.group(3)
            if decls:
                decls[-1].body += " " + code
    if not interface:
        sys.exit("%s: no interface line" % path)
    return interface, decls


def split_values(where, text):
    values = [v.strip() for v in text.split(",")]
    for v in values:
        if not NAME.match(v):
            sys.exit("%s: %r is not a Varlink name" % (where, v))
    return values


def value_lists(path, decl):
    """[(namespace, field, form, [value])] of one declaration."""
    where = "%s:%d: %s" % (path, decl.line, decl.name)
    if decl.kind == "type":
        m = NAMED_ENUM.match(decl.body)
        if m:
            return [(snake(decl.name), "", "enum", split_values(where, m.group(1)))]
    lists = []
    for m in INLINE_ENUM.finditer(decl.body):
        lists.append(("%s_%s" % (snake(decl.name), m.group(1)), m.group(1), "enum",
                      split_values("%s.%s" % (where, m.group(1)), m.group(2))))
    for m in VALUE_LIST.finditer(decl.doc):
        field = m.group(1)
        if not re.search(r"\b%s\s*:\s*\??string\b" % field, decl.body):
            sys.exit("%s: the comment lists values of %s, which is not a string field" % (where, field))
        lists.append(("%s_%s" % (snake(decl.name), field), field, "comment", QUOTED.findall(m.group(2))))
    return lists


def value_lines(interface, space, lists, all_lists):
    """The namespaces of one interface's value lists."""
    lines = []
    for ns, (member, field, form, values) in lists.items():
        names = set()
        for v in values:
            if camel(v) in names:
                sys.exit("%s.%s: two values are both k%s" % (interface, member, camel(v)))
            names.add(camel(v))
        full = "%s.%s%s" % (interface, member, "." + field if field else "")
        lines += ["// %s: %s" % (full, "a Varlink enum" if form == "enum" else "a string, its values in a comment"),
                  "namespace %s {" % ns]
        lines += ['inline constexpr std::string_view k%s = "%s";' % (camel(v), v) for v in values]
        lines.append("inline constexpr std::array<std::string_view, %d> kValues{{%s}};"
                     % (len(values), ", ".join("k" + camel(v) for v in values)))
        lines += ["} // namespace %s" % ns, ""]
        all_lists.append((full, form, "%s::%s::kValues" % (space, ns)))
    return lines


def interface_lines(path, spaces, all_members, all_lists):
    """One interface's namespace."""
    interface, decls = declarations(path)
    space = interface.rsplit(".", 1)[1].lower()
    if space in spaces:
        sys.exit("%s: a second interface ending in %s" % (path, space))
    spaces.add(space)
    lines = ["// %s (%s)" % (interface, path.rsplit("/", 1)[-1]), "namespace %s {" % space, ""]
    lines.append('inline constexpr std::string_view kInterface = "%s";' % interface)
    seen, lists = set(), {}
    for d in decls:
        for ns, field, form, values in value_lists(path, d):
            if ns in lists:
                sys.exit("%s: %s names two value lists" % (path, ns))
            lists[ns] = (d.name, field, form, values)
        if d.kind == "type":
            continue
        if d.name in seen:
            sys.exit("%s: %s is declared twice" % (path, d.name))
        seen.add(d.name)
        full = "%s.%s" % (interface, d.name)
        lines.append('inline constexpr std::string_view k%s = "%s"; // %s' % (d.name, full, d.kind))
        all_members.append((d.kind, full))
    lines.append("")
    lines += value_lines(interface, space, lists, all_lists)
    lines += ["} // namespace %s" % space, ""]
    return lines


def main():
    out, sources = sys.argv[1], sys.argv[2:]
    lines = [
        "// Generated by proto/gen_names.py from the .varlink files; do not edit.",
        "#pragma once",
        "",
        "#include <array>",
        "#include <span>",
        "#include <string_view>",
        "",
        "namespace proto::names {",
        "",
        "// One method or error of an interface, for the test that compares these names with the files.",
        "struct Member {",
        "\tstd::string_view kind; // \"method\" or \"error\"",
        "\tstd::string_view name; // full: \"io.brokerd.Control.Upgrade\"",
        "};",
        "",
        "// The values of a field, for the test that compares them with the files.",
        "struct ValueList {",
        "\tstd::string_view field; // \"io.brokerd.Control.Progress.event\"; a named enum: \"io.brokerd.Control.InstanceState\"",
        "\tstd::string_view form;  // \"enum\" or \"comment\"",
        "\tstd::span<const std::string_view> values;",
        "};",
        "",
    ]
    spaces, all_members, all_lists = set(), [], []
    for path in sources:
        lines += interface_lines(path, spaces, all_members, all_lists)
    lines.append("inline constexpr std::array<Member, %d> kMembers{{" % len(all_members))
    lines += ['\t{"%s", "%s"},' % m for m in all_members]
    lines += ["}};", ""]
    lines.append("inline constexpr std::array<ValueList, %d> kValueLists{{" % len(all_lists))
    lines += ['\t{"%s", "%s", %s},' % l for l in all_lists]
    lines += ["}};", "", "} // namespace proto::names", ""]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
