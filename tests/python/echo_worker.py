#!/usr/bin/env python3
"""A line-echo worker on broker_client, for test_client.py: each line a client sends is answered
"gen G pid P: LINE". A connection's state is the part of a line read so far, so a handed-off
connection finishes its line at the successor.

argv[1]: "selectors" or "asyncio", the loop that runs the Client. Environment: REPORT, a folder
where it appends what it sees to <pid>.jsonl, one JSON object a line; REFUSE=1 says Hello with
accept_handoff but sets no on_connection, so the library refuses what comes; STOP_ON_CONNECTION=1
stops the process (SIGSTOP) inside its first on_connection.
"""

import asyncio
import json
import os
import selectors
import signal
import socket
import sys
import threading

import broker_client
from broker_client import aio

REPORT = os.path.join(os.environ["REPORT"], "%d.jsonl" % os.getpid())


def report(event, **fields):
    with open(REPORT, "a") as f:
        f.write(json.dumps(dict(fields, event=event, threads=threading.active_count())) + "\n")


class Echo:
    def __init__(self, client, watch, unwatch):
        self.client = client
        self.watch, self.unwatch = watch, unwatch   # (sock, callback), (sock): the loop's
        self.buffers = {}                           # sock -> bytes of a line not complete yet
        self.draining = False
        self.handoff_done = False
        self.stopped = False
        self.name = "gen %d pid %d" % (client.generation, os.getpid())
        self.listener = socket.socket(fileno=client.listeners()[0].fd)
        self.listener.setblocking(False)
        watch(self.listener, self.accept)
        client.on_drain(self.drain)
        if os.environ.get("REFUSE") != "1":
            client.on_connection(lambda sock, state: self.adopt(sock, state, "connection"))
        client.on_returned(lambda sock, state: self.adopt(sock, state, "returned"))
        client.on_handoff_done(self.done)
        client.on_link(lambda link, error: report("link", link=link.value, error=str(error) if error else None,
                                                  fileno=client.fileno()))
        report("hello", service=client.service, instance=client.instance, generation=client.generation,
               fileno=client.fileno())
        client.ready()
        client.status("echoing as " + self.name)

    def adopt(self, sock, state, how):
        report(how, state=state.decode())
        if how == "connection" and os.environ.get("STOP_ON_CONNECTION") == "1" and not self.stopped:
            self.stopped = True
            # Stopped inside the handler, before the library acknowledges: the test kills brokerd now.
            report("stopping")
            os.kill(os.getpid(), signal.SIGSTOP)
        sock.setblocking(False)
        self.buffers[sock] = state
        self.watch(sock, lambda: self.read(sock))

    def accept(self):
        for _ in range(16):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            self.adopt(sock, b"", "accepted")

    def read(self, sock):
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(sock)
            return
        report("read", data=data.decode())
        buf = self.buffers[sock] + data
        *lines, self.buffers[sock] = buf.split(b"\n")
        for line in lines:
            sock.sendall(b"%s: %s\n" % (self.name.encode(), line))

    def close(self, sock):
        self.unwatch(sock)
        del self.buffers[sock]
        sock.close()
        self.maybe_exit()

    def drain(self, request):
        report("drain", remaining=request.remaining())
        if self.draining:
            return  # said again by a brokerd that restarted
        self.draining = True
        self.unwatch(self.listener)
        conns = list(self.buffers.items())
        for sock, _ in conns:
            self.unwatch(sock)
            del self.buffers[sock]
        if conns:
            report("refused", **self.refusals(conns))
            first = conns[0][0].fileno()
            self.client.handoff(conns)
            try:
                self.client.handoff([(first, b"")])
                again = 0
            except broker_client.Error as e:
                again = e.errno
            report("refused_again", again=again, pending=self.client.handoff_pending())
            report("handed", count=len(conns), pending=self.client.handoff_pending())
        else:
            self.handoff_done = True
            self.maybe_exit()

    def refusals(self, conns):
        """What handoff() says, having taken nothing, of a closed fd and of one fd listed twice."""
        said = {}
        closed = os.dup(conns[0][0].fileno())
        os.close(closed)
        own = [(self.client.fileno(), b"")]
        for name, bad in (("closed", [(closed, b"")] + conns), ("twice", conns + [conns[0]]), ("own", conns + own)):
            try:
                self.client.handoff(bad)
                said[name] = 0
            except broker_client.Error as e:
                said[name] = e.errno
        said["pending"] = self.client.handoff_pending()
        return said

    def done(self, summary):
        report("handoff_done", handed=summary.handed, landed=summary.landed, returned=summary.returned,
               abandoned=summary.abandoned)
        self.handoff_done = True
        self.maybe_exit()

    def maybe_exit(self):
        if self.draining and self.handoff_done and not self.buffers:
            report("exit")
            os._exit(0)


def run_selectors(client):
    sel = selectors.DefaultSelector()

    def watch(sock, callback):
        sel.register(sock, selectors.EVENT_READ, callback)

    Echo(client, watch, sel.unregister)
    client.register(sel, data=None)
    while True:
        for key, _ in sel.select(client.wait()):
            if key.data is not None:
                key.data()
        client.process()
        client.register(sel, data=None)


async def run_asyncio(client):
    loop = asyncio.get_running_loop()
    Echo(client, lambda sock, cb: loop.add_reader(sock, cb), loop.remove_reader)
    aio.attach(client)
    await asyncio.Event().wait()


def main():
    client = broker_client.Client.from_env(accept_handoff=True)
    if sys.argv[1] == "asyncio":
        asyncio.run(run_asyncio(client))
    else:
        run_selectors(client)


if __name__ == "__main__":
    main()
