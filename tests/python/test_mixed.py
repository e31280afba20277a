#!/usr/bin/env python3
"""The direct handoff channel between the two libraries: a service whose generation 1 is
line_worker.py (broker_client) hands its connections to a generation 2 of tests/handoff's
htest-worker (libbroker-client), which hands them to a generation 3 of line_worker.py again. 600
connections (three frames of at most 253 each way), every 10th holding half a line. After each
upgrade: brokerd made a direct channel between the two (its log says so), Status counts every
connection handed and received and none returned, the sender's own account (its report on exit)
says all landed, and each connection is served by the new generation with its line count and its
half line carried over.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.environ["SOURCE_ROOT"], "tests", "integration"))

from checks import check  # noqa: E402
from fd_holder import ByHand  # noqa: E402
from test_client import call, finish, instances, until  # noqa: E402

PYTHON = os.environ.get("PYTHON", "/usr/bin/python3")
CONNECTIONS = 600
HALF_EVERY = 10
WAIT = 60


def status(control):
    return call(control, "io.brokerd.Control.Status").get("parameters", {})


def service_counts(control):
    [svc] = [s for s in status(control).get("services", []) if s["name"] == "mix"]
    return svc.get("handoff", {})


def ready(control, generation):
    return [i for i in instances(status(control), "mix") if i["generation"] == generation and i["state"] == "ready"]


def answers(conns, text_for):
    """Sends each connection its text and reads one answer line from each."""
    for i, c in enumerate(conns):
        c.sendall(text_for(i))
    out = []
    for c in conns:
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                return out + ["<EOF>"]
            data += chunk
        out.append(data.decode().rstrip("\n"))
    return out


def upgrade(b, control, reports, generation, impl, conns):
    """Upgrades mix to generation with impl, and checks the handoff from the one before."""
    before = service_counts(control) or {"handed": 0, "received": 0, "returned": 0}
    [old] = ready(control, generation - 1)
    sender = old["pid"]
    r = subprocess.run([os.environ["BROKERCTL"], "--socket", control, "upgrade", "mix", "--env", "MIX_IMPL=" + impl],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "gen %d (%s): the upgrade succeeds (%s%s)" % (generation, impl, r.stdout, r.stderr))
    [new] = until(lambda: ready(control, generation), "gen %d ready" % generation, WAIT)
    receiver = new["pid"]
    channel = "instance mix/%d/0: direct handoff channel(s) to mix/%d/0" % (generation - 1, generation)
    check(channel in b.log(), "gen %d (%s): brokerd made a direct channel from gen %d (%s)"
          % (generation, impl, generation - 1, channel))
    path = os.path.join(reports, "report-%d.json" % sender)
    until(lambda: os.path.exists(path), "the sender's report", WAIT)
    with open(path) as f:
        report = json.load(f)
    check((report["handed"], report["landed"], report["returned"], report["pending"]) == (CONNECTIONS, CONNECTIONS, 0, 0),
          "gen %d: its sender says all %d landed (%r)" % (generation, CONNECTIONS, report))
    want = {k: before.get(k, 0) + n for k, n in (("handed", CONNECTIONS), ("received", CONNECTIONS), ("returned", 0))}
    counts = until(lambda: (lambda c: c if all(c.get(k) == v for k, v in want.items()) else None)(service_counts(control)),
                   "Status counts the handoff to gen %d" % generation, WAIT)
    check(True, "gen %d: Status counts %d more handed and received, none returned (%r)"
          % (generation, CONNECTIONS, counts))
    got = until(lambda: [i for i in instances(status(control), "mix") if i["pid"] == receiver
                         and json.loads(i.get("status") or "{}").get("received") == CONNECTIONS],
                "the receiver's own count", WAIT)
    check(len(got) == 1, "gen %d (%s): the receiver took all %d itself" % (generation, impl, CONNECTIONS))
    seq = generation
    said = answers(conns, lambda i: b"fway\n" if i % HALF_EVERY == 0 else b"again %d\n" % seq)
    want_lines = ["gen %d pid %d seq %d: %s" % (generation, receiver, seq, "halfway" if i % HALF_EVERY == 0
                                                else "again %d" % seq) for i in range(CONNECTIONS)]
    wrong = [(i, a) for i, (a, w) in enumerate(zip(said, want_lines)) if a != w]
    check(not wrong and len(said) == CONNECTIONS, "gen %d (%s): every connection served with its count and half line"
          " carried over (%d wrong, first %r)" % (generation, impl, len(wrong), wrong[:2]))
    for i, c in enumerate(conns):
        if i % HALF_EVERY == 0:
            c.sendall(b"hal")  # half a line again, for the next handoff


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="broker-mixed.")
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    reports = os.path.join(tmp, "reports")
    os.mkdir(reports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": os.path.join(os.environ["SOURCE_ROOT"], "client-lib", "python"),
           "HANDOFF_WORKER": os.environ["HANDOFF_WORKER"], "HT_REPORT_DIR": reports, "MIX_IMPL": "python"}
    with open(config, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {"mix": {"listen": "tcp://127.0.0.1:%d" % port, "backlog": 1024}},
                   "services": {"mix": {"exec": [PYTHON, os.path.join(HERE, "line_worker.py")], "sockets": ["mix"],
                                        "ready": "broker", "drain": {"timeout": "%ds" % WAIT}, "env": env}}}, f)
    b = ByHand(config, os.path.join(tmp, "brokerd.log"))
    conns = []
    try:
        b.wait_ready()
        until(lambda: ready(control, 1), "gen 1 ready", WAIT)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(CONNECTIONS)]
        [gen1] = ready(control, 1)
        said = answers(conns, lambda i: b"ping\n")
        check(said == ["gen 1 pid %d seq 1: ping" % gen1["pid"]] * CONNECTIONS, "gen 1 (python) answers all")
        for i, c in enumerate(conns):
            if i % HALF_EVERY == 0:
                c.sendall(b"hal")
        upgrade(b, control, reports, 2, "cpp", conns)     # broker_client hands to libbroker-client
        upgrade(b, control, reports, 3, "python", conns)  # and libbroker-client to broker_client
    except Exception as e:  # noqa: B902 - reported as a failure, with brokerd's log
        check(False, "%s: %s" % (type(e).__name__, e))
    finally:
        for c in conns:
            c.close()
        finish(b, tmp)


if __name__ == "__main__":
    main()
