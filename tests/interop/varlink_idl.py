#!/usr/bin/env python3
"""brokerd's Varlink interface files against Debian's varlink-go IDL parser and a real brokerd:
builds tests/interop/varlink_idl.go offline (as varlink_go.py does), runs it as nobody against
brokerd with docs/io.brokerd.Control.varlink, docs/io.brokerd.Worker.varlink and
broker/control/org.varlink.service.varlink (see the .go file for its checks), then compares the methods
each file declares with those brokerd dispatches: the rows of the method table in
broker/control/methods.cpp, the one place that authorizes and dispatches a call.

Exits 77 (meson's skip) only when go or the varlink-go source is not installed; scripts/test
installs both, so CI always runs it.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

from checks import check, failures, passes, run_with_brokerd  # noqa: E402
from varlink_go import VARLINK_GO, build_client  # noqa: E402

ROOT = os.environ["SOURCE_ROOT"]
FILES = [os.path.join(ROOT, "docs", "io.brokerd.Control.varlink"),
         os.path.join(ROOT, "docs", "io.brokerd.Worker.varlink"),
         os.path.join(ROOT, "broker", "control", "org.varlink.service.varlink")]
NOBODY = 65534


def dispatched():
    """The method names of brokerd's method table, by interface."""
    with open(os.path.join(ROOT, "broker", "control", "methods.cpp")) as f:
        table = f.read()
    rows = re.findall(r'\{"([\w.]+)\.(\w+)", \w+, (?:true|false), &Connection::\w+\}', table)
    names = {}
    for iface, method in rows:
        names.setdefault(iface, []).append(method)
    return {iface: sorted(methods) for iface, methods in names.items()}


def main():
    if shutil.which("go") is None or not os.path.isdir(VARLINK_GO):
        print("SKIP: needs golang-go and golang-github-varlink-go-dev (scripts/test installs them)")
        return 77
    with tempfile.TemporaryDirectory(prefix="brokerd-varlink-idl.") as out_dir:
        checker = build_client(out_dir, "varlink_idl.go", "varlink-idl-check")
        if not checker:
            print("%d passed, %d failed" % (len(passes), len(failures)))
            return 1
        os.chmod(out_dir, 0o755)  # nobody runs the checker from here

        def run_checker(control):
            os.chmod(os.path.dirname(control), 0o755)  # and reaches the control socket
            r = subprocess.run([checker, "unix:" + control] + FILES, user=NOBODY, group=NOBODY,
                               extra_groups=[], stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=90)
            print(r.stdout + r.stderr, end="", flush=True)
            check(r.returncode == 0, "the IDL checks pass (exit %d)" % r.returncode)
            declared = {}
            for line in r.stdout.splitlines():
                if line.startswith("methods "):
                    words = line.split()
                    declared[words[1]] = sorted(words[2:])
            for iface, names in dispatched().items():
                check(declared.get(iface) == names,
                      "%s declares the methods brokerd dispatches: file %s, brokerd %s"
                      % (iface, declared.get(iface), names))

        return run_with_brokerd("brokerd-varlink-idl.", run_checker)


if __name__ == "__main__":
    sys.exit(main())
