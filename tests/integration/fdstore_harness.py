#!/usr/bin/env python3
"""Plays systemd's part for brokerd's fd store, stdlib only, against a real brokerd and worker.

The harness owns the notify socket and keeps what brokerd pushes with FDSTORE=1, as the service
manager does. It stops brokerd and starts it again with the stored fds in LISTEN_FDS, the way
systemd does for `systemctl restart` (a restart job keeps the store) and for an automatic restart
after a crash, and checks what a client sees: a request that waited in
the accept queue while no brokerd ran is answered; a stored socket that no longer fits the config,
or that no config entry names, is released with FDSTOREREMOVE=1.
"""

import array
import collections
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import sys
import threading
import tempfile
import time

from checks import Strays, check, descendants, failures, passes, proc_stat

TIMEOUT = 20.0  # per step: brokerd's start, its worker's readiness, a drain
HTTP_TIMEOUT = 10.0  # a ready worker answers at once


def socket_inode(fd):
    return os.fstat(fd).st_ino


def process_socket_inodes(pid):
    """The socket inodes among a process's open fds."""
    out = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink("/proc/%d/fd/%s" % (pid, fd)))
            except OSError:
                continue
            if m:
                out.add(int(m.group(1)))
    except OSError:
        pass
    return out


def sockets(names):
    """The listeners and control socket among stored names: not the crash state, the workers'
    notify socket, their output pipes ("pipe.<inode>") or the stop sentinel's pipe, which brokerd
    stores too."""
    return sorted(n for n in names if n not in ("state", "notify", "sentinel") and not n.startswith("pipe."))


def is_helper(pid, flag):
    """Whether pid is the brokerd binary run with flag (b"--sentinel", b"--fd-holder")."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
        return argv[1:2] == [flag] and os.readlink("/proc/%d/exe" % pid) == os.path.realpath(os.environ["BROKERD"])
    except OSError:
        return False


def is_sentinel(pid):
    """Whether pid is brokerd's stop sentinel (`brokerd --sentinel`, the brokerd binary)."""
    return is_helper(pid, b"--sentinel")


def is_holder(pid):
    """Whether pid is an fd holder (`brokerd --fd-holder PATH`), which brokerd starts without NOTIFY_SOCKET."""
    return is_helper(pid, b"--fd-holder")


def workers_of(pid):
    """The processes below brokerd but its stop sentinel and its fd holder."""
    return [p for p in descendants(pid) if not is_sentinel(p) and not is_holder(p)]


def running_helpers(which):
    return sorted(p for p in descendants(os.getpid()) if which(p) and proc_stat(p) and proc_stat(p)[2] not in "ZXx")


def sentinels():
    """Every running stop sentinel (there is one per service manager's store)."""
    return running_helpers(is_sentinel)


def holders():
    """Every running fd holder below this test."""
    return running_helpers(is_holder)


def holder_fetch(path, timeout=10.0):
    """FDGET=1 to the fd holder at path, as a brokerd started by hand asks it: (refusal, [[name, fd]]),
    refusal being None or the holder's "BUSY=1..." or "DENIED=1" answer. The caller closes the fds."""
    kept = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.send(b"FDGET=1")
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(s, 4096, 1)
            except ConnectionResetError:
                continue  # closed with FDGET unread: reported once, and the answer is still there
            text = data.decode(errors="replace")
            if not data and not fds:
                raise ConnectionError("the fd holder at %s closed the connection before FDEND" % path)
            if text.startswith(("BUSY=", "DENIED=")):
                for fd in fds:
                    os.close(fd)
                return text, kept
            if text.startswith("FDEND="):
                return None, kept
            kept.append([text.split("\n")[0].removeprefix("FDNAME="), fds[0] if fds else None])


def pipes(names):
    return [n for n in names if n.startswith("pipe.")]


# fdname_is_valid() in systemd: printable ASCII without ':', at most 255 bytes.
FDNAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e ]{1,255}$")


class ServiceManager:
    """The notify socket and the fd store of one service, read as systemd's service.c reads them.

    As in systemd, the store is a list: FDSTORE=1 adds each passed fd under FDNAME (default
    "stored"), an fd that is the same socket as one already stored is dropped as a duplicate,
    and FDSTOREREMOVE=1 closes every entry of that name. NotifyAccess=main: messages from any
    other pid than the main one are counted and ignored.
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.name = "brokerd-fdstore-test-%d" % os.getpid()
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)
        # systemd reads its notify socket all along; a test reads this one now and then. A
        # thread takes each datagram off the socket as it comes (its queue holds only
        # net.unix.max_dgram_qlen of them: a full one makes brokerd drop what it sends), and
        # drain() handles them on the test's own thread. The thread writes a byte to `wakeup`
        # for each, for a test to select() on.
        self.inbox = collections.deque()
        self.wakeup, self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.store = []        # [name, fd], in the order systemd passes them back
        self.unpolled = set()  # stored fds sent with FDPOLL=0
        self.main_pid = None
        self.events = []       # ("READY"|"STOPPING"|"STORE"|"REMOVE"|"HUP"|"DUPLICATE"|"STATUS", detail)
        self.foreign = 0       # messages from other pids
        self.errors = []       # what systemd would have logged and rejected

    @property
    def address(self):
        return "@" + self.name

    def names(self):
        return [n for n, _ in self.store]

    def fd(self, name):
        fds = [fd for n, fd in self.store if n == name]
        return fds[0] if len(fds) == 1 else None

    def add(self, name, fd, poll=True):
        ino = socket_inode(fd)
        for n, have in self.store:
            if socket_inode(have) == ino:
                os.close(fd)
                self.events.append(("DUPLICATE", name))
                return
        self.store.append([name, fd])
        if not poll:
            self.unpolled.add(fd)
        self.events.append(("STORE", name))

    def remove(self, name):
        self._drop(lambda n, fd: n == name)
        self.events.append(("REMOVE", name))

    def _drop(self, which):
        keep = []
        for n, fd in self.store:
            if which(n, fd):
                self.unpolled.discard(fd)
                os.close(fd)
            else:
                keep.append([n, fd])
        self.store = keep

    def drop_hung_up(self):
        """As systemd, which watches each stored fd (unless FDPOLL=0) and drops one that reports
        POLLHUP or POLLERR: a pipe whose writers all closed."""
        p = select.poll()
        polled = [fd for _, fd in self.store if fd not in self.unpolled]
        for fd in polled:
            p.register(fd, 0)
        hung = {fd for fd, ev in p.poll(0) if ev & (select.POLLHUP | select.POLLERR)}
        for n, fd in self.store:
            if fd in hung:
                self.events.append(("HUP", n))
        self._drop(lambda n, fd: fd in hung)

    def clear(self):
        self._drop(lambda n, fd: True)

    def _read(self):
        fd_space = socket.CMSG_SPACE(253 * array.array("i").itemsize)
        cred_space = socket.CMSG_SPACE(3 * 4)
        while not self._closing:
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(4096, fd_space + cred_space, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, OSError):
                continue
            self.inbox.append((data, ancdata, flags))
            try:
                os.write(self._wake, b"!")
            except BlockingIOError:
                pass  # a full pipe wakes a waiter as well

    def receive_one(self):
        """Handles one datagram the reader took, or returns False when none is waiting."""
        try:
            data, ancdata, flags = self.inbox.popleft()
        except IndexError:
            return False
        fds, pid = [], None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                fds += list(a)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[0:4], sys.byteorder, signed=True)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            self.errors.append("truncated notify message (flags %#x)" % flags)
            for fd in fds:
                os.close(fd)
            return True
        if pid is None or pid != self.main_pid:
            self.foreign += 1
            for fd in fds:
                os.close(fd)
            return True

        fields = {}
        for line in data.decode(errors="replace").split("\n"):
            if "=" in line:
                k, v = line.split("=", 1)
                fields[k] = v
        if fields.get("READY") == "1":
            self.events.append(("READY", ""))
        if fields.get("STOPPING") == "1":
            self.events.append(("STOPPING", ""))
        if "STATUS" in fields:
            self.events.append(("STATUS", fields["STATUS"]))
        if fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME")
            if name is None or not FDNAME_RE.match(name):
                self.errors.append("FDSTOREREMOVE=1 without a valid FDNAME: %r" % data)
            else:
                self.remove(name)
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME", "stored")
            if not FDNAME_RE.match(name):
                self.errors.append("FDSTORE=1 with an invalid FDNAME: %r" % data)
                for fd in fds:
                    os.close(fd)
            elif not fds:
                self.errors.append("FDSTORE=1 FDNAME=%s without an fd" % name)
            else:
                for fd in fds:
                    self.add(name, fd, poll=fields.get("FDPOLL") != "0")
        elif fds:
            self.errors.append("fds passed without FDSTORE=1: %r" % data)
            for fd in fds:
                os.close(fd)
        return True

    def drain(self):
        try:
            while os.read(self.wakeup, 4096):
                pass
        except BlockingIOError:
            pass
        while self.receive_one():
            pass
        self.drop_hung_up()

    def close(self):
        self._closing = True
        self._reader.join()
        self.drain()
        self.clear()
        self.sock.close()
        os.close(self.wakeup)
        os.close(self._wake)


class Brokerd:
    """One run of brokerd, started as systemd starts a service: the stored fds at 3 and up, then
    unit's [name, fd], the sockets of socket units (Sockets=), which the store does not hold."""

    def __init__(self, binary, config, manager, log_path, unit=()):
        self.manager = manager
        self.log_path = log_path
        names = manager.names() + [n for n, _ in unit]
        fds = [fd for _, fd in manager.store] + [fd for _, fd in unit]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "BROKER_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = manager.address
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                # stdio first: log_fd may sit where a stored fd goes. Then the stored fds out of
                # the way of 3..3+n, and into place: the inherited ones only.
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, 3 + i, inheritable=True)
                if fds:
                    env["LISTEN_FDS"] = str(len(fds))
                    env["LISTEN_FDNAMES"] = ":".join(names)
                    env["LISTEN_PID"] = str(os.getpid())
                os.execve(binary, [binary, "--config", config], env)
            except BaseException as e:  # nothing of the harness may run on in the child
                os.write(2, ("exec %s: %s\n" % (binary, e)).encode())
            os._exit(127)
        os.close(log_fd)
        os.close(null_fd)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.status = None
        manager.main_pid = pid

    def exited(self):
        if self.status is None:
            r, _, _ = select.select([self.pidfd], [], [], 0)
            if r:
                _, status = os.waitpid(self.pid, 0)
                self.status = os.waitstatus_to_exitcode(status)
                os.close(self.pidfd)
        return self.status is not None

    def wait_for(self, what, predicate, deadline):
        """Serves the notify socket until predicate() holds, brokerd exits, or the deadline."""
        while True:
            self.manager.drain()
            if predicate():
                return True
            if self.exited():
                self.manager.drain()
                if predicate():
                    return True
                raise RuntimeError("brokerd exited with %s while waiting for %s" % (self.status, what))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no %s from brokerd within %ss" % (what, TIMEOUT))
            select.select([self.manager.wakeup, self.pidfd], [], [], left)

    def wait_ready(self):
        seen = len(self.manager.events)
        self.wait_for("READY=1", lambda: ("READY", "") in self.manager.events[seen:], time.monotonic() + TIMEOUT)

    def stop(self):
        """SIGTERM, as systemctl stop with KillMode=process; brokerd drains its workers and exits."""
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while not self.exited():
            self.manager.drain()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("brokerd did not exit within %ss of SIGTERM" % TIMEOUT)
            select.select([self.manager.wakeup, self.pidfd], [], [], left)
        self.manager.drain()
        return self.status

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            os.close(self.pidfd)
            self.status = -signal.SIGKILL

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


def starter(tmp, config, control, manager, runs, strays):
    """start(label): brokerd started with the store as it is, waited for until READY=1, its
    processes noted for strays; returns it and its Status parameters."""
    def start(label):
        b = Brokerd(os.environ["BROKERD"], config, manager, os.path.join(tmp, "brokerd-%d.log" % (len(runs) + 1)))
        runs.append((label, b))
        b.wait_ready()
        strays.note(b.pid)
        params, err = varlink_status(control)
        check(params is not None, "%s: Status answers (%s)" % (label, err))
        return b, params or {}
    return start


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_connect_and_send(port):
    """A connection with a complete request written, not read yet."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(HTTP_TIMEOUT)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: fdstore-test\r\nConnection: close\r\n\r\n")
    return s


def http_read(s):
    """(status, body) of the one response on s, read to the server's close."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    return (int(m.group(1)) if m else None), body.decode(errors="replace")


def http_get(port):
    try:
        return http_read(http_connect_and_send(port))
    except OSError as e:
        return None, str(e)


def varlink_status(path):
    """io.brokerd.Control.Status, as brokerctl status calls it; the reply's parameters or an error text."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(HTTP_TIMEOUT)
            s.connect(path)
            s.sendall(json.dumps({"method": "io.brokerd.Control.Status"}).encode() + b"\0")
            buf = b""
            while b"\0" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return None, "connection closed"
                buf += chunk
        reply = json.loads(buf.split(b"\0", 1)[0])
        if "error" in reply:
            return None, reply["error"]
        return reply.get("parameters", {}), None
    except (OSError, ValueError) as e:
        return None, "%s: %s" % (type(e).__name__, e)


def write_config(path, control, port, worker):
    with open(path, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {"http": {"listen": "tcp://127.0.0.1:%d" % port}},
                   "services": {"web": {"exec": [worker], "sockets": ["http"],
                                        "instances": 1, "ready": "broker"}}}, f)


def served_by(body, pids):
    """The example worker answers "hello from web gen G pid P"; whether P is one of pids."""
    m = re.search(r"\bpid (\d+)", body)
    return bool(m) and int(m.group(1)) in pids


def check_running(b, manager, control, port, label):
    """What every start must give: a store of exactly one "http" and one "control", both the very
    sockets brokerd listens on, a port that serves, and a control socket that answers Status."""
    workers = set(workers_of(b.pid))
    check(len(workers) == 1, "%s: brokerd runs its one worker (%s)" % (label, sorted(workers)))
    check(sockets(manager.names()) == ["control", "http"],
          "%s: the store holds exactly the sockets http and control (%s)" % (label, manager.names()))
    check_kept(manager, workers, label)
    held = process_socket_inodes(b.pid)
    http_fd = manager.fd("http")
    if http_fd is not None:
        with socket.socket(fileno=os.dup(http_fd)) as s:
            check(s.getsockname() == ("127.0.0.1", port),
                  "%s: the stored http is bound to 127.0.0.1:%d (%s)" % (label, port, s.getsockname()))
            check(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "%s: the stored http listens" % label)
        check(socket_inode(http_fd) in held, "%s: the stored http is the socket brokerd holds" % label)
    control_fd = manager.fd("control")
    if control_fd is not None:
        with socket.socket(fileno=os.dup(control_fd)) as s:
            check(s.getsockname() == control, "%s: the stored control is bound to control.path (%r)" % (label, s.getsockname()))
        check(socket_inode(control_fd) in held, "%s: the stored control is the socket brokerd serves" % label)
    status, body = http_get(port)
    check(status == 200 and served_by(body, workers), "%s: port %d serves 200 from brokerd's worker (%s %r)" %
          (label, port, status, body.strip()))
    params, err = varlink_status(control)
    check(params is not None, "%s: Status on the control socket answers (%s)" % (label, err))
    return workers, params or {}


def check_kept(manager, workers, label):
    """Beside the sockets, the store holds one crash state, one notify socket (the very one whose
    address the workers have), each worker's stdout and stderr pipe, and the stop sentinel's pipe."""
    names = manager.names()
    check(names.count("state") == 1 and names.count("notify") == 1,
          "%s: the store holds one crash state and one notify socket (%s)" % (label, names))
    check(len(pipes(names)) == 2 * len(workers), "%s: and the output pipes of %d worker(s) (%s)" %
          (label, len(workers), names))
    check(names.count("sentinel") == 1, "%s: and the write end of one stop sentinel's pipe (%s)" % (label, names))


def check_answered(queued, workers, what):
    """The response on queued, a connection made while no brokerd ran, is a 200 from one of workers."""
    if queued is None:
        return
    try:
        status, body = http_read(queued)
    except OSError as e:
        status, body = None, str(e)
    check(status == 200 and served_by(body, workers), "%s (%s %r)" % (what, status, body.strip()))


def socket_origin(params, name):
    for s in params.get("sockets", []):
        if s.get("name") == name:
            return s.get("origin"), s.get("address")
    return None, None


def events_since(manager, seen, kind):
    return [d for k, d in manager.events[seen:] if k == kind]


def stop(b, label, workers, strays):
    seen = len(b.manager.events)
    strays.note(b.pid)
    rc = b.stop()
    check(rc == 0, "%s: brokerd exits 0 on SIGTERM (got %r)" % (label, rc))
    check(("STOPPING", "") in b.manager.events[seen:], "%s: brokerd sent STOPPING=1" % label)
    left = [p for p in workers if os.path.exists("/proc/%d" % p)]
    check(not left, "%s: its workers are gone with it (%s)" % (label, left))
    strays.check(label)


def run(tmp, manager, runs, strays):
    brokerd = os.environ["BROKERD"]
    worker = os.environ["EXAMPLE_HTTP"]
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    port = free_port()
    write_config(config, control, port, worker)

    def start(label):
        b = Brokerd(brokerd, config, manager, os.path.join(tmp, "brokerd-%d.log" % (len(runs) + 1)))
        runs.append((label, b))
        return b

    # 1. A first start: brokerd binds, and pushes what it bound into the store.
    b = start("first start")
    b.wait_ready()
    check(events_since(manager, 0, "DUPLICATE") == [], "first start: no fd pushed twice")
    workers, _ = check_running(b, manager, control, port, "first start")

    # 2. Down: the store keeps the listener, so a client's connection waits in its accept queue.
    stop(b, "first stop", workers, strays)
    check(sockets(manager.names()) == ["control", "http"],
          "first stop: the store still holds http and control (%s)" % manager.names())
    check(pipes(manager.names()) == [] and "state" in manager.names(),
          "first stop: the workers' pipes left it, the crash state did not (%s)" % manager.names())
    # brokerd removes the socket files it bound when it stops (design.md, "The fd store"), so the
    # stored control socket can no longer be reached: the restart must bind it afresh.
    check(not os.path.exists(control), "first stop: brokerd removed the control socket file it had bound")
    try:
        queued = http_connect_and_send(port)
    except OSError as e:
        queued = None
        check(False, "while brokerd is down, a client connects to %d (%s)" % (port, e))
    if queued is not None:
        # Only the store holds the listener now: the connection waits in its accept queue.
        http_fd = manager.fd("http")
        waiting = http_fd is not None and select.select([http_fd], [], [], HTTP_TIMEOUT)[0] != []
        check(waiting, "while brokerd is down, a client's connection to %d waits in the stored "
              "listener's accept queue" % port)

    # 3. Started again with the stored fds, as by systemctl restart or after a crash: the queue survived.
    seen = len(manager.events)
    b = start("restart")
    b.wait_ready()
    log = b.log()
    check("socket http: kept by the service manager" in log, "restart: the log says http was kept by the service manager")
    check("not adopting the control socket systemd passed: its file %s is gone" % control in log,
          "restart: the log says the stored control socket was not adopted, as its file is gone")
    check("(adopted from systemd)" not in log, "restart: the control socket was bound afresh, not adopted")
    released = events_since(manager, seen, "REMOVE")
    check(sockets(released) == ["control"], "restart: of the sockets, only the stored control released (%s)" % released)
    check("notify" in released and "state" not in released,
          "restart: after a clean stop the old notify socket is released, the crash state kept (%s)" % released)
    check(sockets(events_since(manager, seen, "STORE")) == ["control"],
          "restart: the control socket bound afresh is stored (%s)" % events_since(manager, seen, "STORE"))
    check("the brokerd before stopped cleanly; starting afresh" in log, "restart: the log says it starts afresh")
    workers, params = check_running(b, manager, control, port, "restart")
    origin, _ = socket_origin(params, "http")
    check(origin == "fdstore", "restart: Status shows http with origin fdstore (%r)" % origin)
    check_answered(queued, workers, "restart: the request queued while brokerd was down is answered 200 by the new worker")

    # 4. The config moved http to another port: the stored one is released, a new one bound and stored.
    stop(b, "second stop", workers, strays)
    old_port, port = port, free_port()
    while port == old_port:
        port = free_port()
    write_config(config, control, port, worker)
    old_http_ino = socket_inode(manager.fd("http")) if manager.fd("http") is not None else None
    seen = len(manager.events)
    b = start("mismatch")
    b.wait_ready()
    log = b.log()
    check(re.search(r"socket http: not adopting the service manager's stored socket: .*127\.0\.0\.1:%d" % old_port, log)
          is not None, "mismatch: the log names the stored address that no longer fits")
    store_events = [(k, d) for k, d in manager.events[seen:] if k in ("STORE", "REMOVE")]
    check(("REMOVE", "http") in store_events, "mismatch: brokerd released the stored http (FDSTOREREMOVE=1)")
    check(store_events.count(("REMOVE", "http")) == 1 and store_events.count(("STORE", "http")) == 1 and
          store_events.index(("REMOVE", "http")) < store_events.index(("STORE", "http")),
          "mismatch: and then stored the newly bound http (%s)" % store_events)
    new_http = manager.fd("http")
    check(new_http is not None and socket_inode(new_http) != old_http_ino, "mismatch: the stored http is a new socket")
    workers, params = check_running(b, manager, control, port, "mismatch")
    origin, address = socket_origin(params, "http")
    check(origin == "bound" and address == "tcp://127.0.0.1:%d" % port,
          "mismatch: Status shows http bound at the new port (%r %r)" % (origin, address))
    status, _ = http_get(old_port)
    check(status is None, "mismatch: the old port %d no longer accepts" % old_port)

    # 5. A stored fd that no config entry names is released.
    stop(b, "third stop", workers, strays)
    stale = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    stale.bind(("127.0.0.1", 0))
    stale.listen(4)
    stale_ino = socket_inode(stale.fileno())
    manager.add("stale", stale.detach())
    seen = len(manager.events)
    b = start("stale")
    b.wait_ready()
    log = b.log()
    check(("REMOVE", "stale") in manager.events[seen:], "stale: brokerd released \"stale\" (FDSTOREREMOVE=1)")
    check("stale" not in manager.names(), "stale: the store no longer holds it (%s)" % manager.names())
    check('systemd passed socket "stale", which no config entry names' in log, "stale: the log says so")
    check(stale_ino not in process_socket_inodes(b.pid), "stale: brokerd closed its copy")
    workers, _ = check_running(b, manager, control, port, "stale")
    leaked = [p for p in workers if stale_ino in process_socket_inodes(p)]
    check(not leaked, "stale: no worker inherited it (%s)" % leaked)
    stop(b, "last stop", workers, strays)

    check(events_since(manager, 0, "DUPLICATE") == [],
          "no run pushed a socket the store already held (%s)" % events_since(manager, 0, "DUPLICATE"))
    check(manager.foreign == 0, "only brokerd's own pid wrote to the notify socket (%d others)" % manager.foreign)
    check(not manager.errors, "every notify message was well-formed (%s)" % manager.errors)


def main(phases=None, prefix="brokerd-fdstore."):
    """Runs phases(tmp, manager, runs, strays) (this file's run by default), then reaps and reports."""
    strays = Strays()
    if not check(strays.subreaper, "the harness is a child subreaper, so that no worker escapes the checks"):
        return 1
    tmp = tempfile.mkdtemp(prefix=prefix)
    manager = ServiceManager()
    runs = []
    try:
        (phases or run)(tmp, manager, runs, strays)
    except Exception as e:  # report, with brokerd's logs, rather than a bare traceback
        failures.append("%s: %s" % (type(e).__name__, e))
        print("FAILED %s: %s" % (type(e).__name__, e), flush=True)
    finally:
        for _, b in runs:
            if b.status is None:
                strays.note(b.pid)
                b.kill()
        # Orphans are ours (subreaper): whatever is left is killed, reaped and reported.
        strays.check("the end", quiet=bool(failures))
        if failures:
            for label, b in runs:
                print("--- brokerd log (%s):\n%s" % (label, b.log()), flush=True)
        manager.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print("%d passed, %d failed" % (len(passes), len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
