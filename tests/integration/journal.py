#!/usr/bin/env python3
"""Workers' output in the journal: each line one native message with the service's fields, and a
full journal that slows the worker writing, never brokerd.

Run as `unshare --mount --propagation private python3 journal.py` (root): a tmpfs on /run in this
private mount namespace holds a fake journald at /run/systemd/journal/socket (and .../stdout, which
must stay unused), so the host's journal is untouched. brokerd's stderr is a file, and
JOURNAL_STREAM names it, as systemd would name its journal stream: what logging.journal "auto" checks.
"""

import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

from checks import Strays, check, failures, passes

BROKERD = os.environ["BROKERD"]
BROKERCTL = os.environ["BROKERCTL"]
TIMEOUT = 20.0
CHATTY_LINES = 20000  # about 2 MB: more than the worker's 1 MiB pipe and brokerd's reads hold
PAD = "x" * 90


def parse_native(data):
    """The fields of one native datagram: KEY=value lines, or KEY\\n<le64 length>value\\n."""
    fields = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n", "no newline after a binary field"
            i = nl + 10 + n
        fields[k.decode()] = v.decode(errors="replace")
    return fields


class FakeJournal:
    """journald's two sockets: messages read from the native one only when asked."""

    def __init__(self):
        os.makedirs("/run/systemd/journal", exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("/run/systemd/journal/socket")
        self.sock.setblocking(False)
        self.stdout = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stdout.bind("/run/systemd/journal/stdout")
        self.stdout.listen(16)
        self.stdout.setblocking(False)
        self.records = []

    def read(self):
        while True:
            try:
                self.records.append(parse_native(self.sock.recv(1 << 17)))
            except BlockingIOError:
                return

    def until(self, predicate, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            self.read()
            if predicate(self.records):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.sock], [], [], min(left, 0.5))

    def stream_connections(self):
        try:
            conn, _ = self.stdout.accept()
            conn.close()
            return 1
        except BlockingIOError:
            return 0


def lines_of(records, **fields):
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


class Brokerd:
    def __init__(self, tmp, name, config, journal_stream=True):
        self.control = os.path.join(tmp, name + ".sock")
        config["control"] = {"path": self.control}
        self.config_path = os.path.join(tmp, name + ".json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.stderr_path = os.path.join(tmp, name + ".stderr")
        self.stdout_path = os.path.join(tmp, name + ".stdout")
        err = open(self.stderr_path, "w")
        out = open(self.stdout_path, "w")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        if journal_stream:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        self.proc = subprocess.Popen([BROKERD, "--config", self.config_path], stdout=out, stderr=err, env=env)
        err.close()
        out.close()

    def ctl(self, *args, timeout=60):
        return subprocess.run([BROKERCTL, "--socket", self.control, *args], capture_output=True, text=True,
                              timeout=timeout)

    def status(self):
        r = self.ctl("--json", "status")
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def instances(self, service):
        for svc in self.status().get("services", []):
            if svc.get("name") == service:
                return [i for g in svc["generations"] for i in g["instances"]]
        return []

    def wait_ready(self, service, count=1):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if len([i for i in self.instances(service) if i["state"] == "ready"]) >= count:
                return True
            time.sleep(0.05)
        return False

    def stderr(self):
        with open(self.stderr_path) as f:
            return f.read()

    def stdout(self):
        with open(self.stdout_path) as f:
            return f.read()

    def stop(self, strays):
        strays.note(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wchan(pid):
    try:
        with open("/proc/%d/wchan" % pid) as f:
            return f.read()
    except OSError:
        return ""


def run_auto(tmp, fake, strays):
    fifo = os.path.join(tmp, "go")
    os.mkfifo(fifo)
    chatty = ('read x < %s; i=0; while [ $i -lt %d ]; do printf "chatty %%05d %s\\n" $i; i=$((i+1)); done; '
              'echo chatty-done; exec sleep 1000') % (fifo, CHATTY_LINES, PAD)
    b = Brokerd(tmp, "auto", {"services": {
        "web": {"exec": ["/bin/sh", "-c", "echo '<3>boom'; echo plain; echo on-stderr >&2; exec sleep 1000"]},
        "chatty": {"exec": ["/bin/sh", "-c", chatty]}}})
    try:
        check(b.wait_ready("web") and b.wait_ready("chatty"), "brokerd runs web and chatty")
        web = b.instances("web")[0]
        check(fake.until(lambda r: len(lines_of(r, BROKER_SERVICE="web")) >= 3),
              "web's three lines reach the journal")
        boom = lines_of(fake.records, MESSAGE="boom")
        check(len(boom) == 1 and {k: boom[0].get(k) for k in
                                  ("PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY", "BROKER_SERVICE",
                                   "BROKER_INSTANCE", "BROKER_GENERATION", "BROKER_STREAM", "OBJECT_PID")} ==
              {"PRIORITY": "3", "SYSLOG_IDENTIFIER": "web", "SYSLOG_FACILITY": "3", "BROKER_SERVICE": "web",
               "BROKER_INSTANCE": "web/1/0", "BROKER_GENERATION": "1", "BROKER_STREAM": "stdout",
               "OBJECT_PID": str(web["pid"])},
              "<3>boom: PRIORITY=3, MESSAGE=boom and the instance's fields: %s" % boom)
        plain = lines_of(fake.records, MESSAGE="plain", BROKER_INSTANCE="web/1/0")
        check(len(plain) == 1 and plain[0]["PRIORITY"] == "6", "a plain line has PRIORITY=6: %s" % plain)
        err = lines_of(fake.records, MESSAGE="on-stderr", BROKER_INSTANCE="web/1/0")
        check(len(err) == 1 and err[0]["PRIORITY"] == "6" and err[0]["BROKER_STREAM"] == "stderr",
              "a stderr line: PRIORITY=6, BROKER_STREAM=stderr: %s" % err)

        r = b.ctl("upgrade", "web")
        check(r.returncode == 0, "upgrade web: %s" % r.stderr.strip())
        gen2 = [i for i in b.instances("web") if i["id"] == "web/2/0"]
        check(fake.until(lambda r: len(lines_of(r, MESSAGE="boom", BROKER_GENERATION="2")) == 1) and
              lines_of(fake.records, MESSAGE="boom", BROKER_GENERATION="2")[0]["BROKER_INSTANCE"] == "web/2/0" and
              gen2 and lines_of(fake.records, MESSAGE="boom", BROKER_GENERATION="2")[0]["OBJECT_PID"] ==
              str(gen2[0]["pid"]),
              "after the upgrade, generation 2's line names web/2/0 and its pid")

        # The journal stops reading; chatty writes 2 MB.
        chatty_pid = b.instances("chatty")[0]["pid"]
        with open(fifo, "w") as f:
            f.write("go\n")
        deadline = time.monotonic() + TIMEOUT
        while not wchan(chatty_pid).endswith("pipe_write") and time.monotonic() < deadline:
            time.sleep(0.05)
        check(wchan(chatty_pid).endswith("pipe_write"),
              "while the journal is full, chatty waits in pipe_write (wchan %r)" % wchan(chatty_pid))
        t0 = time.monotonic()
        try:
            code = b.ctl("status", timeout=10).returncode
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        check(code == 0 and took < 2.0,
              "brokerctl status answers while the journal is full (exit %s, %.2f s)" % (code, took))
        check(wchan(chatty_pid).endswith("pipe_write"), "chatty still waits in pipe_write after the status call")

        check(fake.until(lambda r: len(lines_of(r, MESSAGE="chatty-done")) == 1, timeout=60),
              "once the journal reads again, chatty's last line arrives")
        got = [r["MESSAGE"] for r in lines_of(fake.records, BROKER_SERVICE="chatty")]
        want = ["chatty %05d %s" % (i, PAD) for i in range(CHATTY_LINES)] + ["chatty-done"]
        first_bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
        check(got == want, "all %d lines arrive once, in order (got %d; first difference at %s)" %
              (len(want), len(got), first_bad))

        run_events(b, fake)
        check(fake.stream_connections() == 0, "nothing connected to the journal's stdout socket")
        stderr = b.stderr()
        check(not any(w in stderr for w in ("boom", "plain", "on-stderr", "chatty 0", "chatty-done")),
              "no worker line in brokerd's stderr:\n" + stderr)
        check(b.stdout() == "", "nothing in brokerd's stdout")
    finally:
        b.stop(strays)
    check(fake.until(lambda recs: len(lines_of(recs, MESSAGE_ID=SHUTDOWN)) == 1) and
          lines_of(fake.records, MESSAGE_ID=SHUTDOWN)[0].get("BROKER_TIMEOUT_USEC") == "90000000",
          "the shutdown's record arrives, with its budget")


# broker/os/journal_ids.hpp: made once, never changed.
UPGRADE_STARTED = "2e075133398a40b8b52299ec427fcaba"
UPGRADE_DONE = "251588f3b085418aa6cf8a1ce9d04766"
UPGRADE_ROLLED_BACK = "cd85e4c538c14a708227e1ba82f96b79"
UPGRADE_FAILED = "7a3f2471fab84ffa9849fe046c63f17a"
REEXEC = "8392b54eee5b4f09a3397c76753d0fa5"
RELOAD = "2147d59758954092818a74c761079bd6"
SHUTDOWN = "800c4727f72c4c3da713a455d7763410"


def run_events(b, fake):
    """brokerd's own events: one native message each, with its MESSAGE_ID and fields."""
    started = lines_of(fake.records, MESSAGE_ID=UPGRADE_STARTED, BROKER_GENERATION="2")
    check(len(started) == 1 and started[0].get("BROKER_FROM_GENERATION") == "1" and
          started[0].get("BROKER_UPGRADE_KIND") == "upgrade" and started[0].get("BROKER_SERVICE") == "web" and
          started[0].get("BROKER_REQUESTED_UID") == str(os.geteuid()),
          "the upgrade's start: its id, generations, kind and who asked: %s" % started)
    done = lines_of(fake.records, MESSAGE_ID=UPGRADE_DONE, BROKER_GENERATION="2")
    check(len(done) == 1 and done[0].get("BROKER_RESULT") == "done" and
          done[0].get("BROKER_DURATION_USEC", "").isdigit() and int(done[0]["BROKER_DURATION_USEC"]) > 0,
          "the upgrade's end: done, with a numeric BROKER_DURATION_USEC: %s" % done)

    r = b.ctl("upgrade", "web", "--exec", "/nonexistent/worker")
    check(r.returncode == 6, "a failing upgrade exits 6 (%d)" % r.returncode)
    check(fake.until(lambda recs: len(lines_of(recs, MESSAGE_ID=UPGRADE_ROLLED_BACK)) == 1),
          "the rolled-back record arrives")
    failed = lines_of(fake.records, MESSAGE_ID=UPGRADE_FAILED, BROKER_GENERATION="3")
    back = lines_of(fake.records, MESSAGE_ID=UPGRADE_ROLLED_BACK, BROKER_GENERATION="3")
    check(len(failed) == 1 and failed[0].get("BROKER_RESULT") == "failed" and failed[0]["PRIORITY"] == "4",
          "the failure that turns the upgrade back has its own id: %s" % failed)
    check(len(back) == 1 and back[0].get("BROKER_RESULT") == "rolled-back" and
          back[0].get("BROKER_DURATION_USEC", "").isdigit() and back[0].get("BROKER_FROM_GENERATION") == "2",
          "rolled back: its own id, result and duration: %s" % back)

    r = b.ctl("reload")
    check(r.returncode == 0, "reload: %s" % r.stderr.strip())
    check(fake.until(lambda recs: len(lines_of(recs, MESSAGE_ID=RELOAD)) == 1), "the reload's record arrives")
    r = b.ctl("reexec")
    check(r.returncode == 0, "reexec: %s" % r.stderr.strip())
    check(fake.until(lambda recs: len(lines_of(recs, MESSAGE_ID=REEXEC)) == 1) and
          lines_of(fake.records, MESSAGE_ID=REEXEC)[0].get("SYSLOG_IDENTIFIER") == "brokerd",
          "the new brokerd's reexec record arrives, from brokerd")
    stderr = b.stderr()
    check("reloaded " not in stderr and "re-executed:" not in stderr,
          "no stderr copy of the reload and reexec records")
    check(not any(w in stderr for w in ("now at gen", "rolling back", "rolled back to gen")),
          "no stderr copy of the upgrades' records:\n" + stderr)


def run_never(tmp, fake, strays):
    fake.read()
    before = len(fake.records)
    b = Brokerd(tmp, "never", {"logging": {"journal": "never"}, "services": {
        "web": {"exec": ["/bin/sh", "-c", "echo '<3>boom'; echo on-stderr >&2; exec sleep 1000"]}}})
    try:
        check(b.wait_ready("web"), "never: brokerd runs web")
        deadline = time.monotonic() + TIMEOUT
        while "web/1/0: on-stderr" not in b.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        check("web/1/0: on-stderr" in b.stderr(), "never: the stderr line is on brokerd's stderr, prefixed")
        check("web/1/0: <3>boom" in b.stdout(), "never: the stdout line is on brokerd's stdout, as written")
        r = b.ctl("restart", "web")
        check(r.returncode == 0, "never: restart: %s" % r.stderr.strip())
        lines = b.stderr().splitlines()
        started = [line for line in lines if "from gen 1 to gen 2" in line]
        ended = [line for line in lines if "gen 2 done" in line or "now at gen 2" in line]
        check(len(started) == 1 and len(ended) == 1,
              "never: the restart's start and its end are one stderr line each: %s" % (started + ended))
    finally:
        b.stop(strays)
    fake.read()
    check(len(fake.records) == before, "never: nothing reached the journal (%d new)" % (len(fake.records) - before))


def run_always(tmp, fake, strays):
    b = Brokerd(tmp, "always", {"logging": {"journal": "always"}, "services": {
        "web": {"exec": ["/bin/sh", "-c", "echo always-line; exec sleep 1000"]}}}, journal_stream=False)
    try:
        check(b.wait_ready("web"), "always: brokerd runs web")
        check(fake.until(lambda r: len(lines_of(r, MESSAGE="always-line", BROKER_INSTANCE="web/1/0")) == 1),
              "always: without JOURNAL_STREAM, the line reaches the journal")
    finally:
        b.stop(strays)


def main():
    if os.geteuid() != 0:
        print("SKIP: needs root for a mount namespace")
        return 77
    if os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/%d/ns/mnt" % os.getppid()):
        print("refusing to run outside a private mount namespace: run under unshare --mount --propagation private")
        return 1
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    strays = Strays()
    fake = FakeJournal()
    with tempfile.TemporaryDirectory() as tmp:
        run_auto(tmp, fake, strays)
        run_never(tmp, fake, strays)
        run_always(tmp, fake, strays)
    strays.check("three brokerd runs")
    print("%d passed, %d failed" % (len(passes), len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
