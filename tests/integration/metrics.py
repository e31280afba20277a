#!/usr/bin/env python3
"""brokerctl metrics: brokerd's metrics in the Prometheus text format, checked by promtool and by
exact values against what the test made happen.

Services: web (2 Python example workers on a TCP socket; one upgrade done, one rolled back), bad
(exits at once, restart always: a crash loop), idle (stopped, with 3 connections waiting on its
unix socket and 2 on its TCP one). The metrics are read with `brokerctl metrics` as root, then
again after `brokerctl reexec` (the counters carry over), and by a reader and a worker-tier user.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

from checks import check, run_with_brokerd
from fd_holder import until

BROKERCTL = os.environ["BROKERCTL"]
WORKER = os.environ["EXAMPLE_PYTHON"]
WAIT = 20  # seconds, for any one event
NOBODY = 65534   # control.read_users names it
OUTSIDER = 65533  # no tier but worker's

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def parse(text):
    """{(name, ((label, value), ...) sorted): value} of every sample line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            raise ValueError("not a sample line: %r" % line)
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                              for k, v in LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def brokerctl(control, *args, uid=None):
    """(exit status, stdout, stderr) of brokerctl --socket control ARGS, as uid if given."""
    def drop():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    p = subprocess.run([BROKERCTL, "--socket", control] + list(args), capture_output=True, text=True,
                       timeout=WAIT, preexec_fn=drop if uid is not None else None)
    return p.returncode, p.stdout, p.stderr


def scrape(control):
    rc, out, err = brokerctl(control, "metrics")
    check(rc == 0 and err == "", "brokerctl metrics exits 0 and says nothing on stderr (%d, %r)" % (rc, err))
    return out


def promtool_clean(text, label):
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=WAIT)
    check(p.returncode == 0 and p.stdout == "" and p.stderr == "",
          "%s: promtool check metrics passes it, silent (%d, %r %r)" % (label, p.returncode, p.stdout, p.stderr))


def status(control):
    rc, out, _ = brokerctl(control, "--json", "status")
    return json.loads(out) if rc == 0 else {}


def service(st, name):
    return next((s for s in st.get("services", []) if s["name"] == name), {})


def brokerd_pid(control):
    return status(control).get("pid")


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def start_time(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def soft_nofile(pid):
    with open("/proc/%d/limits" % pid) as f:
        return int(next(line for line in f if line.startswith("Max open files")).split()[3])


def make_config(tmp, control):
    os.chmod(tmp, 0o755)  # nobody reaches the control socket in it
    return {"control": {"path": control, "read_users": ["nobody"]},
            "sockets": {"http": {"listen": "tcp://127.0.0.1:0", "backlog": 64},
                        "queue": {"listen": "unix:" + os.path.join(tmp, "queue.sock"), "backlog": 7},
                        "parked": {"listen": "tcp://127.0.0.1:0", "backlog": 5}},
            "services": {"web": {"exec": [sys.executable, WORKER], "sockets": ["http"], "instances": 2,
                                 "ready": "notify"},
                         "bad": {"exec": ["/bin/false"], "ready": "exec", "restart": "always"},
                         "idle": {"exec": ["/bin/sleep", "infinity"], "sockets": ["queue", "parked"],
                                  "ready": "exec"}}}


def connect_queue(tmp, parked_port):
    clients = []
    for _ in range(3):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(os.path.join(tmp, "queue.sock"))
        clients.append(c)
    for _ in range(2):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(("127.0.0.1", parked_port))
        clients.append(c)
    return clients


def check_values(text, label, control, version):
    s = parse(text)
    want = [
        ("brokerd_build_info", {"version": version}, 1),
        ("brokerd_services", {"state": "running"}, 1),
        ("brokerd_services", {"state": "stopped"}, 1),
        ("brokerd_services", {"state": "failed"}, 1),
        ("brokerd_instances", {"service": "web", "state": "ready"}, 2),
        ("brokerd_instances", {"service": "web", "state": "starting"}, 0),
        ("brokerd_instances", {"service": "bad", "state": "failed"}, 1),
        ("brokerd_service_generation", {"service": "web"}, 2),
        ("brokerd_service_upgrade_in_progress", {"service": "web"}, 0),
        ("brokerd_instance_restarts_total", {"service": "bad"}, 5),
        ("brokerd_instance_restarts_total", {"service": "web"}, 0),
        ("brokerd_crash_loops_total", {"service": "bad"}, 1),
        ("brokerd_crash_loops_total", {"service": "web"}, 0),
        ("brokerd_upgrades_total", {"service": "web", "kind": "upgrade", "result": "done"}, 1),
        ("brokerd_upgrades_total", {"service": "web", "kind": "upgrade", "result": "rolled-back"}, 1),
        ("brokerd_rollbacks_total", {"service": "web"}, 1),
        ("brokerd_upgrade_duration_seconds_count", {"service": "web", "result": "done"}, 1),
        ("brokerd_upgrade_duration_seconds_bucket", {"service": "web", "result": "done", "le": "+Inf"}, 1),
        ("brokerd_upgrade_duration_seconds_count", {"service": "web", "result": "rolled-back"}, 1),
        ("brokerd_handoff_handed_connections_total", {"service": "web"}, 0),
        ("brokerd_handoff_abandoned_connections_total", {}, 0),
        ("brokerd_listener_accept_queue_length", {"socket": "queue"}, 3),
        ("brokerd_listener_accept_queue_limit", {"socket": "queue"}, 7),
        ("brokerd_listener_accept_queue_length", {"socket": "parked"}, 2),
        ("brokerd_listener_accept_queue_limit", {"socket": "parked"}, 5),
        ("brokerd_listener_accept_queue_length", {"socket": "http"}, 0),
        ("brokerd_listener_accept_queue_limit", {"socket": "http"}, 64),
        ("brokerd_listener_drops_total", {"socket": "http"}, 0),
        ("brokerd_listener_drops_total", {"socket": "queue"}, None),  # a unix listener keeps no count
        # brokerctl's own connection, and the Watch this test holds.
        ("brokerd_control_connections", {"role": "root"}, 2),
        ("brokerd_control_connections", {"role": "reader"}, 0),
        ("brokerd_journal_dropped_messages_total", {}, 0),
    ]
    for name, labels, expected in want:
        got = value(s, name, **labels)
        check(got == expected, "%s: %s%s is %r (got %r)" % (label, name, labels, expected, got))
    duration = value(s, "brokerd_upgrade_duration_seconds_sum", service="web", result="done")
    check(duration is not None and 0 < duration < 60, "%s: the done upgrade's duration is there (%r)" % (label, duration))
    pid = brokerd_pid(control)
    fds = value(s, "process_open_fds")
    now = fd_count(pid)
    # The scrape's own connection was open while brokerd counted.
    check(fds in (now, now + 1), "%s: process_open_fds %r is /proc's count %d (+1 for the scrape)" % (label, fds, now))
    check(value(s, "process_max_fds") == soft_nofile(pid),
          "%s: process_max_fds is the soft RLIMIT_NOFILE %d" % (label, soft_nofile(pid)))
    started = value(s, "process_start_time_seconds")
    check(started is not None and abs(started - start_time(pid)) < 0.001,
          "%s: process_start_time_seconds %r is /proc's %r" % (label, started, start_time(pid)))
    rss = value(s, "process_resident_memory_bytes")
    check(rss is not None and 1 << 20 < rss < 1 << 30, "%s: process_resident_memory_bytes %r is plausible" % (label, rss))
    check(value(s, "process_cpu_seconds_total") is not None, "%s: process_cpu_seconds_total is there" % label)


def watch_and_check(control, label, version):
    """Opens a Watch (a second root connection), then scrapes and checks; returns the Watch."""
    w = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    w.connect(control)
    w.sendall(json.dumps({"method": "io.brokerd.Control.Watch", "more": True}).encode() + b"\0")
    # The Watch is accepted once brokerd has read its call: its first event would come later.
    check(until(lambda: value(parse(brokerctl(control, "metrics")[1]), "brokerd_control_connections",
                              role="root") == 2), "%s: the Watch connection is counted" % label)
    text = scrape(control)
    promtool_clean(text, label)
    check_values(text, label, control, version)
    return w


def run_checks(control):
    tmp = os.path.dirname(control)
    version = status(control).get("version")
    check(until(lambda: service(status(control), "bad").get("state") == "failed"),
          "bad crash-loops and is failed")
    rc, _, err = brokerctl(control, "stop", "idle")
    check(rc == 0, "idle is stopped (%d %s)" % (rc, err))
    rc, _, err = brokerctl(control, "upgrade", "web")
    check(rc == 0, "an upgrade of web is done (%d %s)" % (rc, err))
    rc, _, err = brokerctl(control, "upgrade", "web", "--exec", "/bin/false")
    check(rc == 6, "an upgrade of web to /bin/false rolls back, exit 6 (%d %s)" % (rc, err))
    parked = next(s for s in status(control)["sockets"] if s["name"] == "parked")["address"]
    clients = connect_queue(tmp, int(parked.rsplit(":", 1)[1]))
    watch = watch_and_check(control, "root's scrape", version)

    rc, out, _ = brokerctl(control, "--json", "metrics")
    reply = json.loads(out) if rc == 0 else {}
    check(rc == 0 and reply.get("truncated") is False and "brokerd_build_info" in reply.get("text", ""),
          "brokerctl --json metrics prints the reply: text and truncated false")

    rc, out, err = brokerctl(control, "metrics", uid=NOBODY)
    check(rc == 0 and "brokerd_build_info" in out, "a reader may read the metrics (%d %s)" % (rc, err))
    rc, out, err = brokerctl(control, "metrics", uid=OUTSIDER)
    check(rc == 4 and out == "", "a user of no tier may not: exit 4 (%d %r)" % (rc, err))

    # The counters carry over a reexec; the gauges are read afresh.
    before = status(control).get("pid")
    rc, _, err = brokerctl(control, "reexec")
    check(rc == 0, "brokerctl reexec (%d %s)" % (rc, err))
    check(status(control).get("pid") == before, "the same brokerd process carries on")
    watch.close()
    watch_and_check(control, "after the reexec", version).close()
    for c in clients:
        c.close()


def main():
    if shutil.which("promtool") is None:
        print("promtool is missing (package prometheus): skipped")
        return 77
    return run_with_brokerd("brokerd-metrics.", run_checks, make_config)


if __name__ == "__main__":
    sys.exit(main())
