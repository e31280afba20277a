"""What the Python integration tests share: numbered checks, and the processes a run left below it."""

import ctypes
import json
import os
import select
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


def proc_stat(pid):
    """(ppid, session, state, flags, start time) from /proc/PID/stat, or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
        # The comm field may hold spaces and parentheses: the fields go on after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[1]), int(fields[3]), fields[0], int(fields[6]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_table():
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st:
                table[int(d)] = st
    return table


def descendants(root, table=None):
    """Pids below root, from /proc, so that nothing outlives a failed run."""
    table = proc_table() if table is None else table
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, st in table.items() if st[0] == p]
        out += kids
        todo += kids
    return out


def become_subreaper():
    """Orphans below us become our children, not init's: nothing a run started escapes the checks."""
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def dying(pid):
    """Exiting (PF_EXITING) or with a SIGKILL pending: on its way out without anyone's help."""
    st = proc_stat(pid)
    if st is None or st[2] in "ZXx" or st[3] & 0x4:
        return True
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << (signal.SIGKILL - 1)):
                    return True
    except OSError:
        return True
    return False


def exits_within(pid, timeout):
    """Whether pid dies (an unreaped zombie counts) within timeout seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class Strays:
    """What a run must not leave behind once brokerd is gone: any process below this script (a
    subreaper, so orphans come back to it), or in the session of a worker brokerd started
    (brokerd setsid()s each). check() reports each as a failed check, then kills and reaps it; a
    process already dying (brokerd's SIGKILL pending) is waited for instead."""

    def __init__(self):
        self.subreaper = become_subreaper()
        self.own_session = os.getsid(0)
        self.sessions = {}  # session id -> start time of its leader when seen (0: gone already)

    def note(self, root):
        """Remembers the sessions of everything below root (brokerd), before it stops."""
        table = proc_table()
        for pid in descendants(root, table):
            sid = table[pid][1]
            if sid not in (self.own_session, 0) and sid not in self.sessions:
                self.sessions[sid] = table[sid][4] if sid in table else 0

    def _ours(self, sid, table):
        # A session id is not handed out again while it has members: a process with that pid
        # now is its leader (same start time), or came after the session ended.
        return sid in self.sessions and (sid not in table or table[sid][4] == self.sessions[sid])

    def left(self):
        table = proc_table()
        mine = set(descendants(os.getpid(), table))
        mine |= {p for p, st in table.items() if self._ours(st[1], table)}
        return [p for p in sorted(mine) if p != os.getpid() and p in table and table[p][2] not in "ZXx"]

    def check(self, label, quiet=False):
        """quiet: a failure was reported already, and what is left is its consequence: listed, not
        counted as another failure."""
        found = []
        for _ in range(20):
            left = self.left()
            if not left:
                break
            for pid in left:
                st, cmd = proc_stat(pid), cmdline(pid)
                if dying(pid) and exits_within(pid, 10):
                    continue
                if st and pid not in [f[0] for f in found]:
                    found.append((pid, st[0], st[1], cmd))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                exits_within(pid, 10)
        # Whatever died below us is our zombie now.
        for pid, st in proc_table().items():
            if st[0] == os.getpid() and st[2] in "ZXx":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        report = "".join("\n         stray pid %d, parent %d, session %d: %s" % f for f in found)
        if quiet and found:
            print("note   %s: killed what was left behind%s" % (label, report), flush=True)
        else:
            check(not found, "%s: no process is left behind%s" % (label, report))


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip() or "(no command line)"
    except OSError:
        return "(gone)"


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


def run_with_brokerd(prefix, body, make_config=None):
    """Starts brokerd ($BROKERD) with one service, web, of the Python example worker
    ($EXAMPLE_PYTHON) on a loopback port, as systemd would (a NOTIFY_SOCKET of our own, waited on
    for READY=1), and calls body(control socket path). Then stops brokerd with SIGTERM and checks
    it exits 0 and leaves no process behind (see Strays), killing whatever is left. Prints
    brokerd's log when a check failed, and the closing "N passed, N failed" line. Returns the exit
    code for the script. make_config(tmp, control), when given, returns the config instead."""
    strays = Strays()
    check(strays.subreaper, "the test is a child subreaper, so that no worker escapes the checks")
    brokerd = os.environ["BROKERD"]
    worker = os.environ["EXAMPLE_PYTHON"]
    tmp = tempfile.mkdtemp(prefix=prefix)
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    with open(config, "w") as f:
        if make_config:
            json.dump(make_config(tmp, control), f)
        else:
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
        strays.note(proc.pid)
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
            strays.note(proc.pid)
            proc.kill()
            proc.wait()
        strays.check("after brokerd", quiet=bool(failures))
        if failures:
            log.seek(0)
            print("--- brokerd stderr:\n" + log.read(), flush=True)
        log.close()
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print("%d passed, %d failed" % (len(passes), len(failures)))
    return 1 if failures else 0
