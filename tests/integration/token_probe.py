#!/usr/bin/env python3
"""A worker that says Hello with the parameters the test gives it, from its instance's own process.

brokerd starts it (BROKER_SOCKET). It reads a JSON object {case: Hello parameters} from the FIFO
argv[1], until the test closes it. For each case it says Hello on a connection of its own and,
when Hello was refused, calls Events there: a refused Hello must grant nothing. It writes
{case: [Hello's outcome, Events' outcome]} to argv[2], each "ok" or the error's name (Events is
not called after a Hello that succeeded: its stream answers nothing until an event), and then
holds its connections until it is stopped.
"""

import json
import os
import signal
import socket
import sys

from varlink_client import VarlinkConnection


def outcome(conn, method, parameters, **flags):
    conn.send(method, parameters, **flags)
    try:
        return conn.receive().get("error", "ok")
    except socket.timeout:
        return "no reply: " + method + " was granted"


def main():
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = {}
    held = []
    for name, parameters in cases.items():
        conn = VarlinkConnection(os.environ["BROKER_SOCKET"])
        held.append(conn)
        hello = outcome(conn, "io.brokerd.Worker.Hello", parameters)
        events = None if hello == "ok" else outcome(conn, "io.brokerd.Worker.Events", {}, more=True)
        results[name] = [hello, events]
    path = sys.argv[2]
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(path + ".tmp", path)
    while True:
        signal.pause()  # until brokerd's SIGTERM


if __name__ == "__main__":
    sys.exit(main())
