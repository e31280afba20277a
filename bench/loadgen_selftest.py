#!/usr/bin/env python3
# loadgen-selftest: broker-loadgen's counts must match, exactly, what a scripted server did to it.
#
# Usage: loadgen_selftest.py PATH/TO/broker-loadgen
#
# The server here handles one connection at a time and broker-loadgen runs with one connection, so
# the n-th request is the n-th thing the script does: answer, answer 500, answer a wrong body, close,
# reset, cut a body short. Then it closes its listener, and the next request is refused.
# Upgrade windows are opened and closed with SIGUSR1/SIGUSR2 while a request is held, and the
# script waits until broker-loadgen has read the signal (it leaves the process's pending set) before
# it answers, so the phase of each request is known too.
#
# No count depends on how fast this machine is: those runs give every request a --timeout far
# beyond any wait here, and each wait is for an event, under a deadline that only bounds a failure.
# Runs of one request each (--rate low enough that no second one starts) cover what needs the
# client to sit still: a request that times out, and a keep-alive connection that the server
# closes, or resets, while it is idle.

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

DEADLINE_S = 10  # for any one wait; the whole test takes about a second
LOAD_TIMEOUT = "60s"  # broker-loadgen's --timeout where no request is meant to time out
ONE_REQUEST_RATE = "0.02"  # --rate of the one-request runs: the second request would start after 50 s


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            fail("the load generator closed before sending a whole request")
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    if not head.startswith("GET / HTTP/1.1\r\n"):
        fail(f"unexpected request: {head!r}")
    return head


def respond(conn, status=200, body=b"hello from selftest gen 1 pid 7\n", close=True, length=None):
    reason = {200: "OK", 500: "Internal Server Error"}.get(status, "X")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
    conn.sendall(head.encode() + body)


def close_clean(conn):
    # The client's FIN ends the exchange, so our close never resets unread input.
    conn.shutdown(socket.SHUT_WR)
    try:
        while conn.recv(4096):
            pass
    except ConnectionResetError:
        pass
    conn.close()


def close_reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def wait_for(cond, what):
    """Polls a /proc or socket state, which nothing can wake us for, until cond() or the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() >= deadline:
            fail(what)
        time.sleep(0.001)


def signal_and_wait(pid, sig):
    """Sends sig and returns once the load generator has read it from its signalfd."""
    os.kill(pid, sig)
    bit = 1 << (sig - 1)

    def taken():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("ShdPnd:"):
                    return not int(line.split()[1], 16) & bit
        return True
    wait_for(taken, f"the load generator did not read signal {sig}")


def wait_delivered(conn):
    """Returns once the peer's kernel acknowledged all we sent (SIOCOUTQ is 0): the bytes are in
    the load generator's socket, so a signal sent now is read after them."""
    wait_for(lambda: struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] == 0,
             "the load generator's kernel did not take our response")


def wait_no_connection(pid):
    """Returns once the load generator holds no socket: it closed the one connection it had."""
    def is_socket(fd):
        # The fd may close between listing and reading it: that is the close awaited.
        try:
            return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            return False

    def none():
        return not any(is_socket(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    wait_for(none, "the load generator did not close its connection")


def start(loadgen, port, mode, *options):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.settimeout(DEADLINE_S)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    opts = list(options) or ["--timeout", LOAD_TIMEOUT]
    proc = subprocess.Popen(
        [loadgen, "--target", f"127.0.0.1:{port}", "--mode", mode, "--connections", "1",
         "--duration", "5m", "--expect", "hello from", "--json"] + opts,
        stdout=subprocess.PIPE, text=True)
    return listener, proc


def accept(listener):
    conn, _ = listener.accept()
    conn.settimeout(DEADLINE_S)
    return conn


def stop_after_a_refusal(proc):
    """Ends the run once at least one request was refused.

    The script's last answer says "Connection: close" on the only connection, after the listener
    closed. broker-loadgen closes that socket and starts its next request, which is refused, in
    the same turn of its loop, before it reads a signal again. So once our side saw its FIN, a
    signal it has read proves the refusal counted: SIGUSR2 (a no-op outside an upgrade window),
    then SIGINT to stop.
    """
    signal_and_wait(proc.pid, signal.SIGUSR2)
    proc.send_signal(signal.SIGINT)


def finish(proc):
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("the load generator did not stop by itself")
    if proc.returncode != 0:
        fail(f"the load generator exited {proc.returncode}")
    return json.loads(out)


def check(result, expected, what):
    ok = True
    for path, want in expected.items():
        got = result
        for key in path.split("."):
            got = got.get(key, "(missing)") if isinstance(got, dict) else "(missing)"
        if got != want:
            print(f"{what}: {path} = {got!r}, expected {want!r}", file=sys.stderr)
            ok = False
    failed = sum(result["failures"].values())
    if result["requests"] != result["ok"] + failed:
        print(f"{what}: {result['requests']} requests != {result['ok']} ok + {failed} failed", file=sys.stderr)
        ok = False
    if not ok:
        print(json.dumps(result, indent=1), file=sys.stderr)
        fail(what)
    print(f"ok - {what}: {result['requests']} requests, {result['ok']} ok, "
          f"{result['failures']['connect_refused']} refused")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_mode(loadgen):
    listener, proc = start(loadgen, free_port(), "close")
    gen2 = b"hello from selftest gen 2 pid 8\n"
    for _ in range(3):                         # 1-3: ok, steady
        conn = accept(listener)
        read_request(conn)
        respond(conn)
        close_clean(conn)
    conn = accept(listener)                    # 4: held while the upgrade window opens
    read_request(conn)
    signal_and_wait(proc.pid, signal.SIGUSR1)
    respond(conn, body=gen2)
    close_clean(conn)
    conn = accept(listener)                    # 5: ok, upgrade
    read_request(conn)
    respond(conn, body=gen2)
    close_clean(conn)
    conn = accept(listener)                    # 6: bad_status, upgrade
    read_request(conn)
    respond(conn, status=500, body=b"hello from an error\n")
    close_clean(conn)
    conn = accept(listener)                    # 7: started in the window, answered after it
    read_request(conn)
    signal_and_wait(proc.pid, signal.SIGUSR2)
    respond(conn, body=gen2)
    close_clean(conn)
    conn = accept(listener)                    # 8: wrong_body, steady from here on
    read_request(conn)
    respond(conn, body=b"nope\n")
    close_clean(conn)
    conn = accept(listener)                    # 9: eof
    read_request(conn)
    close_clean(conn)
    conn = accept(listener)                    # 10: reset
    read_request(conn)
    close_reset(conn)
    conn = accept(listener)                    # 11: a body cut short: wrong_body
    read_request(conn)
    respond(conn, body=b"hello from", length=100)
    close_clean(conn)
    conn = accept(listener)                    # 12: ok, and nothing can queue behind it
    read_request(conn)
    listener.close()
    respond(conn, body=gen2)
    close_clean(conn)
    stop_after_a_refusal(proc)                 # 13 and on: refused
    result = finish(proc)
    refused = result["requests"] - 12
    if refused <= 0:
        fail("close mode: no request was refused")
    check(result, {
        "ok": 7,
        "phases.steady.ok": 4,
        "phases.upgrade.ok": 3,
        "phases.upgrade.failures.bad_status": 1,
        "phases.steady.failures.wrong_body": 2,
        "phases.steady.failures.eof": 1,
        "phases.steady.failures.reset": 1,
        "failures.timeout": 0,
        "failures.connect_refused": refused,
        "failures.connect_other": 0,
        "failures.bad_status": 1,
        "failures.wrong_body": 2,
        "latency_us.steady.count": 4,
        "latency_us.upgrade.count": 3,
        "upgrade_windows": 1,
        "generations_seen": [1, 2],
        "pids_seen": 2,
        "connections_opened": result["requests"],
    }, "close mode")


def keepalive_mode(loadgen):
    listener, proc = start(loadgen, free_port(), "keepalive")
    conn = accept(listener)                    # connection A: 3 answers kept alive,
    for _ in range(3):
        read_request(conn)
        respond(conn, close=False)
    read_request(conn)                         # then one that says "Connection: close"
    respond(conn, close=True)
    close_clean(conn)
    conn = accept(listener)                    # B: the client reconnected without a failure
    for _ in range(2):
        read_request(conn)
        respond(conn, close=False)
    read_request(conn)                         # a reset with a request outstanding
    close_reset(conn)
    conn = accept(listener)                    # C: EOF with a request outstanding
    read_request(conn)
    close_clean(conn)
    conn = accept(listener)                    # D: the last answer, then refused
    read_request(conn)
    listener.close()
    respond(conn, close=True)
    close_clean(conn)
    stop_after_a_refusal(proc)
    result = finish(proc)
    refused = result["requests"] - 9
    if refused <= 0:
        fail("keepalive mode: no request was refused")
    check(result, {
        "ok": 7,
        "failures.reset": 1,
        "failures.eof": 1,
        "failures.connect_refused": refused,
        "failures.connect_other": 0,
        "failures.timeout": 0,
        "failures.bad_status": 0,
        "failures.wrong_body": 0,
        "idle_closes": 0,
        "idle_resets": 0,
        "connections_opened": 4 + refused,
        "latency_us.steady.count": 7,
    }, "keepalive mode")


def one_request(loadgen, mode, options, serve):
    """A run in which the load generator makes one request only: serve(conn, proc) plays the
    server's part on its connection and returns once the load generator is done with it; then
    SIGINT stops the run (nothing is in flight by then)."""
    listener, proc = start(loadgen, free_port(), mode, "--rate", ONE_REQUEST_RATE, *options)
    conn = accept(listener)
    read_request(conn)
    serve(conn, proc)
    listener.close()
    proc.send_signal(signal.SIGINT)
    return finish(proc)


def timeout_run(loadgen):
    def stall(conn, proc):
        if conn.recv(4096) != b"":             # the client gives up and closes
            fail("expected the load generator to close the stalled connection")
        conn.close()
    result = one_request(loadgen, "close", ["--timeout", "300ms"], stall)
    check(result, {"requests": 1, "ok": 0, "phases.steady.failures.timeout": 1,
                   "latency_us.steady.count": 0}, "a request never answered times out")


def idle_close_run(loadgen):
    def answer_then_close(conn, proc):
        respond(conn, close=False)
        wait_delivered(conn)
        signal_and_wait(proc.pid, signal.SIGUSR2)  # it read the answer: the connection is idle
        close_clean(conn)                          # our FIN; its close ends close_clean
    result = one_request(loadgen, "keepalive", ["--timeout", LOAD_TIMEOUT], answer_then_close)
    check(result, {"requests": 1, "ok": 1, "idle_closes": 1, "idle_resets": 0,
                   "phases.steady.idle_closes": 1, "connections_opened": 1},
          "a clean FIN on an idle keep-alive connection is an orderly close")


def idle_reset_run(loadgen):
    def answer_then_reset(conn, proc):
        signal_and_wait(proc.pid, signal.SIGUSR1)  # the window opens while the request is held
        respond(conn, close=False)
        wait_delivered(conn)
        signal_and_wait(proc.pid, signal.SIGUSR1)  # a no-op in a window: it read the answer
        close_reset(conn)
        wait_no_connection(proc.pid)
    result = one_request(loadgen, "keepalive", ["--timeout", LOAD_TIMEOUT], answer_then_reset)
    check(result, {"requests": 1, "ok": 1, "phases.upgrade.ok": 1, "idle_resets": 1, "idle_closes": 0,
                   "phases.upgrade.idle_resets": 1, "errno.idle_reset": {"ECONNRESET": 1},
                   "upgrade_windows": 1, "connections_opened": 1},
          "a reset of an idle keep-alive connection is a failure")


def usage_errors(loadgen):
    for args in (["--target", "192.0.2.1:80"], ["--target", "127.0.0.1:80", "--duration", "soon"],
                 ["--target", "127.0.0.1:0"], ["--target", "127.0.0.1:80", "--mode", "pipeline"], []):
        r = subprocess.run([loadgen] + args, capture_output=True, timeout=DEADLINE_S)
        if r.returncode != 2:
            fail(f"{args}: exit {r.returncode}, expected 2 (usage)")
    print("ok - usage errors exit 2")


def main():
    if len(sys.argv) != 2:
        print("usage: loadgen_selftest.py BROKER_LOADGEN", file=sys.stderr)
        return 2
    loadgen = sys.argv[1]
    usage_errors(loadgen)
    close_mode(loadgen)
    keepalive_mode(loadgen)
    timeout_run(loadgen)
    idle_close_run(loadgen)
    idle_reset_run(loadgen)
    print("6 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
