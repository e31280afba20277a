#!/usr/bin/env python3
"""brokerd started by hand, without a service manager: its fd holder (`brokerd --fd-holder`)
keeps what systemd's fd store would, so that a brokerd killed with SIGKILL and started again by
hand with the same config carries on with the same workers, as one that systemd restarts does.

No NOTIFY_SOCKET and no LISTEN_FDS here: brokerd finds the holder at <control.path>.fdstore, or
starts one. Workers are the Python example (an unmodified LISTEN_FDS server) and the C++ one
(libbroker-client, which reconnects). The cases: (a) a crash and a start by hand; (b) the holder
killed while brokerd runs; (c) a clean stop leaves nothing; (d) a stale or a foreign socket file at
the holder's path; (e) another user can neither store into nor fetch from the holder.
"""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from checks import check, exits_within, proc_stat
from crash_restart import fd_kinds
from fdstore_harness import (Brokerd, free_port, holder_fetch, holders, http_connect_and_send, http_get, http_read, main, pipes,
                             process_socket_inodes, sentinels, served_by, varlink_status)

WORKER = os.environ["EXAMPLE_PYTHON"]
LIB_WORKER = os.environ["EXAMPLE_HTTP"]
WAIT = 20  # seconds, for any one event
NOBODY = 65534


class ByHand:
    """One brokerd started as an operator starts it: no NOTIFY_SOCKET, no LISTEN_FDS, its stderr
    in a log of its own. Ready once it logs "ready:" (it has no service manager to tell)."""

    def __init__(self, config, log_path):
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "BROKER_", "WATCHDOG_"))}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([os.environ["BROKERD"], "--config", config], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=env)
        self.pid = self.proc.pid

    @property
    def status(self):
        return self.proc.returncode

    def exited(self):
        return self.proc.poll() is not None

    def wait_exit(self, timeout=WAIT):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_ready(self):
        """Until its log says ready (it reads nothing else to say so), it exits, or the deadline."""
        deadline = time.monotonic() + WAIT
        while "brokerd: ready: " not in self.log():
            if self.exited():
                raise RuntimeError("brokerd exited with %s before it was ready" % self.status)
            if time.monotonic() >= deadline:
                raise TimeoutError("brokerd not ready within %ss" % WAIT)
            time.sleep(0.02)

    def kill(self):
        if self.status is None:
            self.proc.kill()
            self.proc.wait()

    def kill_unreaped(self):
        """SIGKILL, and wait for its death but not reap it: a zombie, as a parent that is slow
        to wait (a container's entry point, a busy supervisor) leaves it."""
        self.proc.send_signal(signal.SIGKILL)
        return exits_within(self.pid, WAIT)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


def until(predicate, timeout=WAIT):
    """Polls predicate (Status, a log: nothing to wait on) every 20 ms until it holds or the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def status(control):
    """io.brokerd.Control.Status's parameters, or {}."""
    return varlink_status(control)[0] or {}


def pids(params, service, state="ready"):
    return sorted(i["pid"] for svc in params.get("services", []) if svc.get("name") == service
                  for g in svc["generations"] for i in g["instances"] if i["state"] == state)


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[2] not in "ZXx"


def listener_inode(worker):
    """The inode of the listener a LISTEN_FDS worker got at fd 3."""
    return os.stat("/proc/%d/fd/3" % worker).st_ino


def fetch_names(path, label):
    """The names the holder keeps, fetched while no brokerd runs; the fds are closed again."""
    refusal, kept = holder_fetch(path)
    check(refusal is None, "%s: the holder passes what it keeps to root (%r)" % (label, refusal))
    for _, fd in kept:
        if fd is not None:
            os.close(fd)
    return sorted(n for n, _ in kept)


def as_nobody(path, store_fd=None):
    """In a child as uid 65534: connects to path, stores `store_fd` as "evil" if given, and asks for
    every fd. Returns (connect error or None, what it read: [text, fd count], ...)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = {"error": None, "read": []}
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(5)
                s.connect(path)
                try:
                    if store_fd is not None:
                        socket.send_fds(s, [b"FDSTORE=1\nFDNAME=evil"], [store_fd])
                    s.send(b"FDGET=1")
                except OSError as e:
                    result["send_error"] = e.strerror
                while True:
                    try:
                        data, fds, _, _ = socket.recv_fds(s, 4096, 8)
                    except ConnectionResetError:
                        continue  # closed with what it sent unread: reported once, the answer still there
                    for fd in fds:
                        os.close(fd)
                    if not data and not fds:
                        break
                    result["read"].append([data.decode(errors="replace"), len(fds)])
        except OSError as e:
            result["error"] = e.strerror or str(e)
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    return out


def write_config(path, control, port, lib_port):
    with open(path, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {"http": {"listen": "tcp://127.0.0.1:%d" % port},
                               "lib": {"listen": "tcp://127.0.0.1:%d" % lib_port}},
                   "services": {"web": {"exec": [WORKER], "sockets": ["http"], "instances": 2,
                                        "ready": "notify", "restart": "on-failure"},
                                "lib": {"exec": [LIB_WORKER], "sockets": ["lib"], "instances": 2,
                                        "ready": "broker"}}}, f)


def run(tmp, manager, runs, strays):
    brokerctl = os.environ["BROKERCTL"]
    # In a directory that does not exist yet, as the default /run/brokerd/control.sock on a
    # machine where brokerd never ran: brokerd makes it, for its holder's socket too.
    control = os.path.join(tmp, "run", "brokerd", "control.sock")
    path = control + ".fdstore"
    config = os.path.join(tmp, "brokerd.json")
    port, lib_port = free_port(), free_port()
    while lib_port == port:
        lib_port = free_port()
    write_config(config, control, port, lib_port)

    def start(label, ready=True):
        b = ByHand(config, os.path.join(tmp, "brokerd-%d.log" % (len(runs) + 1)))
        runs.append((label, b))
        if ready:
            b.wait_ready()
            strays.note(b.pid)
        return b

    def ctl(*args):
        return subprocess.run([brokerctl, "--socket", control, *args], capture_output=True, text=True, timeout=60)

    # The store brokerd keeps: its sockets, the crash state, the notify socket, the sentinel's
    # pipe, and each worker's stdout and stderr.
    def expected(workers):
        return sorted(["control", "http", "lib", "notify", "sentinel", "state"]), 2 * workers

    def check_store(names, workers, label):
        want, npipes = expected(workers)
        check(sorted(n for n in names if not n.startswith("pipe.")) == want and len(pipes(names)) == npipes,
              "%s: the holder keeps %s and %d output pipes (%s)" % (label, want, npipes, names))

    # (a) A first start by hand: brokerd starts a holder beside its control socket.
    a = start("first start")
    params = status(control)
    web, lib = pids(params, "web"), pids(params, "lib")
    check(len(web) == 2 and len(lib) == 2, "first start: 2 web and 2 lib workers ready (%s %s)" % (web, lib))
    found = holders()
    check(len(found) == 1, "first start: one fd holder runs (%s)" % found)
    holder = found[0] if found else 0
    st = proc_stat(holder) if holder else None
    check(st is not None and st[0] == a.pid and st[1] == holder,
          "first start: the holder is brokerd's child and leads a session of its own (%s)" % (st,))
    mode = os.lstat(path) if os.path.exists(path) else None
    check(mode is not None and stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600 and
          mode.st_uid == os.geteuid(), "first start: its socket %s is there, mode 0600, ours (%s)" % (path, mode))
    check(len(sentinels()) == 1, "first start: a stop sentinel runs too (%s)" % sentinels())
    inode = listener_inode(web[0]) if web else None
    check(inode in process_socket_inodes(a.pid), "first start: brokerd holds the listener its workers got")
    check("recovered" not in params, "first start: Status says nothing of a crash")
    fds_first = fd_kinds(a.pid)

    crashed = a.pid
    check(a.kill_unreaped(), "brokerd killed: it died (left a zombie, not reaped yet)")
    check(alive(holder) and all(alive(p) for p in web + lib), "brokerd killed: the holder and every worker still run")
    check_store(fetch_names(path, "brokerd killed"), 4, "brokerd killed")
    queued = http_connect_and_send(port)  # answered by a worker of the dead brokerd's, or after
    status_lib, body = http_get(lib_port)
    check(status_lib == 200 and served_by(body, lib), "brokerd killed: lib's workers serve on (%s %r)" %
          (status_lib, body.strip()))

    b = start("started by hand after the crash")  # while the brokerd before is a zombie still
    a.kill()  # reaped now
    params = status(control)
    check(pids(params, "web") == web and pids(params, "lib") == lib,
          "after the crash: the same workers are ready (%s %s, were %s %s)" %
          (pids(params, "web"), pids(params, "lib"), web, lib))
    rec = params.get("recovered") or {}
    check(rec.get("crashed_pid") == crashed and rec.get("kept") == 4 and rec.get("lost") == [],
          "after the crash: Status says it carried on after pid %d with 4 kept (%s)" % (crashed, rec))
    log = b.log()
    check("fd holder: pid %d at %s passed" % (holder, path) in log, "after the crash: the log names the holder it used")
    check(holders() == [holder], "after the crash: the same holder, and only it (%s)" % holders())
    check(inode in process_socket_inodes(b.pid), "after the crash: brokerd holds the very listener it had (inode %s)" % inode)
    s, body = http_read(queued)
    check(s == 200 and served_by(body, web), "after the crash: the request made while brokerd was dead is answered (%s %r)" %
          (s, body.strip()))
    check(until(lambda: b.log().count("reconnected to the broker") == 2), "after the crash: both lib workers reconnected")
    # The holder's fds went where the store's go; none is left over. (A Status connection just
    # closed may be open on brokerd's side for a moment: waited for, with a deadline.)
    check(until(lambda: not fd_kinds(b.pid) - fds_first, timeout=10),
          "after the crash: brokerd holds no more fds of any kind than after its first start (more: %s)" %
          dict(fd_kinds(b.pid) - fds_first))
    r = ctl("upgrade", "web")
    check(r.returncode == 0, "after the crash: brokerctl upgrade web exits 0 (%d: %s%s)" % (r.returncode, r.stdout, r.stderr))
    check(all(exits_within(p, WAIT) for p in web), "after the crash: the adopted workers exited after the upgrade")
    web = pids(status(control), "web")
    check(len(web) == 2, "after the crash: 2 new web workers (%s)" % web)

    # A second brokerd while this one runs: exit 1, and the holder stays this one's.
    c = start("a second brokerd", ready=False)
    rc = c.wait_exit()
    check(rc == 1 and "brokerd pid %d runs, and uses the fd holder at %s" % (b.pid, path) in c.log(),
          "a second brokerd: exits 1 and says brokerd pid %d uses the holder (%r: %s)" % (b.pid, rc, c.log()[-300:]))
    check(holders() == [holder], "a second brokerd: the same holder runs on (%s)" % holders())

    # brokerctl reexec: the same process carries on with the same holder, and knows what it keeps.
    r = ctl("reexec")
    check(r.returncode == 0 and holders() == [holder],
          "reexec: the same holder serves the re-executed brokerd (%d: %s%s; %s)" %
          (r.returncode, r.stdout, r.stderr, holders()))

    # (b) The holder killed while brokerd runs: brokerd starts another and stores everything again.
    os.kill(holder, signal.SIGKILL)
    def replaced():
        now = holders()
        return len(now) == 1 and holder not in now and "fd holder: pid %d keeps brokerd's" % now[0] in b.log()
    check(until(replaced), "holder killed: brokerd started another and stored everything in it (%s)" % holders())
    check("fd holder: pid %d is gone while brokerd runs" % holder in b.log(), "holder killed: the log says so")
    holder = holders()[0] if holders() else 0
    check(proc_stat(holder) is not None and proc_stat(holder)[0] == b.pid,
          "holder killed: the new one is brokerd's child")
    web, lib = pids(status(control), "web"), pids(status(control), "lib")
    crashed = b.pid
    b.kill()
    check_store(fetch_names(path, "holder killed, then brokerd"), 4, "holder killed, then brokerd")
    d = start("started by hand after the holder and then brokerd died")
    params = status(control)
    rec = params.get("recovered") or {}
    check(pids(params, "web") == web and pids(params, "lib") == lib and rec.get("crashed_pid") == crashed and
          rec.get("kept") == 4, "holder killed, then brokerd: the next carries on with the same workers (%s %s; %s)" %
          (pids(params, "web"), pids(params, "lib"), rec))
    r = ctl("upgrade", "lib")
    check(r.returncode == 0, "holder killed, then brokerd: brokerctl upgrade lib exits 0 (%d: %s%s)" %
          (r.returncode, r.stdout, r.stderr))

    # (c) A clean stop: no holder, no sentinel, no worker, no socket file.
    workers = pids(status(control), "web") + pids(status(control), "lib")
    sentinel = sentinels()
    strays.note(d.pid)
    rc = d.stop()
    check(rc == 0, "clean stop: brokerd exits 0 (%r)" % rc)
    check(not alive(holder) and not any(alive(p) for p in sentinel + workers),
          "clean stop: the holder, the sentinel and the workers are gone")
    check(not os.path.exists(path) and not os.path.exists(control),
          "clean stop: neither the holder's socket file nor the control socket's is left")
    check("fd holder: brokerd pid %d stopped cleanly; closing" % d.pid in "".join(l.log() for _, l in runs),
          "clean stop: the holder said why it exited")
    strays.check("clean stop")

    # (d) A stale socket file at the holder's path: removed, and a new holder started.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path)
    stale.close()
    e = start("a stale holder socket")
    check("fd holder: removed the stale socket %s, which no holder listened on" % path in e.log(),
          "stale socket: brokerd removed it, and said so")
    check(len(holders()) == 1, "stale socket: a new holder runs (%s)" % holders())
    # brokerd and its holder both killed: nothing keeps the store, so the sentinel ends the
    # workers, and the next brokerd starts clean (README's limits).
    workers = pids(status(control), "web") + pids(status(control), "lib")
    sentinel = sentinels()
    holder = holders()[0] if holders() else 0
    e.kill()
    os.kill(holder, signal.SIGKILL)
    check(all(exits_within(p, WAIT) for p in workers + sentinel),
          "both killed: the sentinel ended the workers, and exited")
    f = start("started by hand after brokerd and the holder died")
    params = status(control)
    check("recovered" not in params and "removed the stale socket" in f.log() and
          not set(pids(params, "web") + pids(params, "lib")) & set(workers),
          "both killed: the next brokerd starts clean, with workers of its own (%s)" % params.get("recovered"))
    strays.note(f.pid)
    check(f.stop() == 0, "both killed: the clean start stops cleanly")
    strays.check("both killed")

    # A socket file at the holder's path that is another user's, or no socket at all: refused.
    for label, make, why in (
            ("a foreign holder socket", lambda: (socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).bind(path),
                                                 os.chown(path, NOBODY, NOBODY)),
             "fd holder: %s belongs to uid %d, not to root; refusing to use it: remove it" % (path, NOBODY)),
            ("no socket at the holder's path", lambda: open(path, "w").close(),
             "fd holder: %s is there and is no socket; remove it" % path)):
        make()
        g = start(label, ready=False)
        rc = g.wait_exit()
        check(rc == 1 and why in g.log(), "%s: brokerd exits 1 and says why (%r: %s)" % (label, rc, g.log()[-300:]))
        check(holders() == [] and not os.path.exists(control), "%s: it started nothing" % label)
        os.unlink(path)

    # (e) Another user: the socket's mode keeps it out; past the mode, the holder's own check.
    os.chmod(tmp, 0o711)  # the directory lets anyone through: the socket's own mode is what keeps them out
    h = start("another user")
    out = as_nobody(path)
    check(out.get("error") == "Permission denied", "uid %d: cannot connect to the 0600 socket (%s)" % (NOBODY, out))
    os.chmod(path, 0o666)  # as if the mode were lost: the holder still checks who connects
    rfd, wfd = os.pipe()
    out = as_nobody(path, store_fd=rfd)
    check(out.get("error") is None and [t for t, _ in out.get("read", [])] == ["DENIED=1"] and
          all(n == 0 for _, n in out.get("read", [])),
          "uid %d, brokerd running: the holder says DENIED=1, passes no fd and closes (%s)" % (NOBODY, out))
    holder = holders()[0] if holders() else 0
    crashed = h.pid
    h.kill()
    out = as_nobody(path, store_fd=rfd)
    check(out.get("error") is None and [t for t, _ in out.get("read", [])] == ["DENIED=1"] and
          all(n == 0 for _, n in out.get("read", [])),
          "uid %d, no brokerd: the holder still says DENIED=1 and passes no fd (%s)" % (NOBODY, out))
    os.close(rfd)
    os.close(wfd)

    # The holder keeps 4096 fds at most, and says so once when it is full. Root may store while
    # no brokerd runs: pipes with FDPOLL=0 (no writer left, so no hangup drops them).
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(path)
        for _ in range(4096):
            r, w = os.pipe()
            socket.send_fds(s, [b"FDSTORE=1\nFDNAME=filler\nFDPOLL=0"], [r])
            os.close(r)
            os.close(w)
        s.send(b"FDSTOREREMOVE=1\nFDNAME=filler")
    full = "fd holder: full, it keeps 4096 fds already; not keeping filler (nor any more until some go)"
    names = fetch_names(path, "another user")
    logs = "".join(l.log() for _, l in runs)
    check(logs.count(full) == 1, "a full holder: it says so once (%d times)" % logs.count(full))
    check("filler" not in names, "a full holder: FDSTOREREMOVE=1 dropped every fd of the name (%s)" % names)
    check("evil" not in names, "another user: nothing it sent was stored (%s)" % names)
    check_store(names, 4, "another user")
    check(any("fd holder: turned away pid" in l.log() and "of uid %d" % NOBODY in l.log() for _, l in runs),
          "another user: the holder logged whom it turned away")
    i = start("started by hand after another user tried")
    rec = status(control).get("recovered") or {}
    check(rec.get("crashed_pid") == crashed and rec.get("kept") == 4 and holders() == [holder],
          "another user: the next brokerd carries on with the same holder and workers (%s)" % rec)
    strays.note(i.pid)
    check(i.stop() == 0 and not os.path.exists(path), "last stop: exit 0, the holder's socket file gone")
    strays.check("last stop")

    # The crash state's own check, which the holder's BUSY=1 comes before: a second brokerd given
    # the store of one that runs (the test's service manager passes it) exits 1 and names it. A
    # zombie is no writer (above); a live one is.
    def under_store(label):
        b = Brokerd(os.environ["BROKERD"], config, manager, os.path.join(tmp, "brokerd-%d.log" % (len(runs) + 1)))
        runs.append((label, b))
        return b
    first = under_store("under a service manager")
    first.wait_ready()
    strays.note(first.pid)
    second = under_store("a second one, with the first one's store")
    check(until(lambda: (manager.drain(), second.exited())[1]) and second.status == 1 and
          "the brokerd that keeps the crash state, pid %d, still runs" % first.pid in second.log(),
          "a second brokerd with the store of a running one: exits 1 and names it (%r: %s)" %
          (second.status, second.log()[-300:]))
    manager.main_pid = first.pid
    check(first.stop() == 0 and holders() == [], "under a service manager: no holder ran, and brokerd stops cleanly")
    strays.check("under a service manager")


if __name__ == "__main__":
    sys.exit(main(run, prefix="brokerd-holder."))
