#!/usr/bin/env python3
"""broker_client against a real brokerd, with echo_worker.py as the worker, once on a selectors
loop (service "sel") and once on asyncio (service "aio"):

1. Hello, Events, Ready and Status: the instance is ready in Status with the worker's text, and the
   worker runs one thread and writes nothing to stdout or stderr.
2. An upgrade hands the worker's connections, with state (a half-read line), to generation 2,
   which finishes the line; the old one hears they landed and exits; its drain deadline is the
   configured one.
3. A generation that refuses handed connections (REFUSE=1): they come back to the sender
   (on_returned), with their state, and it serves them on.
4. brokerd killed with SIGKILL while a batch is in flight (the receiver stopped itself inside
   on_connection, before acknowledging): started again by hand (its fd holder). On brokerd's path
   the sender's Resume says the batch is in doubt, the receiver's says what it got, and the new
   brokerd settles it as landed; on a direct channel the crash does not touch it: the receiver
   acknowledges there, and nothing is in doubt.

Run twice (meson.build): with the services' "handoff" "direct" (the default, the workers' own
channels) and with HANDOFF_PATH=broker ("handoff": "broker", brokerd's path).
"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.environ["SOURCE_ROOT"], "tests", "integration"))

from checks import check, failures, passes, proc_stat  # noqa: E402
from fd_holder import ByHand  # noqa: E402

PYTHON = os.environ.get("PYTHON", "/usr/bin/python3")
WAIT = 30  # seconds, for any one event
DRAIN_S = 20
HANDOFF_PATH = os.environ.get("HANDOFF_PATH") or "direct"


def until(predicate, what, timeout=WAIT):
    """Polls predicate (Status, a report file: nothing to wait on) until it holds, or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("not within %ss: %s" % (timeout, what))
        time.sleep(0.02)


LOGS = []  # each brokerd's log, in order of the starts
RUNNING = {"brokerd": None, "stopped": []}  # what the end of the test stops, whatever failed


def start_brokerd(config, log_path):
    """brokerd as an operator starts it (no service manager, its fd holder), ready once it logs so."""
    LOGS.append("%s.%d" % (log_path, len(LOGS) + 1))
    b = RUNNING["brokerd"] = ByHand(config, LOGS[-1])
    b.wait_ready()
    return b


def call(control, method, params=None):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(control)
        s.sendall(json.dumps({"method": method, "parameters": params or {}}).encode() + b"\0")
        buf = b""
        while b"\0" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("brokerd closed the connection")
            buf += chunk
    return json.loads(buf.split(b"\0", 1)[0])


def status(control):
    try:
        return call(control, "io.brokerd.Control.Status").get("parameters", {})
    except OSError:
        return {}


def instances(params, service):
    return [dict(i, generation=g["number"]) for s in params.get("services", []) if s["name"] == service
            for g in s["generations"] for i in g["instances"]]


def ready_in(control, service, generation):
    return [i for i in instances(status(control), service) if i["generation"] == generation and i["state"] == "ready"]


def reports(folder, pid):
    try:
        with open(os.path.join(folder, "%d.jsonl" % pid)) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def events(folder, pid, name):
    return [r for r in reports(folder, pid) if r["event"] == name]


def brokerctl(control, *args):
    return subprocess.run([os.environ["BROKERCTL"], "--socket", control, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return s


def line(sock):
    """One answer line, read to its newline."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode() + "<EOF>"
        data += chunk
    return data.decode().rstrip("\n")


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[2] not in "ZXx"


def scenario(tmp, control, service, port):
    """Steps 1 to 3 on one service; returns the generation-2 pid that serves on, for step 4."""
    print("--- %s" % service, flush=True)
    [gen1] = until(lambda: ready_in(control, service, 1), "%s gen 1 ready" % service)
    p1 = gen1["pid"]
    check(gen1.get("status") == "echoing as gen 1 pid %d" % p1, "%s: Status shows the worker's text (%r)"
          % (service, gen1.get("status")))
    [hello] = until(lambda: events(tmp, p1, "hello"), "hello report")
    check(hello["service"] == service and hello["instance"] == "%s/1/0" % service and hello["generation"] == 1,
          "%s: Hello's reply names the instance (%r)" % (service, hello))

    c1, c2, c3 = connect(port), connect(port), connect(port)
    c1.sendall(b"one\n")
    check(line(c1) == "gen 1 pid %d: one" % p1, "%s: gen 1 answers" % service)
    c2.sendall(b"half")
    until(lambda: len(events(tmp, p1, "accepted")) == 3, "three connections accepted")
    until(lambda: any(r["data"] == "half" for r in events(tmp, p1, "read")), "the half line read by gen 1")

    r = brokerctl(control, "upgrade", service)
    check(r.returncode == 0, "%s: upgrade to gen 2 succeeds (%s%s)" % (service, r.stdout, r.stderr))
    [gen2] = until(lambda: ready_in(control, service, 2), "%s gen 2 ready" % service)
    p2 = gen2["pid"]
    got = until(lambda: len(events(tmp, p2, "connection")) == 3 and events(tmp, p2, "connection"), "3 handed in")
    check(sorted(g["state"] for g in got) == ["", "", "half"],
          "%s: gen 2 received the 3 connections with their state (%r)" % (service, [g["state"] for g in got]))
    [done] = until(lambda: events(tmp, p1, "handoff_done"), "gen 1 handoff done")
    check((done["handed"], done["landed"], done["returned"], done["abandoned"]) == (3, 3, 0, 0),
          "%s: gen 1 hears all 3 landed (%r)" % (service, done))
    [refused] = events(tmp, p1, "refused")
    check({k: refused.get(k) for k in ("closed", "twice", "own", "pending")} ==
          {"closed": errno.EBADF, "twice": errno.EINVAL, "own": errno.EINVAL, "pending": 0},
          "%s: handoff() takes nothing, with EBADF for a closed fd and EINVAL for one fd twice or the"
          " library's own (%r)" % (service, refused))
    [again] = events(tmp, p1, "refused_again")
    check(again["again"] == errno.EINVAL and again["pending"] == 3,
          "%s: handoff() refuses an fd handed off already and not settled (%r)" % (service, again))
    drain = events(tmp, p1, "drain")[0]
    check(0 < drain["remaining"] <= DRAIN_S, "%s: the drain deadline is within the configured %ds (%.3fs)"
          % (service, DRAIN_S, drain["remaining"]))
    until(lambda: not alive(p1), "gen 1 exits")
    channel = "instance %s/1/0: direct handoff channel(s) to %s/2/0" % (service, service)
    check((channel in RUNNING["brokerd"].log()) == (HANDOFF_PATH == "direct"),
          "%s: the connections went %s" % (service, "on a direct channel" if HANDOFF_PATH == "direct"
                                           else "brokerd's way"))
    c2.sendall(b"way\n")
    check(line(c2) == "gen 2 pid %d: halfway" % p2, "%s: gen 2 finishes the half-read line" % service)
    c1.sendall(b"two\n")
    check(line(c1) == "gen 2 pid %d: two" % p2, "%s: gen 2 serves a handed connection" % service)

    # 3: gen 3 refuses what it is handed; gen 2 gets its connections back and serves on.
    c3.sendall(b"par")
    until(lambda: any(r["data"] == "par" for r in events(tmp, p2, "read")), "the partial line read by gen 2")
    r = brokerctl(control, "upgrade", service, "--env", "REFUSE=1", "--no-wait")
    check(r.returncode == 0, "%s: upgrade to gen 3 (refusing) starts (%s%s)" % (service, r.stdout, r.stderr))
    [done] = until(lambda: events(tmp, p2, "handoff_done"), "gen 2 handoff done")
    check((done["handed"], done["landed"], done["returned"]) == (3, 0, 3),
          "%s: all 3 come back to gen 2 (%r)" % (service, done))
    back = events(tmp, p2, "returned")
    check(len(back) == 3, "%s: on_returned ran for each" % service)
    [gen3] = ready_in(control, service, 3)
    check(events(tmp, gen3["pid"], "connection") == [], "%s: gen 3 took none" % service)
    c3.sendall(b"tial\n")
    check(line(c3) == "gen 2 pid %d: partial" % p2, "%s: gen 2 serves a returned connection on, state kept" % service)
    for c in (c1, c2, c3):
        c.close()
    until(lambda: not alive(p2), "gen 2 exits once its returned connections are closed")
    return gen3["pid"]


def resume_after_crash(b, config, log_path, tmp, control, service, port, bystanders):
    """Step 4: a batch in flight when brokerd dies is settled by the Resume calls of both sides."""
    print("--- %s: brokerd killed with a batch in flight" % service, flush=True)
    [old] = until(lambda: [i for i in instances(status(control), service) if i["state"] == "ready"], "ready")
    sender = old["pid"]
    conns = [connect(port) for _ in range(3)]
    for i, c in enumerate(conns):
        c.sendall(b"c%d\n" % i)
        check(line(c) == "gen %d pid %d: c%d" % (old["generation"], sender, i), "%s: served before" % service)
    r = brokerctl(control, "upgrade", service, "--env", "STOP_ON_CONNECTION=1", "--env", "REFUSE=0", "--no-wait")
    check(r.returncode == 0, "%s: upgrade with a receiver that stops itself (%s%s)" % (service, r.stdout, r.stderr))
    receiver = until(lambda: [p for p in (int(n.split(".")[0]) for n in os.listdir(tmp) if n.endswith(".jsonl"))
                              if events(tmp, p, "stopping")], "the receiver stops in on_connection")[0]
    RUNNING["stopped"].append(receiver)
    until(lambda: (proc_stat(receiver) or (0, 0, "?"))[2] == "T", "receiver stopped")
    b.kill()
    b = start_brokerd(config, log_path)
    os.kill(receiver, signal.SIGCONT)
    [done] = until(lambda: events(tmp, sender, "handoff_done"), "the sender hears how the batch in doubt went")
    check((done["landed"], done["returned"], done["abandoned"]) == (3, 0, 0),
          "%s: Resume settles the batch as landed (%r)" % (service, done))
    until(lambda: [r for r in reports(tmp, receiver) if r["event"] == "link" and r["link"] == "connected"],
          "the receiver reconnects")
    links = [r["link"] for r in reports(tmp, receiver) if r["event"] == "link"]
    check(links[:2] == ["lost", "connected"], "%s: the receiver lost brokerd and was taken back (%r)" % (service, links))
    polled = [r["fileno"] for r in reports(tmp, receiver) if r["event"] in ("hello", "link")][:3]
    if HANDOFF_PATH == "direct":
        check(polled[0] >= 0 and polled == [polled[0]] * 3,
              "%s: fileno() is one epoll fd across the loss and the reconnect (%r)" % (service, polled))
    else:
        check(polled[1] == -1 and polled[2] not in (-1, polled[0]),
              "%s: fileno() is the connection, none while lost, a new number after (%r)" % (service, polled))
    for other, name in bystanders:
        until(lambda: [r for r in reports(tmp, other) if r["event"] == "link" and r["link"] == "connected"],
              "%s reconnects" % name)
        check([r["link"] for r in reports(tmp, other) if r["event"] == "link"] == ["lost", "connected"],
              "%s: a worker on the other loop finds the new brokerd too" % name)
        [inst] = until(lambda: [i for i in instances(status(control), name) if i["pid"] == other and i["state"] == "ready"],
                       "%s ready again" % name)
        check(inst.get("status") == "echoing as gen %d pid %d" % (inst["generation"], other),
              "%s: Ready and Status said again after the reconnect (%r)" % (name, inst.get("status")))
    recovered = until(lambda: status(control).get("recovered"), "recovered in Status")
    doubt = recovered.get("in_doubt", {})
    if HANDOFF_PATH == "direct":
        check((doubt.get("batches"), doubt.get("connections")) == (0, 0),
              "%s: a crash leaves nothing of a direct channel in doubt (%r)" % (service, doubt))
    else:
        check((doubt.get("batches"), doubt.get("connections"), doubt.get("landed"), doubt.get("abandoned"))
              == (1, 3, 3, 0), "%s: Status.recovered.in_doubt counts the batch as landed (%r)" % (service, doubt))
    [inst] = until(lambda: [i for i in instances(status(control), service) if i["pid"] == receiver and i["state"] == "ready"],
                   "the receiver ready again")
    check(inst.get("status") == "echoing as gen %d pid %d" % (inst["generation"], receiver),
          "%s: Ready and Status said again after the reconnect (%r)" % (service, inst.get("status")))
    for i, c in enumerate(conns):
        c.sendall(b"after%d\n" % i)
        check(line(c) == "gen %d pid %d: after%d" % (inst["generation"], receiver, i), "%s: served after" % service)
        c.close()
    return b


def main():
    tmp = tempfile.mkdtemp(prefix="broker-python.")
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    log_path = os.path.join(tmp, "brokerd.log")
    worker = os.path.join(HERE, "echo_worker.py")
    lib = os.path.join(os.environ["SOURCE_ROOT"], "client-lib", "python")
    ports = {}
    for name in ("sel", "aio"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    services = {name: {"exec": [PYTHON, worker, "selectors" if name == "sel" else "asyncio"], "sockets": [name],
                       "ready": "broker", "drain": {"timeout": "%ds" % DRAIN_S}, "handoff": HANDOFF_PATH,
                       "env": {"PYTHONPATH": lib, "REPORT": tmp}} for name in ports}
    with open(config, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {n: {"listen": "tcp://127.0.0.1:%d" % p} for n, p in ports.items()},
                   "services": services}, f)
    b = start_brokerd(config, log_path)
    try:
        serving = {name: scenario(tmp, control, name, port) for name, port in ports.items()}
        b = resume_after_crash(b, config, log_path, tmp, control, "sel", ports["sel"], [(serving["aio"], "aio")])
        everything = [r for n in os.listdir(tmp) if n.endswith(".jsonl") for r in reports(tmp, int(n.split(".")[0]))]
        check(all(r["threads"] == 1 for r in everything), "every worker ran one thread (%d reports)" % len(everything))
        # brokerd logs its workers' output as "INSTANCE: line".
        worker_output = [ln for path in LOGS for ln in open(path, errors="replace").read().splitlines()
                         if re.match(r"(sel|aio)/\d+/\d+: ", ln)]
        check(worker_output == [], "no worker wrote to stdout or stderr (%r)" % worker_output[:5])
    except Exception as e:  # noqa: B902 - reported as a failure, with brokerd's log
        check(False, "%s: %s" % (type(e).__name__, e))
        for n in sorted(os.listdir(tmp)):
            if n.endswith(".jsonl"):
                print("--- %s:\n%s" % (n, open(os.path.join(tmp, n)).read()[-1500:]))
    finally:
        for pid in RUNNING["stopped"]:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        finish(RUNNING["brokerd"], tmp)


def finish(b, tmp):
    """Stops brokerd b; prints its log after a failure, else removes tmp; exits with the outcome."""
    if b.stop() is None:
        b.kill()
    if failures:
        print("--- brokerd's log:\n" + b.log()[-6000:])
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (len(passes), len(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
