#!/usr/bin/env python3
"""The stop sentinel: with KillMode=process the unit keeps its workers across a crash of brokerd,
and a stop that brokerd cannot drain still leaves none behind.

The harness plays systemd (fdstore_harness.ServiceManager): a SIGKILL of brokerd, then a start
with the store, is Restart=on-failure; manager.clear() after a SIGKILL is the service manager
releasing the store when the unit stops while brokerd is dead or hung (systemctl stop in the
auto-restart window, the start limit hit, brokerd killed at TimeoutStopSec). What this cannot
show: that systemd releases the store exactly then, and signals only the main process with
KillMode=process; that takes systemd as PID 1.
"""
import json
import os
import signal
import subprocess
import sys
import time

from checks import check, dying, exits_within, proc_stat
from fdstore_harness import free_port, main, sentinels, socket_inode, starter, varlink_status

WORKER = os.environ["EXAMPLE_PYTHON"]
WAIT = 20  # seconds, for any one event


def write_config(path, control, port):
    with open(path, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {"http": {"listen": "tcp://127.0.0.1:%d" % port}},
                   "services": {"web": {"exec": [WORKER], "sockets": ["http"], "instances": 2,
                                        "ready": "notify", "restart": "on-failure"}}}, f)


def ready_pids(params):
    return sorted(i["pid"] for svc in params.get("services", []) if svc.get("name") == "web"
                  for g in svc["generations"] for i in g["instances"] if i["state"] == "ready")


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[2] not in "ZXx"


def sentinel_inode(manager):
    fd = manager.fd("sentinel")
    return socket_inode(fd) if fd is not None else None


def run(tmp, manager, runs, strays):
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    write_config(config, control, free_port())

    start = starter(tmp, config, control, manager, runs, strays)

    # (a) A crash and a restart with the store: the same sentinel watches over the same workers.
    b, params = start("first start")
    workers = ready_pids(params)
    check(len(workers) == 2, "first start: 2 ready workers (%s)" % workers)
    found = sentinels()
    check(len(found) == 1, "first start: one sentinel runs (%s)" % found)
    sentinel = found[0] if found else 0
    st = proc_stat(sentinel) if sentinel else None
    check(st is not None and st[0] == b.pid, "first start: the sentinel is brokerd's child (%s)" % (st,))
    check(st is not None and st[1] == sentinel and os.getpgid(sentinel) == sentinel,
          "first start: the sentinel leads a session and a process group of its own (%s)" % (st,))
    check(sentinel not in ready_pids(params), "first start: the sentinel is no instance")
    stored = sentinel_inode(manager)
    check(stored is not None and manager.names().count("sentinel") == 1,
          "first start: the store holds one sentinel pipe (%s)" % manager.names())

    b.kill()
    check(alive(sentinel) and all(alive(p) for p in workers),
          "brokerd killed: the sentinel and both workers still run")
    b, params = start("after the crash")
    check(ready_pids(params) == workers, "after the crash: the same workers are ready (%s, were %s)" %
          (ready_pids(params), workers))
    check(sentinels() == [sentinel], "after the crash: the same sentinel is the only one (%s, was %d)" %
          (sentinels(), sentinel))
    check(manager.names().count("sentinel") == 1 and sentinel_inode(manager) == stored,
          "after the crash: the store holds the same sentinel pipe, and only it (%s)" % manager.names())

    # (c) A clean stop of a brokerd whose sentinel it did not start: drained, the sentinel goes.
    strays.note(b.pid)
    rc = b.stop()
    check(rc == 0, "clean stop: brokerd exits 0 (%r)" % rc)
    check(dying(sentinel) and exits_within(sentinel, WAIT), "clean stop: the sentinel was on its way out before brokerd exited")
    check(all(not alive(p) for p in workers), "clean stop: the workers are gone")
    check("sentinel" not in manager.names(), "clean stop: the store holds no sentinel pipe (%s)" % manager.names())
    strays.check("clean stop")

    # (d) The sentinel killed while brokerd runs: brokerd starts another, and stores its pipe alone.
    b, params = start("fresh start")
    workers = ready_pids(params)
    found = sentinels()
    check(len(found) == 1 and sentinel not in found, "fresh start: one new sentinel runs (%s)" % found)
    victim = found[0] if found else 0
    stored = sentinel_inode(manager)
    seen = len(manager.events)
    if victim:
        os.kill(victim, signal.SIGKILL)

    def replaced():
        now = sentinels()
        return (len(now) == 1 and victim not in now and manager.names().count("sentinel") == 1 and
                sentinel_inode(manager) not in (None, stored))
    check(b.wait_for("sign of a new sentinel", replaced, time.monotonic() + WAIT),
          "sentinel killed: brokerd started another (%s) and stored its pipe alone (%s)" % (sentinels(), manager.names()))
    b.wait_for("reaping of the killed sentinel", lambda: proc_stat(victim) is None, time.monotonic() + WAIT)
    check(proc_stat(victim) is None, "sentinel killed: brokerd reaped it")
    check(("STORE", "sentinel") in manager.events[seen:], "sentinel killed: the new pipe went into the store")
    check("sentinel: it is gone" in b.log(), "sentinel killed: the log says so")
    sentinel = sentinels()[0]
    params, _ = varlink_status(control)
    check(ready_pids(params or {}) == workers, "sentinel killed: the workers serve on (%s)" % ready_pids(params or {}))

    # brokerctl reexec: the same process carries on, with the same sentinel and its pipe.
    stored = sentinel_inode(manager)
    r = subprocess.run([os.environ["BROKERCTL"], "--socket", control, "reexec"], capture_output=True, text=True,
                       timeout=60)
    check(r.returncode == 0, "reexec: brokerctl reexec exits 0 (%d: %s%s)" % (r.returncode, r.stdout, r.stderr))
    manager.drain()
    check(sentinels() == [sentinel] and proc_stat(sentinel)[0] == b.pid,
          "reexec: the same sentinel runs on, brokerd's child still (%s, was %d)" % (sentinels(), sentinel))
    check(manager.names().count("sentinel") == 1 and sentinel_inode(manager) == stored,
          "reexec: the store holds the same sentinel pipe, and only it (%s)" % manager.names())

    # (b) brokerd killed, and the store released: the unit stopped while no brokerd could drain it.
    # A process of the test with the workers' command line, in a session of its own, is left alone.
    decoy = subprocess.Popen([sys.executable, "-c", "import signal\nwhile True: signal.pause()", WORKER],
                             start_new_session=True)
    strays.note(b.pid)
    b.kill()
    check(alive(sentinel) and all(alive(p) for p in workers), "stop while dead: brokerd killed, the rest still runs")
    released = time.monotonic()
    manager.clear()
    check(all(exits_within(p, WAIT) for p in workers), "stop while dead: the workers are ended once the store is released")
    print("note   stop while dead: the workers were gone %.1f ms after the store was released" %
          ((time.monotonic() - released) * 1000), flush=True)
    check(exits_within(sentinel, WAIT), "stop while dead: the sentinel exits after that")
    check(decoy.poll() is None and alive(decoy.pid), "stop while dead: a process it did not start is left alone")
    log = runs[-1][1].log()
    check("sentinel: brokerd is gone and its unit stopped: killed 2 process(es)" in log,
          "stop while dead: the sentinel logged what it ended (in the log of the brokerd that started it)")
    decoy.kill()
    decoy.wait()
    strays.check("stop while dead")
    check(not manager.errors, "every notify message was well-formed (%s)" % manager.errors)


if __name__ == "__main__":
    sys.exit(main(run, prefix="brokerd-sentinel."))
