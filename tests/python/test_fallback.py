#!/usr/bin/env python3
"""broker_client without brokerd, as plain systemd starts a worker: its sockets from LISTEN_FDS at
fd 3 and up (only when LISTEN_PID is the process's own), ready() and status() as READY=1 and
STATUS= datagrams to NOTIFY_SOCKET, and from_env() refusing with ENXIO when there is neither
BROKER_SOCKET nor LISTEN_FDS. Each case runs a child whose fd 3 and environment are set as
systemd sets them."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest

CHILD = r"""
import json, os, socket, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
if sys.argv[2] == "own":
    os.environ["LISTEN_PID"] = str(os.getpid())
import broker_client
try:
    c = broker_client.Client.from_env()
except broker_client.Error as e:
    print(json.dumps({"errno": e.errno}))
    sys.exit(0)
c.ready()
c.status("serving 3 connections")
try:
    c.status("two\nlines")
    bad = None
except broker_client.Error as e:
    bad = e.errno
print(json.dumps({"brokered": c.brokered, "listeners": [[l.name, l.fd] for l in c.listeners()],
                  "cloexec": not os.get_inheritable(3), "refused": bad}))
"""


class Fallback(unittest.TestCase):
    def run_child(self, env, pid):
        tmp = tempfile.mkdtemp(prefix="broker-python-fallback.")
        path = os.path.join(tmp, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(path)
        notify.setblocking(False)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "BROKER_"))}
        base.update(env, NOTIFY_SOCKET=path)
        r = subprocess.run([sys.executable, "-c", CHILD, str(listener.fileno()), pid], env=base,
                           pass_fds=(listener.fileno(),), capture_output=True, text=True, timeout=30)
        listener.close()
        datagrams = []
        while True:
            try:
                datagrams.append(notify.recv(4096).decode())
            except BlockingIOError:
                break
        notify.close()
        os.unlink(path)
        os.rmdir(tmp)
        self.assertEqual(r.stderr, "", "the library writes nothing")
        return json.loads(r.stdout), datagrams

    def test_listen_fds_and_notify(self):
        out, datagrams = self.run_child({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}, "own")
        self.assertEqual(out, {"brokered": False, "listeners": [["http", 3]], "cloexec": True, "refused": 22})
        self.assertEqual(datagrams, ["READY=1", "STATUS=serving 3 connections"])

    def test_listen_fds_of_another_process_are_not_taken(self):
        out, datagrams = self.run_child({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, "other")
        self.assertEqual(out, {"errno": 6})  # ENXIO: neither brokerd nor sockets of its own
        self.assertEqual(datagrams, [])


if __name__ == "__main__":
    unittest.main()
