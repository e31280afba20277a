#!/usr/bin/env python3
"""Debian's varlink-go against a real brokerd: builds tests/interop/varlink_go.go offline, in
GOPATH mode against the packaged source (golang-github-varlink-go-dev), starts brokerd with a
Python example worker, and runs the Go client, which checks what it sees (see the .go file).

Exits 77 (meson's skip) only when go or the varlink-go source is not installed; scripts/test
installs both, so CI always runs it.
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

from checks import check, failures, passes, run_with_brokerd  # noqa: E402

GOPATH = "/usr/share/gocode"
VARLINK_GO = os.path.join(GOPATH, "src", "github.com", "varlink", "go", "varlink")


def build_client(out_dir, source="varlink_go.go", name="varlink-go-client"):
    out = os.path.join(out_dir, name)
    env = dict(os.environ)
    env.update({"GOPATH": GOPATH, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "",
                "GOCACHE": os.environ.get("GO_CACHE_DIR") or os.path.join(out_dir, "go-cache")})
    r = subprocess.run(["go", "build", "-o", out, os.path.join(HERE, source)], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    if not check(r.returncode == 0, "%s builds against Debian's varlink-go" % source):
        print(r.stdout + r.stderr, flush=True)
        return None
    return out


def main():
    if shutil.which("go") is None or not os.path.isdir(VARLINK_GO):
        print("SKIP: needs golang-go and golang-github-varlink-go-dev (scripts/test installs them)")
        return 77
    with tempfile.TemporaryDirectory(prefix="brokerd-varlink-go.") as out_dir:
        client = build_client(out_dir)
        if not client:
            print("%d passed, %d failed" % (len(passes), len(failures)))
            return 1

        def run_client(control):
            r = subprocess.run([client, "unix:" + control, "web"], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=90)
            print(r.stdout + r.stderr, end="", flush=True)
            check(r.returncode == 0, "the Go client's checks pass (exit %d)" % r.returncode)

        return run_with_brokerd("brokerd-varlink-go.", run_client)


if __name__ == "__main__":
    sys.exit(main())
