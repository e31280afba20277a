#!/usr/bin/env python3
"""A worker that tries its own token the ways a real worker may, and some it may not.

brokerd starts it (BROKER_SOCKET, BROKER_TOKEN). It says Hello and opens its Events stream,
then records in the JSON file named by argv[1] how brokerd answered:
  "second_hello":  Hello with the token on a second connection of the same process;
  "second_events": Events on that second connection while the first stream is open;
  "child":         Hello from a child it forked;
  "orphan":        Hello from a double-forked process (reparented, still in the session);
  "own_session":   Hello from a double-forked process that called setsid() (neither).
Each is "ok" or the error's name. Then it says Ready, waits for the drain on its first stream,
records "drained_on": "first" and exits 0.
"""

import json
import os
import socket
import sys

from varlink_client import VarlinkConnection


class Conn(VarlinkConnection):
    def __init__(self):
        super().__init__(os.environ["BROKER_SOCKET"])

    def outcome(self, method, parameters=None, **flags):
        self.send(method, parameters or {}, **flags)
        return self.receive().get("error", "ok")


def hello(conn):
    return conn.outcome("io.brokerd.Worker.Hello", {"token": os.environ["BROKER_TOKEN"], "want_fds": False})


def in_child(setsid, double):
    """Hello from a forked process; returns what it got, through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if setsid:
                os.setsid()
            if double:
                middle = os.getpid()
                if os.fork() != 0:
                    os._exit(0)  # the grandchild goes on as an orphan
                while os.getppid() == middle:  # until it is reparented
                    os.sched_yield()
            result = hello(Conn())
        except Exception as e:  # reported, not raised: the worker goes on
            result = "exception: %r" % e
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def main():
    results = {}
    first = Conn()
    results["first_hello"] = hello(first)
    first.send("io.brokerd.Worker.Events", more=True)

    second = Conn()
    results["second_hello"] = hello(second)
    # A brokerd that opens a second stream answers nothing until it has an event.
    second.sock.settimeout(5)
    try:
        results["second_events"] = second.outcome("io.brokerd.Worker.Events", more=True)
    except socket.timeout:
        results["second_events"] = "no reply: a second stream was opened"
    second.sock.settimeout(None)

    results["child"] = in_child(setsid=False, double=False)
    results["orphan"] = in_child(setsid=False, double=True)
    results["own_session"] = in_child(setsid=True, double=True)

    path = sys.argv[1]
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(path + ".tmp", path)
    first.send("io.brokerd.Worker.Ready", oneway=True)

    first.sock.settimeout(None)  # brokerd's SIGKILL at the drain timeout ends a wait that fails
    while True:
        event = first.receive()
        if event.get("parameters", {}).get("event") == "drain":
            break
    results["drained_on"] = "first"
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
