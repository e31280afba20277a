#!/usr/bin/env python3
"""A Python twin of tests/handoff's htest-worker (its "serve" mode) on broker_client, for
test_mixed.py: each line a client sends is answered "gen G pid P seq S: LINE", S counting the
lines of that connection across every instance it has been handed to. A connection's state is
htest-worker's, "seq=S;" and a newline, then the part of a line read so far, so that either worker
takes what the other hands. On drain it stops accepting and hands every connection on; one that
comes back is closed; it exits once it holds none and nothing it handed is pending.

Its status text is its counts as htest-worker has them (JSON), and on exit it writes them to
HT_REPORT_DIR/report-PID.json. With MIX_IMPL=cpp it is htest-worker itself (HANDOFF_WORKER),
exec'd in place, so that one service runs either from one generation to the next.
"""

import json
import os
import re
import resource
import selectors
import socket

import broker_client

if os.environ.get("MIX_IMPL") == "cpp":
    os.execv(os.environ["HANDOFF_WORKER"], [os.environ["HANDOFF_WORKER"]])


def decode_state(state):
    m = re.match(rb"seq=(\d+);[^\n]*\n", state)
    return (int(m.group(1)), state[m.end():]) if m else (0, b"")


class Worker:
    def __init__(self, client):
        self.client = client
        self.sel = selectors.DefaultSelector()
        self.conns = {}  # sock -> [seq, partial line]
        self.counts = {"accepted": 0, "received": 0, "closed_returned": 0}
        self.draining = False
        self.last_status = None
        self.listener = socket.socket(fileno=client.listeners()[0].fd)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self.accept)
        client.on_drain(lambda request: self.drain())
        client.on_connection(self.adopt)
        client.on_returned(self.returned)

    def accept(self, _):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            self.counts["accepted"] += 1
            self.add(sock, 0, b"")

    def adopt(self, sock, state):
        self.counts["received"] += 1
        self.add(sock, *decode_state(state))

    def returned(self, sock, state):
        self.counts["closed_returned"] += 1
        sock.close()

    def add(self, sock, seq, partial):
        sock.setblocking(False)
        self.conns[sock] = [seq, partial]
        self.sel.register(sock, selectors.EVENT_READ, self.read)
        self.answer(sock)  # a whole line may have come in the state

    def read(self, sock):
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            del self.conns[sock]
            sock.close()
            return
        self.conns[sock][1] += data
        self.answer(sock)

    def answer(self, sock):
        c = self.conns[sock]
        *lines, c[1] = c[1].split(b"\n")
        for line in lines:
            c[0] += 1
            sock.sendall(b"gen %d pid %d seq %d: %s\n" % (self.client.generation, os.getpid(), c[0], line))

    def drain(self):
        if self.draining:
            return
        self.draining = True
        self.sel.unregister(self.listener)
        out = []
        for sock, (seq, partial) in self.conns.items():
            self.sel.unregister(sock)
            out.append((sock, b"seq=%d;\n%s" % (seq, partial)))
        self.conns = {}
        self.client.handoff(out)

    def counts_text(self):
        s = self.client.summary
        return json.dumps(dict(self.counts, mode="serve", generation=self.client.generation, pid=os.getpid(),
                               open=len(self.conns), handed=s.handed, landed=s.landed, returned=s.returned,
                               pending=self.client.handoff_pending()), separators=(",", ":"))

    def run(self):
        self.client.ready()
        while not (self.draining and not self.conns and self.client.handoff_pending() == 0):
            text = self.counts_text()
            if text != self.last_status:
                self.last_status = text
                self.client.status(text)
            self.client.register(self.sel)
            for key, _ in self.sel.select(self.client.wait()):
                if key.data is not None:
                    key.data(key.fileobj)
            self.client.process()
        path = os.path.join(os.environ["HT_REPORT_DIR"], "report-%d.json" % os.getpid())
        with open(path + ".tmp", "w") as f:
            f.write(self.counts_text() + "\n")
        os.rename(path + ".tmp", path)


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    Worker(broker_client.Client.from_env(accept_handoff=True)).run()


if __name__ == "__main__":
    main()
