#!/usr/bin/env python3
"""`brokerctl bridge`, and `brokerctl -H` over it, without ssh: against a real brokerd, the bridge
relays Varlink both ways; against a fake control socket that sends a file descriptor, it passes
nothing on and exits 1; with no brokerd, 3. BROKERCTL_SSH is a stand-in for ssh that does what ssh
does with a command (runs it with the shell) or fails as ssh does (255), so -H's exit codes are
checked here, and against a real sshd in integration-remote-ssh.
"""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from checks import check, exits_within, run_with_brokerd

BROKERCTL = os.environ["BROKERCTL"]
DEADLINE = 20.0


class Messages:
    """NUL-terminated Varlink messages from a pipe, read in chunks."""

    def __init__(self, f):
        self.f, self.buf = f, b""

    def next(self, deadline):
        """The next message, or None at EOF or past the deadline."""
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.f], [], [], left)[0]:
                return None
            chunk = os.read(self.f.fileno(), 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        data, self.buf = self.buf.split(b"\0", 1)
        return json.loads(data)


def call(method, **parameters):
    return json.dumps({"method": method, "parameters": parameters}).encode() + b"\0"


def relays_to_brokerd(control):
    bridge = subprocess.Popen([BROKERCTL, "--socket", control, "bridge"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEADLINE
    bridge.stdin.write(call("io.brokerd.Control.Status") + call("org.varlink.service.GetInfo"))
    bridge.stdin.flush()
    replies = Messages(bridge.stdout)
    status = replies.next(deadline)
    names = [s.get("name") for s in status.get("parameters", {}).get("services", [])] if status else None
    check(names == ["web"], "bridge: brokerd's Status comes back, naming web (%r)" % names)
    info = replies.next(deadline)
    check(info is not None and info.get("parameters", {}).get("vendor") is not None,
          "bridge: a second call on the same bridge is answered (%r)" % info)
    bridge.stdin.close()  # brokerctl is done: brokerd hears the end, closes, and the bridge exits
    if not check(exits_within(bridge.pid, DEADLINE), "bridge: exits once its standard input ends"):
        bridge.kill()
    rc = bridge.wait()
    rest, err = bridge.stdout.read(), bridge.stderr.read()
    check((rc, rest, err) == (0, b"", b""), "bridge: exit 0, nothing more on stdout or stderr (%r %r %r)" % (rc, rest, err))


def fake_brokerd(path, replies):
    """A control socket that answers each call with the next of replies: (bytes, fds to send)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            for data, fds in replies:
                got = b""
                while not got.endswith(b"\0"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    got += chunk
                socket.send_fds(conn, [data], fds) if fds else conn.sendall(data)
            conn.recv(4096)  # until the bridge goes
        listener.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def refuses_fds(tmp):
    path = os.path.join(tmp, "fake.sock")
    r, w = os.pipe()
    big = "x" * (1 << 20)  # sixteen times the bridge's buffer
    plain = json.dumps({"parameters": {"first": big}}).encode() + b"\0"
    with_fd = b'{"parameters":{"second":true}}\0'
    server = fake_brokerd(path, [(plain, []), (with_fd, [w])])
    bridge = subprocess.Popen([BROKERCTL, "--socket", path, "bridge"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bridge.stdin.write(call("io.brokerd.Control.Status"))
    bridge.stdin.flush()
    first = Messages(bridge.stdout).next(time.monotonic() + DEADLINE)
    check(first == {"parameters": {"first": big}},
          "fake brokerd: a 1 MiB reply without fds is relayed whole (%r)" % (str(first)[:100],))
    bridge.stdin.write(call("io.brokerd.Control.Status"))
    bridge.stdin.flush()
    if not check(exits_within(bridge.pid, DEADLINE), "fake brokerd: the bridge ends when brokerd sends an fd"):
        bridge.kill()
    rc = bridge.wait()
    out, err = bridge.stdout.read(), bridge.stderr.read().decode()
    check(rc == 1, "fake brokerd: exit 1 (got %r)" % rc)
    check(out == b"", "fake brokerd: nothing of the message with the fd is relayed (%r)" % out)
    check(err == "brokerctl: bridge: brokerd sent file descriptors, which cannot cross a bridge\n",
          "fake brokerd: the bridge says why (%r)" % err)
    bridge.stdin.close()
    server.join(DEADLINE)
    os.close(w)
    # Our copy of the write end is closed, and the fake's went with its message: a reader sees EOF
    # only if no process kept the one the bridge received.
    check(select.select([r], [], [], DEADLINE)[0] and os.read(r, 1) == b"",
          "fake brokerd: no process holds the fd the bridge was sent")
    os.close(r)


def no_brokerd(tmp):
    r = subprocess.run([BROKERCTL, "--socket", os.path.join(tmp, "none.sock"), "bridge"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 3 and "brokerd is not running" in r.stderr and r.stdout == "",
          "no brokerd: the bridge exits 3 and says so (%d %r)" % (r.returncode, r.stderr))


def same_status(control, far):
    """Checks `far`, a finished `brokerctl -H ... --json status`, against the reply on this host."""
    here = subprocess.run([BROKERCTL, "--socket", control, "--json", "status"], capture_output=True, text=True,
                          timeout=60)
    check(far.returncode == 0, "-H status: exit 0 (%d %r)" % (far.returncode, far.stderr))
    try:
        a, b = json.loads(here.stdout), json.loads(far.stdout)
        a.pop("uptime_usec", None), b.pop("uptime_usec", None)
        check(a == b, "-H status --json: the same reply as brokerctl on the host itself, but the uptime")
    except ValueError as e:
        check(False, "-H status --json: JSON (%s: %r)" % (e, far.stdout))


def remote_script(tmp, name, text):
    """An executable sh script in tmp that plays the remote side: `text`, in which {bin} is a
    directory whose brokerctl is the build's, for it to put first on PATH."""
    bindir = os.path.join(tmp, "bin")
    if not os.path.isdir(bindir):
        os.mkdir(bindir)
        os.symlink(BROKERCTL, os.path.join(bindir, "brokerctl"))
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + text.replace("{bin}", bindir))
    os.chmod(path, 0o755)
    return path


def fake_ssh(tmp):
    """A stand-in for ssh: logs its arguments, and like ssh runs the last one with the shell (the
    build's brokerctl first on PATH); as host "unreachable" it fails as ssh does, with 255."""
    log = os.path.join(tmp, "ssh.log")
    return remote_script(tmp, "fake-ssh",
                         'printf "%%s|" "$@" >> %s; echo >> %s\n'
                         'for last; do :; done\n'
                         'case " $* " in *" unreachable "*) echo "ssh: connect to host unreachable: refused" >&2; '
                         'exit 255;; esac\n'
                         'PATH={bin}:$PATH exec sh -c "$last"\n' % (log, log))


def over_h(control, tmp):
    ssh = fake_ssh(tmp)
    env = dict(os.environ, BROKERCTL_SSH=ssh + " -o FakeOption=yes")

    def remote(*args):
        return subprocess.run([BROKERCTL, *args], capture_output=True, text=True, timeout=60, env=env)

    same_status(control, remote("-H", "admin@host:2222", "--socket", control, "--json", "status"))
    with open(os.path.join(tmp, "ssh.log")) as f:
        log = f.read().splitlines()
    want = "-o|FakeOption=yes|-x|-T|-p|2222|--|admin@host|brokerctl bridge --socket %s|" % control
    check(log[-1:] == [want], "-H: ssh gets BROKERCTL_SSH's words, the port, the host and the bridge (%r)" % log[-1:])

    cases = [
        (["-H", "host", "--socket", control, "status", "nope"], 5, "no such service"),
        (["-H", "host", "--socket", os.path.join(tmp, "none.sock"), "status"], 3, "brokerd is not running"),
        (["-H", "unreachable", "--socket", control, "status"], 1, "brokerctl: ssh to unreachable failed (exit status 255)"),
        (["-H", "-oProxyCommand=x", "status"], 2, "expected [USER@]HOST[:PORT]"),
        (["-H", "host:99999", "status"], 2, "expected [USER@]HOST[:PORT]"),
        (["-H", "host", "bridge"], 2, "it takes no -H"),
    ]
    for args, code, text in cases:
        r = remote(*args)
        check(r.returncode == code and text in r.stderr,
              "brokerctl %s: exit %d, %r (got %d, %r)" % (" ".join(args[1:]), code, text, r.returncode, r.stderr))
    # The remote bridge said it; brokerctl adds no second line.
    r = remote("-H", "host", "--socket", os.path.join(tmp, "none.sock"), "status")
    check(r.stderr.count("\n") == 1, "-H, no brokerd there: one line, the remote brokerctl's (%r)" % r.stderr)
    r = subprocess.run([BROKERCTL, "-H", "host", "status"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, BROKERCTL_SSH=os.path.join(tmp, "no-such-ssh")))
    check(r.returncode == 1 and "cannot run" in r.stderr and "BROKERCTL_SSH" in r.stderr,
          "-H with a BROKERCTL_SSH that does not exist: exit 1, naming it (%d %r)" % (r.returncode, r.stderr))


def body(control):
    tmp = tempfile.mkdtemp(prefix="bridge-")
    try:
        relays_to_brokerd(control)
        refuses_fds(tmp)
        no_brokerd(tmp)
        over_h(control, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_with_brokerd("bridge-", body))
