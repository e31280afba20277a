#!/usr/bin/env python3
"""`brokerctl -H` through a real ssh to a real sshd: an sshd of this test's own on 127.0.0.1 (its
host key, config and authorized_keys in a temporary directory), whose key runs a forced command
that logs the command ssh asked for and runs it with the build's brokerctl. Over it: status as on
the host itself, an upgrade and a failed one with their exit codes and progress, a watch, and the
codes of what fails remotely (3, 5) and of ssh itself (1). Needs root (sshd) and openssh-server;
otherwise it skips (77).
"""
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bridge import remote_script, same_status
from checks import check, exits_within, failures, run_with_brokerd

BROKERCTL = os.environ["BROKERCTL"]
SSHD = "/usr/sbin/sshd"
DEADLINE = 30.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """This test's sshd, and the ssh configuration that reaches it as host "test"."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.log_path = os.path.join(tmp, "commands.log")
        keys = {}
        for name in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "brokerctl-test", "-f",
                            os.path.join(tmp, name)], check=True, timeout=60)
            with open(os.path.join(tmp, name + ".pub")) as f:
                keys[name] = f.read().strip()
        forced = remote_script(tmp, "forced", 'printf "%%s\\n" "$SSH_ORIGINAL_COMMAND" >> %s\n'
                               'PATH={bin}:$PATH\neval "exec $SSH_ORIGINAL_COMMAND"\n' % self.log_path)
        with open(os.path.join(tmp, "authorized_keys"), "w") as f:
            f.write('command="%s",restrict %s\n' % (forced, keys["id"]))
        self.port = free_port()
        config = os.path.join(tmp, "sshd_config")
        with open(config, "w") as f:
            f.write("ListenAddress 127.0.0.1\nPort %d\nHostKey %s\nAuthorizedKeysFile %s\nPidFile none\n"
                    "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nLogLevel VERBOSE\n"
                    % (self.port, os.path.join(tmp, "host_key"), os.path.join(tmp, "authorized_keys")))
        self.client_config = os.path.join(tmp, "ssh_config")
        with open(self.client_config, "w") as f:
            f.write("Host test\n  HostName 127.0.0.1\n  Port %d\n  User root\n  IdentityFile %s\n"
                    "  IdentitiesOnly yes\n  UserKnownHostsFile %s\n  StrictHostKeyChecking yes\n"
                    "  BatchMode yes\n  LogLevel ERROR\n"
                    % (self.port, os.path.join(tmp, "id"), os.path.join(tmp, "known_hosts")))
        with open(os.path.join(tmp, "known_hosts"), "w") as f:
            f.write("[127.0.0.1]:%d %s\n" % (self.port, " ".join(keys["host_key"].split()[:2])))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines = []
        self._ready(time.monotonic() + DEADLINE)
        threading.Thread(target=self._drain, daemon=True).start()

    def _ready(self, deadline):
        want = "Server listening on 127.0.0.1 port %d" % self.port
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stderr], [], [], left)[0]:
                raise TimeoutError("sshd did not listen: %r" % self.lines)
            chunk = os.read(self.proc.stderr.fileno(), 4096)
            if not chunk:
                raise RuntimeError("sshd exited with %s: %r" % (self.proc.wait(), self.lines))
            buf += chunk
            *done, buf = buf.split(b"\n")
            self.lines += [l.decode(errors="replace") for l in done]
            if any(want in l for l in self.lines):
                return

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def commands(self):
        try:
            with open(self.log_path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        if not exits_within(self.proc.pid, DEADLINE):
            self.proc.kill()
        self.proc.wait()


def bridges(control, connected=False):
    """Pids of `brokerctl bridge --socket CONTROL` processes; with connected, only those that hold a
    socket besides their standard streams (their connection to brokerd)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            if argv[1:] != [b"bridge", b"--socket", control.encode()]:
                continue
            if connected and not any(os.readlink("/proc/%s/fd/%s" % (d, fd)).startswith("socket:")
                                     for fd in os.listdir("/proc/%s/fd" % d) if int(fd) > 2):
                continue
            out.append(int(d))
        except (OSError, ValueError):
            continue
    return out


def over_ssh(sshd, control):
    env = dict(os.environ, BROKERCTL_SSH="ssh -F %s" % sshd.client_config)

    def remote(*args, target="root@test"):
        return subprocess.run([BROKERCTL, "-H", target, "--socket", control, *args], capture_output=True, text=True,
                              timeout=120, env=env)

    def local(*args):
        return subprocess.run([BROKERCTL, "--socket", control, *args], capture_output=True, text=True, timeout=120)

    same_status(control, remote("--json", "status"))
    check(sshd.commands()[-1:] == ["brokerctl bridge --socket %s" % control],
          "the forced command saw `brokerctl bridge --socket PATH` (%r)" % sshd.commands()[-1:])

    # A watch over ssh sees an upgrade made over ssh to its end, and ends with Ctrl-C. It is known
    # to be watching once its remote bridge holds a connection to brokerd and an event made here
    # came through.
    before = set(bridges(control))
    watch = subprocess.Popen([BROKERCTL, "-H", "root@test", "--socket", control, "--json", "watch", "web"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    seen, buf = [], b""

    def read_watch(until, deadline):
        nonlocal buf
        while not any(until(e) for e in seen):
            left = deadline - time.monotonic()
            if left < 0 or not select.select([watch.stdout], [], [], max(left, 0))[0]:
                return False
            chunk = os.read(watch.stdout.fileno(), 65536)  # not readline: select cannot see its buffer
            if not chunk:
                return False
            *lines, buf = (buf + chunk).split(b"\n")
            seen.extend(json.loads(line) for line in lines)
        return True

    deadline = time.monotonic() + DEADLINE
    while not set(bridges(control, connected=True)) - before and time.monotonic() < deadline:
        if exits_within(watch.pid, 0.05):  # waits on the watch, and gives up when it ends
            break
    check(local("restart", "web").returncode == 0, "a restart, for the watch to show")
    check(read_watch(lambda e: e.get("event") == "done", time.monotonic() + DEADLINE),
          "-H watch: the restart's events come over ssh (%r)" % [e.get("event") for e in seen])

    up = remote("upgrade", "web", "--version", "2.0")
    check(up.returncode == 0, "-H upgrade: exit 0 (%d %r)" % (up.returncode, up.stderr))
    done = re.search(r"^web: upgraded to gen (\d+)\b", up.stdout, re.M)
    check(done is not None, "-H upgrade: its progress ends with `web: upgraded to gen N` (%r)" % up.stdout[-300:])
    gen = int(done.group(1)) if done else -1
    gens = [g.get("number") for s in json.loads(local("--json", "status").stdout)["services"] if s["name"] == "web"
            for g in s.get("generations", [])]
    check(gens == [gen], "-H upgrade: brokerd serves gen %d only (%r)" % (gen, gens))
    read_watch(lambda e: e.get("event") == "done" and e.get("generation") == gen, time.monotonic() + DEADLINE)
    events = [e.get("event") for e in seen if e.get("generation") == gen]
    check(events[:1] == ["upgrade"] and events[-1:] == ["done"],
          "-H watch: the upgrade to gen %d streams over ssh, from upgrade to done (%r)" % (gen, events))
    os.killpg(watch.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches brokerctl and its ssh
    check(exits_within(watch.pid, DEADLINE) and watch.wait() == 0, "-H watch: Ctrl-C ends it, exit 0")

    # A uid names a user on brokerd's host, not on this one: over -H, BY shows the number.
    hist = remote("history", "web")
    row = [line.split() for line in hist.stdout.splitlines() if line.split()[:1] == [str(gen)]]
    check(hist.returncode == 0 and row and str(os.geteuid()) in row[0] and "root" not in row[0],
          "-H history: the upgrade's BY is the uid %d, not a name looked up here (%r)" % (os.geteuid(), hist.stdout))

    failed = remote("upgrade", "web", "--exec", "/bin/false")
    check(failed.returncode == 6 and "failed and was rolled back" in failed.stderr,
          "-H upgrade to a program that fails: exit 6, rolled back (%d %r)" % (failed.returncode, failed.stderr))
    check("web/%d/0 failed" % (gen + 1) in failed.stdout,
          "-H failed upgrade: its progress names the failed instance (%r)" % failed.stdout)

    cases = [
        (remote("status", "nope"), 5, "no such service"),
        (subprocess.run([BROKERCTL, "-H", "root@test", "--socket", "/nonexistent/control.sock", "status"],
                        capture_output=True, text=True, timeout=120, env=env), 3, "brokerd is not running"),
        (remote("status", target="root@test:1"), 1, "ssh to root@test:1 failed (exit status 255)"),
    ]
    for r, code, text in cases:
        check(r.returncode == code and text in r.stderr,
              "over ssh: exit %d and %r (got %d, %r)" % (code, text, r.returncode, r.stderr))
    check(sshd.commands()[-1:] == ["brokerctl bridge --socket /nonexistent/control.sock"],
          "the remote --socket reached the remote brokerctl (%r)" % sshd.commands()[-1:])


def body(control):
    tmp = tempfile.mkdtemp(prefix="remote-ssh-")
    os.chmod(tmp, 0o700)
    sshd = None
    try:
        sshd = Sshd(tmp)
        over_ssh(sshd, control)
    finally:
        if sshd:
            sshd.stop()
            if failures:
                print("--- sshd stderr:\n" + "\n".join(sshd.lines), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK) or not shutil.which("ssh"):
        print("SKIPPED: needs root, %s and ssh (Debian packages openssh-server, openssh-client)" % SSHD)
        sys.exit(77)
    sys.exit(run_with_brokerd("remote-ssh-", body))
