#!/usr/bin/env python3
"""brokerd killed with SIGKILL and started again with the service manager's fd store, as systemd's
Restart=on-failure does: the workers outlive it and the new brokerd carries on with them.

The harness plays systemd (fdstore_harness.ServiceManager). Workers are the Python example, an
unmodified LISTEN_FDS/NOTIFY_SOCKET server. Each phase kills brokerd, checks that the workers
serve meanwhile, starts brokerd again and checks what it found: the same pids, the same stored
fds, the crash recorded in Status, and an upgrade that works afterwards.
"""
import collections
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

from checks import check, exits_within
from fdstore_harness import (free_port, http_get, main, pipes, served_by, sockets, socket_inode, starter,
                             varlink_status)

WORKER = os.environ["EXAMPLE_PYTHON"]
LIB_WORKER = os.environ["EXAMPLE_HTTP"]  # links libbroker-client: reconnects, hands off on drain


# A worker that says READY=1, and on SIGUSR1 a STATUS= naming it: a message it may send while
# brokerd is down, which the notify socket kept in the fd store holds for the next brokerd.
PROBE = """
import os, signal, socket
def notify(text):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.environ["NOTIFY_SOCKET"]
    s.sendto(text.encode(), "\\0" + path[1:] if path.startswith("@") else path)
signal.signal(signal.SIGUSR1, lambda *_: notify("STATUS=told while brokerd was down"))
notify("READY=1")
while True:
    signal.pause()
"""


# A worker that says READY=1 and ignores its drain signal: it drains until the drain deadline.
STUBBORN = """
import os, signal, socket
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
path = os.environ["NOTIFY_SOCKET"]
s.sendto(b"READY=1", "\\0" + path[1:] if path.startswith("@") else path)
while True:
    signal.pause()
"""
STUBBORN_DRAIN_S = 6


def write_config(path, control, port, lib_port, probe, stubborn=None):
    """With stubborn (a script path), also the socket extra and the service stubborn, as a reload adds them."""
    config = {"control": {"path": control},
              "sockets": {"http": {"listen": "tcp://127.0.0.1:%d" % port},
                          "lib": {"listen": "tcp://127.0.0.1:%d" % lib_port}},
              "services": {"web": {"exec": [WORKER], "sockets": ["http"], "instances": 2,
                                   "ready": "notify", "restart": "on-failure"},
                           "lib": {"exec": [LIB_WORKER], "sockets": ["lib"], "instances": 2,
                                   "ready": "broker"},
                           "probe": {"exec": [sys.executable, probe], "sockets": [], "instances": 1,
                                     "ready": "notify"}}}
    if stubborn:
        config["sockets"]["extra"] = {"listen": "tcp://127.0.0.1:0"}
        config["services"]["stubborn"] = {"exec": [sys.executable, stubborn], "sockets": ["extra"], "instances": 1,
                                          "ready": "notify", "drain": {"timeout": "%ds" % STUBBORN_DRAIN_S}}
    with open(path, "w") as f:
        json.dump(config, f)


def instances(params, service="web", key=None):
    """[(id, pid, state)] of the service's instances, from Status parameters; with key, that member."""
    for svc in params.get("services", []):
        if svc.get("name") == service:
            return [i.get(key) if key else (i["id"], i["pid"], i["state"])
                    for g in svc["generations"] for i in g["instances"]]
    return []


def pids_of(params):
    return sorted(p for _, p, s in instances(params) if s == "ready")


def until(b, predicate, timeout=20):
    """Polls predicate (which reads Status or brokerd's log: nothing to wait on) every 20 ms,
    serving the notify socket meanwhile, until it holds or the timeout passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        b.manager.drain()
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def run_brokerctl(b, brokerctl, control, *args):
    """brokerctl ARGS against this brokerd, serving the notify socket while it runs (systemd reads
    it all along; a queue left full would make brokerd drop what it sends): CompletedProcess."""
    p = subprocess.Popen([brokerctl, "--socket", control, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        b.manager.drain()
        select.select([b.manager.wakeup], [], [], 0.02)
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    b.manager.drain()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def keepalive_get(sock):
    """One request on an open keep-alive connection: (status, body), or (None, why)."""
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: crash-test\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, "closed by the server (%r)" % data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(m.group(1)) if m else 0
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return None, "closed mid-body"
            body += chunk
        status = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        return (int(status.group(1)) if status else None), body.decode(errors="replace")
    except OSError as e:
        return None, str(e)


def fd_kinds(pid):
    """brokerd's fds by kind ("socket", "pipe", "anon_inode:[timerfd]", a path...)."""
    kinds = collections.Counter()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("/"):
            target = "a log" if target.endswith(".log") else target  # each run has its own log
        kinds[re.sub(r":\[\d+\]$", "", target)] += 1
    return kinds


def served_by_one_of(port, pids, label):
    status, body = http_get(port)
    check(status == 200 and served_by(body, pids),
          "%s: port %d serves 200 from one of %s (%s %r)" % (label, port, pids, status, body.strip()))


def store_inodes(manager):
    return {n: socket_inode(fd) for n, fd in manager.store}


def run(tmp, manager, runs, strays):
    brokerctl = os.environ["BROKERCTL"]
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    port, lib_port = free_port(), free_port()
    while lib_port == port:
        lib_port = free_port()
    probe = os.path.join(tmp, "probe.py")
    with open(probe, "w") as f:
        f.write(PROBE)
    write_config(config, control, port, lib_port, probe)

    start = starter(tmp, config, control, manager, runs, strays)

    # 1. At rest: killed, and found again.
    b, params = start("first start")
    workers = pids_of(params)
    check(len(workers) == 2, "first start: 2 ready workers (%s)" % workers)
    check("recovered" not in params, "first start: Status says nothing of a crash")
    # A watch that runs across the crash: it says brokerd went away, then what the new one found.
    # It is streaming once it prints the events of a restart of probe.
    watch = subprocess.Popen([brokerctl, "--socket", control, "--json", "watch"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    watch_lines, pending = [], [b""]

    def watch_has(predicate, timeout=20):
        """Reads the watch's lines (unbuffered, so that select tells the truth) until one fits."""
        deadline = time.monotonic() + timeout
        while not any(predicate(e) for e in watch_lines):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([watch.stdout], [], [], left)[0]:
                return False
            chunk = os.read(watch.stdout.fileno(), 65536)
            if not chunk:
                return False
            *lines, pending[0] = (pending[0] + chunk).split(b"\n")
            watch_lines.extend(json.loads(line) for line in lines if line.strip())
        return True

    r = run_brokerctl(b, brokerctl, control, "restart", "probe")
    check(r.returncode == 0 and watch_has(lambda e: e.get("service") == "probe" and e.get("event") == "done"),
          "first start: a watch sees probe restarted (%d %s)" % (r.returncode, watch_lines))
    params, _ = varlink_status(control)
    fds_first = fd_kinds(b.pid)
    # The old probe's pipes leave the store once brokerd read them to their end.
    until(b, lambda: len(pipes(manager.names())) == 10)
    before = store_inodes(manager)
    check(sockets(before) == ["control", "http", "lib"] and "state" in before and "notify" in before and
          len(pipes(before)) == 10, "first start: the store holds the sockets, the state, notify and 10 pipes (%s; %s)" %
          (sorted(before), [e for e in manager.events if e[0] in ("STORE", "REMOVE", "HUP", "DUPLICATE")]))

    lib_workers = sorted(instances(params, "lib", "pid"))
    kept = socket.create_connection(("127.0.0.1", lib_port), timeout=10)
    status, body = keepalive_get(kept)
    check(status == 200 and served_by(body, lib_workers),
          "first start: a keep-alive connection to lib is served by its worker (%s %r)" % (status, body.strip()))


    crashed = b.pid
    b.kill()
    served_by_one_of(port, workers, "brokerd dead")
    served_by_one_of(lib_port, lib_workers, "brokerd dead (libbroker-client workers)")
    status, body = keepalive_get(kept)
    check(status == 200, "brokerd dead: the keep-alive connection to lib is still served (%s %r)" % (status, body.strip()))
    check(all(os.path.exists("/proc/%d" % p) for p in workers), "brokerd dead: both workers still run")
    os.kill(instances(params, "probe", "pid")[0], signal.SIGUSR1)

    seen = len(manager.events)
    b, params = start("after the crash")
    check(pids_of(params) == workers, "after the crash: the same two pids serve, ready (%s, was %s)" %
          (instances(params), workers))
    check(instances(params, "probe", "status") == ["told while brokerd was down"],
          "after the crash: a STATUS= sent while brokerd was down reached the new one (%s)" %
          instances(params, "probe", "status"))
    rec = params.get("recovered") or {}
    check(rec.get("crashed_pid") == crashed and rec.get("kept") == 5 and rec.get("lost") == [] and
          rec.get("interrupted") == [], "after the crash: Status says it carried on from pid %d with 5 kept (%s)" %
          (crashed, rec))
    log = b.log()
    check("carrying on after a crash of brokerd pid %d: 5 process(es) found again, 0 gone meanwhile" % crashed in log,
          "after the crash: the log says so")
    check(watch_has(lambda e: e.get("event") == "reconnected") and
          [e["event"] for e in watch_lines[-2:]] == ["disconnected", "reconnected"] and
          watch_lines[-1].get("recovered", {}).get("crashed_pid") == crashed and watch_lines[-1].get("pid") == b.pid,
          "after the crash: the watch said brokerd went away, then that pid %d carries on after pid %d (%s)" %
          (b.pid, crashed, watch_lines[-2:]))
    watch.send_signal(signal.SIGINT)
    check(watch.wait(timeout=10) == 0, "after the crash: the watch ends with 0 on SIGINT")
    after = store_inodes(manager)
    check(after == before, "after the crash: the store holds the very same fds, none replaced (%s)" % sorted(after))
    stored = [d for k, d in manager.events[seen:] if k in ("STORE", "REMOVE")]
    check(sockets(stored) == ["control"] or stored == [],
          "after the crash: nothing pushed or released but a control socket bound afresh (%s)" % stored)
    # sd-event makes some of its fds (a timerfd, a signalfd) only once it needs them. The Status
    # connection just closed may still be open on brokerd's side: waited for, with a deadline.
    deadline = time.monotonic() + 10
    while (more := fd_kinds(b.pid) - fds_first) and time.monotonic() < deadline:
        time.sleep(0.05)
    check(not more, "after the crash: brokerd holds no more fds of any kind than after its first start (more: %s)" %
          dict(more))
    served_by_one_of(port, workers, "after the crash")

    # The libbroker-client workers outlived brokerd too, and say Hello again with their tokens
    # (each prints a line when it does: it reaches brokerd through the kept pipe).
    check(sorted(instances(params, "lib", "pid")) == lib_workers and
          set(instances(params, "lib", "state")) == {"ready"},
          "after the crash: lib's same two workers are ready (%s)" % instances(params, "lib"))
    back = until(b, lambda: b.log().count("reconnected to the broker") == 2)
    check(back, "after the crash: both lib workers reconnected")
    r = run_brokerctl(b, brokerctl, control, "upgrade", "lib")
    check(r.returncode == 0, "after the crash: brokerctl upgrade lib exits 0 (%d: %s%s)" % (r.returncode, r.stdout, r.stderr))
    log = b.log()
    check(all("instance lib/1/%d: drain requested" % i in log for i in (0, 1)),
          "after the crash: the old lib workers were told to drain on their new Events stream, not signalled")
    params, _ = varlink_status(control)
    lib_new = sorted(instances(params or {}, "lib", "pid"))
    status, body = keepalive_get(kept)
    check(status == 200 and served_by(body, lib_new) and "gen 2" in body,
          "after the crash: the keep-alive connection opened before it was handed to gen 2 (%s %r)" %
          (status, body.strip()))
    kept.close()

    # An upgrade afterwards: the adopted workers drain and exit, their output still reaches brokerd.
    r = run_brokerctl(b, brokerctl, control, "upgrade", "web")
    check(r.returncode == 0, "after the crash: brokerctl upgrade web exits 0 (%d: %s%s)" % (r.returncode, r.stdout, r.stderr))
    check(all(exits_within(p, 30) for p in workers), "after the crash: the adopted workers exited after the upgrade")
    params, _ = varlink_status(control)
    new = pids_of(params or {})
    check(len(new) == 2 and not set(new) & set(workers), "after the crash: 2 new workers serve gen 2 (%s)" % new)
    check("web/1/0: broker-example-python: draining" in b.log(),
          "after the crash: an adopted worker's output reaches the new brokerd through the kept pipe")
    workers = new

    # 2. A worker dies while brokerd is down: restarted under its policy when brokerd is back.
    crashed = b.pid
    b.kill()
    victim_id, victim = next((i, p) for i, p, st in instances(params) if st == "ready")
    survivor = next(p for p in workers if p != victim)
    os.kill(victim, signal.SIGKILL)
    check(exits_within(victim, 10), "worker killed while brokerd is down: it is gone")
    b, params = start("after a worker died meanwhile")
    rec = params.get("recovered") or {}
    check(rec.get("kept") == 4 and rec.get("lost") == [victim_id],
          "worker died meanwhile: Status counts 4 kept and names %s lost (%s)" % (victim_id, rec))
    log = b.log()
    check("instance %s: pid %d has exited while brokerd was down" % (victim_id, victim) in log,
          "worker died meanwhile: the log says its process ended while brokerd was down")
    seen_ready = until(b, lambda: len(pids_of(varlink_status(control)[0] or {})) == 2)
    params, _ = varlink_status(control)
    now = pids_of(params or {})
    check(seen_ready and survivor in now and victim not in now,
          "worker died meanwhile: the survivor serves on, the slot restarted (%s)" % now)
    workers = now + instances(params, "probe", "pid")

    # 3. Killed while a new generation starts: its instance never got ready, so the upgrade ends
    # rolled back to the last complete generation, which serves on at full capacity.
    hang = os.path.join(tmp, "hang.py")
    with open(hang, "w") as f:
        f.write("import signal\nwhile True:\n    signal.pause()\n")
    r = run_brokerctl(b, brokerctl, control, "upgrade", "web", "--no-wait", "--start-timeout", "60s",
                        "--exec", "--", sys.executable, hang)
    check(r.returncode == 0, "mid-upgrade: the upgrade to a never-ready exec began (%d: %s%s)" %
          (r.returncode, r.stdout, r.stderr))

    def starting():
        p = varlink_status(control)[0] or {}
        return [pid for _, pid, st in instances(p) if st == "starting" and pid > 0]
    check(until(b, lambda: starting() != []), "mid-upgrade: the new instance started")
    new_pid = starting()[0]
    serving = pids_of(varlink_status(control)[0] or {})
    crashed = b.pid
    b.kill()
    b, params = start("after a crash mid-upgrade")
    rec = params.get("recovered") or {}
    check(rec.get("interrupted") == ["web: an upgrade the crash interrupted: rolled back to gen 2"],
          "mid-upgrade: Status says the interrupted upgrade rolled back (%s)" % rec)
    check(exits_within(new_pid, 20), "mid-upgrade: the new generation's instance was drained and exited")
    until(b, lambda: [g["number"] for svc in (varlink_status(control)[0] or {}).get("services", [])
                      if svc["name"] == "web" for g in svc["generations"]] == [2])
    params, _ = varlink_status(control)
    check(pids_of(params) == serving, "mid-upgrade: gen 2's same workers serve at full capacity (%s, were %s)" %
          (instances(params), serving))
    r = run_brokerctl(b, brokerctl, control, "upgrade", "web")
    check(r.returncode == 0, "mid-upgrade: an upgrade afterwards works (%d: %s%s)" % (r.returncode, r.stdout, r.stderr))
    params, _ = varlink_status(control)

    # 4. Killed right after a reload returned: the new brokerd runs the reloaded config, with
    # the socket the reload bound kept in the store.
    stubborn = os.path.join(tmp, "stubborn.py")
    with open(stubborn, "w") as f:
        f.write(STUBBORN)
    write_config(config, control, port, lib_port, probe, stubborn)
    r = run_brokerctl(b, brokerctl, control, "reload")
    check(r.returncode == 0, "mid-reload: brokerctl reload exits 0 (%d: %s%s)" % (r.returncode, r.stdout, r.stderr))
    b.kill()
    manager.drain()  # what brokerd sent before it died, as systemd would have read it
    extra_ino = socket_inode(manager.fd("extra")) if manager.fd("extra") is not None else None
    check(extra_ino is not None, "mid-reload: the reload's new socket is in the store (%s)" % manager.names())
    b, params = start("after a crash right after a reload")
    check(until(b, lambda: instances(varlink_status(control)[0] or {}, "stubborn", "state") == ["ready"]),
          "mid-reload: the reloaded config's new service runs (%s)" %
          instances(varlink_status(control)[0] or {}, "stubborn"))
    params, _ = varlink_status(control)
    origin = [s.get("origin") for s in (params or {}).get("sockets", []) if s.get("name") == "extra"]
    check(origin == ["fdstore"] and socket_inode(manager.fd("extra")) == extra_ino,
          "mid-reload: its socket is the one the reload bound, kept by the store (%s)" % origin)

    # 5. Killed while an instance drains: the new brokerd keeps the drain's deadline, not a new one.
    stubborn_pid = instances(params, "stubborn", "pid")[0]
    stopping = subprocess.Popen([brokerctl, "--socket", control, "stop", "stubborn"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check(until(b, lambda: instances(varlink_status(control)[0] or {}, "stubborn", "state") == ["draining"]),
          "mid-drain: the stubborn instance drains")
    drain_began = time.monotonic()
    b.kill()
    stopping.wait(timeout=10)
    # Down for half the drain: a brokerd that started the drain timeout afresh would kill the
    # instance half a drain timeout late.
    time.sleep(STUBBORN_DRAIN_S / 2)
    b, params = start("after a crash mid-drain")
    check(instances(params, "stubborn") == [("stubborn/1/0", stubborn_pid, "draining")],
          "mid-drain: the instance is still draining, the same pid (%s)" % instances(params, "stubborn"))
    left = drain_began + STUBBORN_DRAIN_S + 2 - time.monotonic()
    check(exits_within(stubborn_pid, max(left, 0)),
          "mid-drain: it was killed at the first brokerd's drain deadline (%d s after the drain began, 2 s slack)" %
          STUBBORN_DRAIN_S)
    params, _ = varlink_status(control)

    # 5b. An instance that was draining and ends while brokerd is down did what it was asked:
    # named drained, not lost, and not restarted.
    r = run_brokerctl(b, brokerctl, control, "start", "stubborn")
    check(r.returncode == 0, "drained meanwhile: brokerctl start stubborn exits 0 (%d: %s%s)" %
          (r.returncode, r.stdout, r.stderr))
    params, _ = varlink_status(control)
    [(drained_id, drained_pid, _)] = instances(params, "stubborn")
    stopping = subprocess.Popen([brokerctl, "--socket", control, "stop", "stubborn"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check(until(b, lambda: instances(varlink_status(control)[0] or {}, "stubborn", "state") == ["draining"]),
          "drained meanwhile: the stubborn instance drains")
    crashed = b.pid
    b.kill()
    stopping.wait(timeout=10)
    os.kill(drained_pid, signal.SIGKILL)
    check(exits_within(drained_pid, 10), "drained meanwhile: it ended while brokerd was down")
    b, params = start("after a draining instance ended meanwhile")
    rec = params.get("recovered") or {}
    check(rec.get("crashed_pid") == crashed and rec.get("lost") == [] and rec.get("drained") == [drained_id],
          "drained meanwhile: Status names %s drained, nothing lost (%s)" % (drained_id, rec))
    check(instances(params, "stubborn") == [], "drained meanwhile: it is not restarted (%s)" %
          instances(params, "stubborn"))
    params, _ = varlink_status(control)

    # 6. A clean stop of a brokerd that carried on after crashes: its workers go, and so does the
    # control socket's file, which the first brokerd bound; the next start begins afresh.
    strays.note(b.pid)
    rc = b.stop()
    check(rc == 0 and not os.path.exists(control),
          "clean stop after crashes: exit 0 (%r), the control socket file is gone" % rc)
    strays.check("clean stop after crashes")
    b, params = start("started again after a clean stop")
    check("recovered" not in params and "the brokerd before stopped cleanly; starting afresh" in b.log(),
          "started again after a clean stop: afresh, as the last state said")

    # 7. A state that cannot be read is refused: brokerd starts clean and kills nothing.
    workers = pids_of(params) + instances(params, "probe", "pid") + instances(params, "stubborn", "pid")
    lib_workers = instances(params, "lib", "pid")
    b.kill()
    state_fd = manager.fd("state")
    os.pwrite(state_fd, b"garbage!" * 8, 0)
    os.pwrite(state_fd, b"garbage!" * 8, 8 << 20)
    b, params = start("after a corrupt state")
    log = b.log()
    check("crash state refused:" in log and "starting clean" in log, "corrupt state: refused, with why, in the log")
    check(all(os.path.exists("/proc/%d" % p) for p in workers), "corrupt state: the old workers were not killed")
    check(len(pids_of(params)) == 2 and not set(pids_of(params) + instances(params, "probe", "pid")) & set(workers),
          "corrupt state: brokerd started its own 2 workers (%s)" % pids_of(params))
    check("recovered" not in params, "corrupt state: Status says nothing was recovered")
    # The old ones are nobody's now: the test ends them, as the operator would. (The lib ones
    # may be on their way out already: the new brokerd refuses their tokens, and they drain.)
    for p in workers + lib_workers:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            continue
        exits_within(p, 10)

    # 8. The brokerd that started clean keeps a state of its own: killed in turn, it is followed
    # by one that carries on with its workers (web 2, lib 2, probe 1, stubborn 1).
    crashed = b.pid
    b.kill()
    b, params = start("after the clean start's brokerd crashed")
    rec = params.get("recovered") or {}
    check(rec.get("crashed_pid") == crashed and rec.get("kept") == 6 and rec.get("lost") == [],
          "after a crash of the brokerd that refused the state: carried on from it with 6 kept (%s)" % rec)

    # 9. A clean stop after all that: nothing left, no pipe in the store, the state says stopped.
    strays.note(b.pid)
    rc = b.stop()
    check(rc == 0, "last stop: brokerd exits 0 (%r)" % rc)
    check(pipes(manager.names()) == [], "last stop: no output pipe left in the store (%s)" % manager.names())
    strays.check("last stop")
    check(not manager.errors, "every notify message was well-formed (%s)" % manager.errors)


if __name__ == "__main__":
    sys.exit(main(run, prefix="brokerd-crash."))
