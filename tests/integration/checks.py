"""What the Python integration tests share: numbered checks, and the processes a run left below it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Every check() so far, by outcome; a script ends non-zero when failures is not empty.
failures = []
passes = []


def check(cond, what):
    print(("ok     " if cond else "FAILED ") + what, flush=True)
    (passes if cond else failures).append(what)
    return cond


def descendants(root):
    """Pids below root, from /proc, so that nothing outlives a failed run."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    stat = f.read()
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def wait_ready(notify, proc, deadline):
    """Waits for READY=1 on the notify socket (a bound AF_UNIX datagram socket) from proc."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("brokerd sent no READY=1")
        if proc.poll() is not None:
            raise RuntimeError("brokerd exited with %s before READY=1" % proc.returncode)
        notify.settimeout(min(left, 0.5))
        try:
            data = notify.recv(4096)
        except socket.timeout:
            continue  # re-check that brokerd is alive
        if b"READY=1" in data.split(b"\n"):
            return


def run_with_brokerd(prefix, body):
    """Starts brokerd ($BROKERD) with one service, web, of the Python example worker
    ($EXAMPLE_PYTHON) on a loopback port, as systemd would (a NOTIFY_SOCKET of our own, waited on
    for READY=1), and calls body(control socket path). Then stops brokerd with SIGTERM and checks
    it exits 0; kills whatever is left if not. Prints brokerd's log when a check failed, and the
    closing "N passed, N failed" line. Returns the exit code for the script."""
    brokerd = os.environ["BROKERD"]
    worker = os.environ["EXAMPLE_PYTHON"]
    tmp = tempfile.mkdtemp(prefix=prefix)
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    with open(config, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {"http": {"listen": "tcp://127.0.0.1:0"}},
                   "services": {"web": {"exec": [sys.executable, worker], "sockets": ["http"],
                                        "instances": 1, "ready": "notify"}}}, f)

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = "%s%d" % (prefix, os.getpid())
    notify.bind("\0" + name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "BROKER_SOCKET"))}
    env["NOTIFY_SOCKET"] = "@" + name
    log = open(os.path.join(tmp, "brokerd.log"), "w+")
    proc = subprocess.Popen([brokerd, "--config", config], env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)
    try:
        wait_ready(notify, proc, time.monotonic() + 20)
        body(control)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            rc = None
        check(rc == 0, "brokerd exits 0 on SIGTERM (got %r)" % rc)
    except Exception as e:  # report, with brokerd's log, rather than a bare traceback
        failures.append("%s: %s" % (type(e).__name__, e))
        print("FAILED %s: %s" % (type(e).__name__, e), flush=True)
    finally:
        if proc.poll() is None:
            stray = descendants(proc.pid)
            proc.kill()
            proc.wait()
            for pid in stray:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if failures:
            log.seek(0)
            print("--- brokerd stderr:\n" + log.read(), flush=True)
        log.close()
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print("%d passed, %d failed" % (len(passes), len(failures)))
    return 1 if failures else 0
