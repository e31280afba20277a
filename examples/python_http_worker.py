#!/usr/bin/env python3
"""broker-example-python-http: an HTTP worker on broker_client, the Python worker library.

GET and HEAD of any path answer "hello from web gen 1 pid 1234 (python)"; keep-alive and pipelining
work (answered in order). A request announcing a body gets 413 and a close.

Under brokerd it drains on brokerd's drain event and hands its connections to the next generation
instead of closing them: an idle keep-alive connection, or one holding part of a request (the bytes
read so far are its handoff state, and the successor goes on from them as if it had read them
itself). A connection still writing a response moves once the response is written. It takes the
connections its predecessors hand it, and serves on those that come back (nobody took them) until
their next answer, sent with "Connection: close". It exits once it holds no connection and nothing
it handed is pending, or at the drain deadline. Under plain systemd (LISTEN_FDS, no BROKER_SOCKET)
it drains on SIGTERM by finishing its requests. It raises its soft fd limit to the hard one, as a
worker holding thousands of connections must.

Everything runs in one selectors loop; the library never blocks it.
"""

import errno
import os
import resource
import selectors
import signal
import socket
import sys
import time

import broker_client

MAX_HEAD = 8192            # request line and headers; more is 431
ACCEPT_BATCH = 64          # per listener per wakeup
IDLE_TIMEOUT = 30.0        # seconds a keep-alive connection may stay silent
SIGTERM_DRAIN = 30.0       # plain systemd's SIGTERM carries no deadline
REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 413: "Content Too Large",
           431: "Request Header Fields Too Large"}


def log(message):
    print("broker-example-python-http: " + message, file=sys.stderr, flush=True)


class Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "closing", "returned", "last")

    def __init__(self, sock, state=b"", returned=False):
        self.sock = sock
        self.inbuf = bytearray(state)
        self.outbuf = bytearray()
        self.closing = False       # close once outbuf is written
        self.returned = returned   # handed, but nobody took it: its next answer closes it
        self.last = time.monotonic()


class Server:
    def __init__(self, client):
        self.client = client
        self.sel = selectors.DefaultSelector()
        self.conns = {}
        self.draining = False
        self.deadline = None
        gen = client.generation or int(os.environ.get("BROKER_GENERATION", "0") or 0)
        self.body = ("hello from web gen %d pid %d (python)\n" % (gen, os.getpid())).encode()
        self.listeners = []
        for entry in client.listeners():
            sock = socket.socket(fileno=entry.fd)
            sock.setblocking(False)  # shared with every worker of the service: accept expects EAGAIN
            self.listeners.append(sock)
            self.sel.register(sock, selectors.EVENT_READ, self.accept)
        wake_r, self.wake_w = socket.socketpair()
        wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGTERM, lambda *_: None)  # seen through the wakeup fd
        signal.signal(signal.SIGINT, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda _: self.signalled(wake_r))
        client.on_drain(lambda request: self.drain("requested by brokerd", request.deadline))
        client.on_connection(lambda sock, state: self.adopt(sock, state, False))
        client.on_returned(lambda sock, state: self.adopt(sock, state, True))
        client.on_handoff_done(self.handoff_done)
        client.on_link(self.link)

    # -- Connections ---------------------------------------------------------------------------

    def accept(self, listener):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log("accept: %s; waiting for a connection to close" % e.strerror)
                    return
                raise
            self.add(Conn(sock))

    def adopt(self, sock, state, returned):
        self.add(Conn(sock, state, returned))

    def add(self, c):
        c.sock.setblocking(False)
        self.conns[c.sock] = c
        self.sel.register(c.sock, selectors.EVENT_READ, lambda _: self.ready(c))
        self.serve(c)  # a handed-over state may hold a whole request

    def close(self, c):
        self.sel.unregister(c.sock)
        del self.conns[c.sock]
        c.sock.close()

    def ready(self, c):
        """Readable or writable: read what came, write what is pending."""
        if not c.outbuf:
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close(c)
                return
            c.inbuf += data
            c.last = time.monotonic()
        self.serve(c)

    def serve(self, c):
        """Answers the complete requests in inbuf, one at a time, then writes; while draining, a
        connection between responses moves to the successor."""
        while not c.outbuf and not c.closing:
            end = c.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(c.inbuf) > MAX_HEAD:
                    self.answer(c, 431, close=True)
                break
            head = bytes(c.inbuf[:end]).decode("latin-1")
            del c.inbuf[:end + 4]
            self.request(c, head)
        if c.sock not in self.conns:
            return
        self.write(c)

    def request(self, c, head):
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.answer(c, 400, close=True)
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            self.answer(c, 413, close=True)
            return
        if parts[0] not in ("GET", "HEAD"):
            self.answer(c, 405, close=True)
            return
        close = (headers.get("connection") == "close" or parts[2] == "HTTP/1.0" or c.returned
                 or (self.draining and not self.client.brokered))
        self.answer(c, 200, close=close, head_only=parts[0] == "HEAD")

    def answer(self, c, status, close, head_only=False):
        body = self.body if status == 200 else ("%d %s\n" % (status, REASONS[status])).encode()
        c.outbuf += ("HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
                     % (status, REASONS[status], len(body), "close" if close else "keep-alive")).encode()
        if not head_only:
            c.outbuf += body
        c.closing = close

    def write(self, c):
        if c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
                del c.outbuf[:n]
            except BlockingIOError:
                pass
            except OSError:
                self.close(c)
                return
        if c.outbuf:
            self.sel.modify(c.sock, selectors.EVENT_WRITE, lambda _: self.ready(c))
            return
        if c.closing:
            self.close(c)
            return
        self.sel.modify(c.sock, selectors.EVENT_READ, lambda _: self.ready(c))
        if self.draining:
            self.hand_off([c])

    # -- Draining ------------------------------------------------------------------------------

    def hand_off(self, conns):
        """Moves connections between responses to the successor: their state is the part of a
        request read so far. Without brokerd an idle one closes and a partial one finishes here."""
        conns = [c for c in conns if not c.outbuf and not c.closing and not c.returned]
        if not conns:
            return
        if self.client.link() is broker_client.Link.CONNECTED:
            for c in conns:
                self.sel.unregister(c.sock)
                del self.conns[c.sock]
            self.client.handoff([(c.sock, bytes(c.inbuf)) for c in conns])
            return
        for c in conns:
            if not c.inbuf:
                self.close(c)

    def drain(self, why, deadline):
        if self.draining:
            if deadline is not None and (self.deadline is None or deadline > self.deadline):
                self.deadline = deadline  # a brokerd that restarted: the later deadline holds
            return
        self.draining = True
        self.deadline = deadline
        for sock in self.listeners:
            self.sel.unregister(sock)
        log("draining (%s): stopped accepting, %d connections open" % (why, len(self.conns)))
        if self.client.brokered and self.client.link() is broker_client.Link.CONNECTED:
            self.client.status("draining")
        self.hand_off(list(self.conns.values()))

    def signalled(self, wake_r):
        try:
            wake_r.recv(64)
        except BlockingIOError:
            return
        self.drain("signal", time.monotonic() + SIGTERM_DRAIN)

    def handoff_done(self, summary):
        log("handoff settled: %d connections handed, %d taken by the successor, %d returned, %d abandoned"
            % (summary.handed, summary.landed, summary.returned, summary.abandoned))

    def link(self, link, error):
        if link is broker_client.Link.REJECTED:
            self.drain("brokerd no longer knows this instance: %s" % error, time.monotonic() + SIGTERM_DRAIN)

    # -- The loop ------------------------------------------------------------------------------

    def sweep(self, now):
        for c in list(self.conns.values()):
            if now - c.last >= IDLE_TIMEOUT and not c.outbuf:
                self.close(c)

    def run(self):
        self.client.ready()
        self.client.status("serving")
        while True:
            now = time.monotonic()
            if self.draining and not self.conns and self.client.handoff_pending() == 0:
                return 0
            if self.draining and self.deadline is not None and now >= self.deadline:
                log("drain deadline: %d connections still open" % len(self.conns))
                return 0
            wait = self.client.wait()
            wait = 1.0 if wait is None else min(wait, 1.0)
            for key, _ in self.sel.select(wait):
                if key.data is not None:
                    key.data(key.fileobj)
            try:
                self.client.process()
            except broker_client.Error as e:
                log("brokerd: %s" % e)
            self.client.register(self.sel, data=None)
            self.sweep(time.monotonic())


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        client = broker_client.Client.from_env(accept_handoff=True)
    except broker_client.Error as e:
        log(str(e))
        return 3
    return Server(client).run()


if __name__ == "__main__":
    sys.exit(main())
