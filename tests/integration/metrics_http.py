#!/usr/bin/env python3
"""metrics.listen: GET /metrics over HTTP from brokerd's loop, and the limits nothing a peer sends
gets past: a 16-connection cap (the 17th is closed at once, the first still answered), a 4 KiB
head (431), 10 s from accept to the end (a silent peer is closed), exactly GET /metrics (405 with
Allow, 404), no fd kept after 1000 scrapes, the endpoint carried over a reexec; on a unix endpoint,
a peer below the reader tier gets 403.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

from checks import check, run_with_brokerd
from fd_holder import until
from fdstore_harness import free_port
from metrics import NOBODY, OUTSIDER, brokerctl, promtool_clean

WAIT = 20
HTTP_TIMEOUT = 10  # brokerd's: from accept to the end of the exchange
PORT = free_port()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exchange(request, port=PORT, timeout=WAIT):
    """(status, headers, body) of one request on a new connection, read to brokerd's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return read_response(s)


def read_response(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    parts = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None), headers, body.decode(errors="replace")


def get(path="/metrics", version="HTTP/1.1", port=PORT):
    return exchange(("GET %s %s\r\nHost: test\r\nUser-Agent: prometheus-test\r\n\r\n" % (path, version)).encode(), port)


def families(text):
    return sorted(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def tcp_config(tmp, control):
    return {"control": {"path": control},
            "sockets": {"http": {"listen": "tcp://127.0.0.1:0"}},
            "services": {"web": {"exec": ["/bin/sleep", "infinity"], "sockets": ["http"], "ready": "exec"}},
            "metrics": {"listen": "tcp://127.0.0.1:%d" % PORT}}


def brokerd_pid():
    """The brokerd this script started, found without a connection of its own to count."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and os.readlink("/proc/%s/exe" % d) == os.path.realpath(os.environ["BROKERD"]):
                    return int(d)
            except (OSError, ValueError):
                continue
    raise RuntimeError("no brokerd below this script")


def fds(pid):
    return {fd: os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)}


def tcp_checks(control):
    pid = brokerd_pid()
    before = fds(pid)
    code, headers, body = get()
    # The first deadline timer makes sd-event open its CLOCK_MONOTONIC timerfd, kept for good;
    # the connection itself is gone once brokerd read the close.
    check(until(lambda: all(v == "anon_inode:[timerfd]" for k, v in fds(pid).items() if before.get(k) != v)),
          "after the first scrape brokerd holds its fds and sd-event's timerfd only")
    base = fd_count(pid)
    check(code == 200, "GET /metrics: 200 (%r)" % code)
    check(headers.get("content-type") == CONTENT_TYPE, "Content-Type: %s (%r)" % (CONTENT_TYPE, headers.get("content-type")))
    check(headers.get("connection") == "close" and headers.get("content-length") == str(len(body.encode())),
          "Connection: close, and Content-Length is the body's")
    promtool_clean(body, "GET /metrics")
    _, via_varlink, _ = brokerctl(control, "metrics")
    check(families(body) == families(via_varlink) and len(families(body)) >= 20,
          "the same %d families as brokerctl metrics" % len(families(body)))
    check(get(version="HTTP/1.0")[0] == 200, "HTTP/1.0: 200")
    check(get("/metrics?x=1")[0] == 200, "a query string is ignored: 200")

    code, headers, _ = exchange(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    check(code == 405 and headers.get("allow") == "GET", "POST: 405 with Allow: GET (%r %r)" % (code, headers))
    check(get("/")[0] == 404, "GET /: 404")
    check(get("/metricsx")[0] == 404, "GET /metricsx: 404")
    check(exchange(b"GET /metrics\r\n\r\n")[0] == 400, "a request line without a version: 400")
    check(exchange(b"GET /metrics HTTP/2.0\r\n\r\n")[0] == 400, "HTTP/2.0: 400")
    big = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 5120 + b"\r\n\r\n"
    check(exchange(big)[0] == 431, "a 5 KiB head: 431")
    check(exchange(b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 5120)[0] == 431,
          "5 KiB without the end of the head: 431 at once, not at the deadline")

    # 16 idle connections take every slot; the 17th is closed at once, the first is still answered.
    idle = [socket.create_connection(("127.0.0.1", PORT), timeout=WAIT) for _ in range(16)]
    check(until(lambda: fd_count(pid) >= base + 16), "brokerd accepted the 16")
    extra = socket.create_connection(("127.0.0.1", PORT), timeout=HTTP_TIMEOUT / 2)
    try:
        eof = extra.recv(1) == b""
    except (socket.timeout, ConnectionResetError) as e:
        eof = isinstance(e, ConnectionResetError)
    check(eof, "the 17th connection is closed at once (well within the 10 s deadline)")
    extra.close()
    idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    check(read_response(idle[0])[0] == 200, "the first of the 16 is still answered")
    # A silent one is closed at the deadline: within 10 s of its accept, and a margin.
    idle[1].settimeout(HTTP_TIMEOUT + 5)
    started = time.monotonic()
    try:
        closed = idle[1].recv(1) == b""
    except socket.timeout:
        closed = False
    check(closed, "a silent connection is closed by brokerd within 10 s + 5 s (after %.1f s)" % (time.monotonic() - started))
    for s in idle:
        s.close()

    check(until(lambda: fd_count(pid) == base), "brokerd holds no connection any more (%d fds, %d before)" % (fd_count(pid), base))
    for n in range(1, 1001):
        try:
            code = get()[0]
        except OSError as e:
            code = "%s at scrape %d" % (e, n)
        if code != 200:
            break
    check(code == 200, "1000 scrapes answered (%s)" % code)
    check(fd_count(pid) <= base + 16, "right after them brokerd holds at most its 16 connections (%d fds)" % fd_count(pid))
    check(until(lambda: fd_count(pid) == base), "after 1000 scrapes brokerd has the fds it had (%d, %d before)" % (fd_count(pid), base))

    # brokerctl reexec carries the endpoint over: the same listening socket serves on.
    rc, _, err = brokerctl(control, "reexec")
    check(rc == 0, "brokerctl reexec (%d %s)" % (rc, err))
    check(get()[0] == 200, "after the reexec: GET /metrics: 200")


def unix_config(tmp, control):
    os.chmod(tmp, 0o755)
    return {"control": {"path": control, "read_users": ["nobody"]},
            "metrics": {"listen": "unix:" + os.path.join(tmp, "metrics.sock")}}


GET_AS = r"""
import os, socket, sys
uid = int(sys.argv[2])
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n", 1)[0].decode())
"""


def unix_checks(control):
    path = os.path.join(os.path.dirname(control), "metrics.sock")
    for uid, want, who in ((0, "HTTP/1.1 200 OK", "root"), (NOBODY, "HTTP/1.1 200 OK", "a reader"),
                           (OUTSIDER, "HTTP/1.1 403 Forbidden", "a user of no tier")):
        p = subprocess.run([sys.executable, "-c", GET_AS, path, str(uid)], capture_output=True, text=True, timeout=WAIT)
        check(p.stdout.strip() == want, "unix endpoint, %s: %s (%r %r)" % (who, want, p.stdout.strip(), p.stderr[-200:]))


def main():
    if shutil.which("promtool") is None:
        print("promtool is missing (package prometheus): skipped")
        return 77
    rc = run_with_brokerd("brokerd-metrics-http.", tcp_checks, tcp_config)
    return run_with_brokerd("brokerd-metrics-unix.", unix_checks, unix_config) or rc


if __name__ == "__main__":
    sys.exit(main())
