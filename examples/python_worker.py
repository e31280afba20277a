#!/usr/bin/env python3
"""broker-example-python: an HTTP worker in Python's standard library, without libbroker-client.

It speaks only the systemd protocols that brokerd also serves, to show that such a worker runs under
brokerd unmodified: it takes its sockets from LISTEN_FDS (sd_listen_fds(3)), reports READY=1 and a
STATUS= to NOTIFY_SOCKET (sd_notify(3)), and drains on SIGTERM, the drain signal brokerd sends to
workers without the library: it stops accepting, finishes the requests it has, and exits 0.

GET and HEAD of any path answer "hello from web gen 1 pid 1234 (python)"; keep-alive and pipelining
work (one response at a time, in order). Request bodies are not read: a request announcing one gets
413 and a close.

Without brokerd:  systemd-socket-activate -l 127.0.0.1:9090 ./python_worker.py
"""

import os
import resource
import selectors
import signal
import socket
import sys
import time

LISTEN_FDS_START = 3
MAX_CONNECTIONS = 16384  # also clipped to RLIMIT_NOFILE; see max_connections()
RESERVED_FDS = 32        # stdio, the selector, the wakeup pair, and whatever Python opens itself
MAX_HEAD = 8192          # request line and headers; more is 431
ACCEPT_BATCH = 32        # per listener per wakeup
IDLE_TIMEOUT = 30.0      # seconds
REQUEST_TIMEOUT = 15.0   # one whole request; see Server.sweep()
DRAIN_IDLE_GRACE = 0.25  # see Server.sweep()
LINGER = 2.0             # after our FIN, waiting for the client's
DRAIN_TIMEOUT = 30.0     # SIGTERM carries no deadline; brokerd's SIGKILL comes at its own

REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Content Too Large",
           431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}


def log(message):
    print(f"broker-example-python: {message}", file=sys.stderr, flush=True)


def listen_fds():
    """The listening sockets passed by socket activation, as (name, socket) pairs."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        raise SystemExit("broker-example-python: LISTEN_FDS is not set; run me under brokerd or "
                         "systemd-socket-activate")
    # LISTEN_FDS is meant for the process LISTEN_PID names, not for children that inherited it.
    if int(pid) != os.getpid():
        raise SystemExit(f"broker-example-python: LISTEN_PID is {pid}, not us ({os.getpid()})")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)

    listeners = []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        os.set_inheritable(fd, False)  # these are ours, not for any child we might start
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            log(f"socket {name} (fd {fd}) is not a listening stream socket, ignoring")
            sock.detach()
            continue
        # O_NONBLOCK lives on the open file description, shared with brokerd and every other
        # worker of the service: another worker may have set it already, and this sets it for all.
        # Either way accept() must expect EAGAIN: another worker may take the connection that
        # woke us.
        sock.setblocking(False)
        listeners.append((name, sock))
    if not listeners:
        raise SystemExit("broker-example-python: no listening stream socket to serve")
    return listeners


def max_connections(listeners):
    """How many connections fit in RLIMIT_NOFILE, after raising its soft limit to the hard one.

    Every connection is an fd. The soft limit is often 1024, for the sake of select()'s FD_SETSIZE,
    which the epoll selector does not have; the hard limit is what the administrator chose."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log(f"cannot raise RLIMIT_NOFILE to {hard}: {e}, ignoring")
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - len(listeners) - RESERVED_FDS))


def notify(message):
    """Sends one sd_notify(3) datagram. A NOTIFY_SOCKET starting with "@" is abstract."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        address = "\0" + path[1:]
    elif path.startswith("/"):
        address = path
    else:
        log(f"NOTIFY_SOCKET={path} is not a unix socket path, ignoring")
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as e:
        log(f"cannot notify {path}: {e}, ignoring")


def response(status, body, head_only, keep_alive):
    if status != 200:
        body = f"{REASONS[status]}\n".encode()
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n{extra}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
    return head if head_only else head + body


def head_length(data):
    """The length of the head at the front of data, up to and including its empty line, or 0."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    return min(ends) if ends else 0


def parse(head):
    """(status, method, keep_alive) for a complete head; status is the error to answer, or 200."""
    lines = head.decode("latin-1").split("\n")
    request_line = lines[0].rstrip("\r").split(" ")
    if len(request_line) != 3 or not all(request_line):
        return 400, None, False
    method, _target, version = request_line
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return (505 if version.startswith("HTTP/") else 400), None, False
    want_close = want_keep_alive = has_body = False
    for line in lines[1:]:
        line = line.rstrip("\r")
        if not line:
            break
        name, colon, value = line.partition(":")
        # Obsolete line folding, and whitespace before the colon, are how requests get smuggled.
        if not colon or not name or name != name.strip() or line[0] in " \t":
            return 400, None, False
        name, value = name.lower(), value.strip().lower()
        if name == "connection":
            tokens = [t.strip() for t in value.split(",")]
            want_close = want_close or "close" in tokens
            want_keep_alive = want_keep_alive or "keep-alive" in tokens
        elif name == "transfer-encoding" or (name == "content-length" and value != "0"):
            has_body = True
    if has_body:
        return 413, None, False
    if method not in ("GET", "HEAD"):
        return 405, method, False
    keep_alive = not want_close if version == "HTTP/1.1" else want_keep_alive and not want_close
    return 200, method, keep_alive


class Connection:
    def __init__(self, sock, now):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = b""
        self.peer_eof = False     # the client shut down its side
        self.close_after = False  # the queued response says "Connection: close"
        self.lingering = False    # our FIN is out; discarding input until the client's
        self.last_active = now
        self.request_start = now  # since when we wait for the rest of the request in inbuf
        self.linger_until = 0.0
        self.events = selectors.EVENT_READ


class Server:
    def __init__(self, listeners, body):
        self.listeners = listeners
        self.body = body
        self.max_connections = max_connections(listeners)
        self.selector = selectors.DefaultSelector()
        self.connections = {}
        self.accepting = False
        self.resume_at = 0.0
        self.accept_error_logged = False
        self.draining = False
        self.deadline = 0.0
        self.stop_reason = "drain deadline reached"
        self.next_sweep = 0.0
        self.signal = None
        # A handler that only records the signal, plus a wakeup fd, so that select() returns:
        # Python retries an interrupted select() by itself (PEP 475).
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")

    def on_signal(self, signum, _frame):
        self.signal = signum

    def start_accepting(self):
        for _, sock in self.listeners:
            self.selector.register(sock, selectors.EVENT_READ, "listener")
        self.accepting = True

    def stop_accepting(self):
        # The accept queues stay with the kernel, for the other workers of the service.
        if self.accepting:
            for _, sock in self.listeners:
                self.selector.unregister(sock)
        self.accepting = False

    def accept(self, listener, now):
        for _ in range(ACCEPT_BATCH):
            if len(self.connections) >= self.max_connections:
                self.stop_accepting()  # until a connection closes
                return
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return  # empty, or another worker of the service was faster
            except (InterruptedError, ConnectionAbortedError):
                continue  # the client gave up while queued: take the next one
            except OSError as e:
                # EMFILE and friends: stop polling the listeners for a moment rather than spin.
                if not self.accept_error_logged:
                    log(f"accept: {e}, pausing accept")
                self.accept_error_logged = True
                self.stop_accepting()
                self.resume_at = now + 0.1
                return
            self.accept_error_logged = False
            sock.setblocking(False)  # sockets from accept() are already close-on-exec
            conn = Connection(sock, now)
            self.connections[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def close(self, conn):
        self.selector.unregister(conn.sock)
        conn.sock.close()
        del self.connections[conn.sock]

    def begin_close(self, conn, now):
        # A lingering close: our FIN follows the last response, then we discard input until the
        # client's FIN. Closing with unread input would send a reset, which can destroy the
        # response in flight.
        try:
            if conn.peer_eof:
                raise OSError
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.lingering = True
        conn.inbuf.clear()
        conn.linger_until = now + LINGER
        self.want(conn, selectors.EVENT_READ)

    def want(self, conn, events):
        if events != conn.events:
            self.selector.modify(conn.sock, events, conn)
            conn.events = events

    def on_connection(self, conn, mask, now):
        try:
            if conn.lingering:
                if not conn.sock.recv(4096):
                    self.close(conn)
                return
            if mask & selectors.EVENT_READ and len(conn.inbuf) < MAX_HEAD:
                data = conn.sock.recv(MAX_HEAD - len(conn.inbuf))
                if data:
                    if not conn.inbuf:
                        conn.request_start = now
                    conn.inbuf += data
                    conn.last_active = now
                else:
                    conn.peer_eof = True
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        self.serve(conn, now)

    def serve(self, conn, now):
        """Sends what is queued and answers what has arrived, one response at a time (the next
        pipelined request waits until this one is sent), then chooses what to wait for."""
        try:
            while True:
                if conn.outbuf:
                    sent = conn.sock.send(conn.outbuf)
                    conn.outbuf = conn.outbuf[sent:]
                    conn.last_active = now
                    if conn.outbuf:
                        break
                    # What is left of the input waited for us, not for the client: its time starts now.
                    conn.request_start = now
                if conn.close_after:
                    self.begin_close(conn, now)
                    return
                if not self.answer_one(conn):
                    break
        except (BlockingIOError, InterruptedError):
            pass  # the socket is full, maybe with nothing of the response taken: wait for room
        except OSError:
            self.close(conn)
            return
        if conn.outbuf:
            self.want(conn, selectors.EVENT_WRITE)
        elif conn.peer_eof:
            self.close(conn)
        else:
            self.want(conn, selectors.EVENT_READ)

    def answer_one(self, conn):
        """Queues the answer to the request at the front of conn.inbuf; False while incomplete."""
        # RFC 9112 2.2: a server should ignore empty lines received before a request line.
        while conn.inbuf[:1] in (b"\r", b"\n"):
            del conn.inbuf[:1]
        length = head_length(conn.inbuf)
        if not length:
            if len(conn.inbuf) < MAX_HEAD:
                return False
            status, method, keep_alive = 431, None, False
            length = len(conn.inbuf)
        else:
            status, method, keep_alive = parse(bytes(conn.inbuf[:length]))
        del conn.inbuf[:length]
        # While draining, every answer closes its connection, so the client's next request opens
        # a new one, which lands on a listener that another worker still serves.
        keep_alive = keep_alive and not self.draining
        conn.outbuf = response(status, self.body, method == "HEAD", keep_alive)
        conn.close_after = not keep_alive
        return True

    def sweep(self, now):
        """Closes connections that did nothing for IDLE_TIMEOUT, and answers 408 and closes those that
        took REQUEST_TIMEOUT to send one request: the idle timer restarts with every byte, so without
        a deadline per request a client trickling a byte every few seconds would hold its connection
        for ever, and enough of them would fill max_connections. The request clock runs only while we
        wait for the client (no response queued), from the request's first byte or from the end of the
        response before it. While draining, it also closes every connection with nothing in progress
        once it has been quiet for DRAIN_IDLE_GRACE: a keep-alive client's next request may already
        be on the wire, and one that arrives within the grace is still answered, with
        "Connection: close"."""
        for conn in list(self.connections.values()):
            if conn.lingering:
                if now >= conn.linger_until:
                    self.close(conn)
                continue
            if (conn.inbuf and not conn.outbuf and not conn.close_after and not conn.peer_eof
                    and now - conn.request_start >= REQUEST_TIMEOUT):
                conn.inbuf.clear()
                conn.outbuf = response(408, b"", False, False)
                conn.close_after = True
                self.serve(conn, now)  # sends it and begins the close
                continue
            quiet = now - conn.last_active
            idle = not conn.inbuf and not conn.outbuf
            if quiet >= IDLE_TIMEOUT or (self.draining and idle and quiet >= DRAIN_IDLE_GRACE):
                self.begin_close(conn, now)
        self.next_sweep = now + (0.05 if self.draining else 1.0)

    def start_drain(self, why, now):
        if self.draining:
            # brokerd escalating at its deadline, or an impatient operator.
            self.stop_reason = f"{why} while draining"
            self.deadline = now
            return
        self.stop_accepting()
        self.draining = True
        self.deadline = now + DRAIN_TIMEOUT
        self.next_sweep = now
        log(f"draining ({why}): stopped accepting, {len(self.connections)} connections open, "
            f"deadline in {int(DRAIN_TIMEOUT * 1000)} ms")
        notify("STOPPING=1\nSTATUS=draining")

    def timeout(self, now):
        wake = []
        if self.draining:
            wake += [self.next_sweep, self.deadline]
        elif self.connections:
            wake.append(self.next_sweep)
        if not self.accepting and not self.draining and len(self.connections) < self.max_connections:
            wake.append(self.resume_at)
        return max(0.0, min(wake) - now) if wake else None

    def run(self):
        self.start_accepting()
        notify(f"READY=1\nSTATUS=serving on {len(self.listeners)} sockets")
        log(f"listening on {len(self.listeners)} sockets (pid {os.getpid()}, "
            f"at most {self.max_connections} connections)")
        now = time.monotonic()
        while not (self.draining and not self.connections):
            events = self.selector.select(self.timeout(now))
            now = time.monotonic()
            for key, mask in events:
                if key.data == "signal":
                    try:
                        self.wakeup_r.recv(64)
                    except BlockingIOError:
                        pass
                elif key.data == "listener":
                    if self.accepting:
                        self.accept(key.fileobj, now)
                elif key.fileobj in self.connections:
                    self.on_connection(key.data, mask, now)
            if self.signal is not None:
                self.start_drain(signal.Signals(self.signal).name, now)
                self.signal = None
            if now >= self.next_sweep:
                self.sweep(now)
            if (not self.accepting and not self.draining and len(self.connections) < self.max_connections
                    and now >= self.resume_at):
                self.start_accepting()
            if self.draining and self.connections and now >= self.deadline:
                log(f"{self.stop_reason}, closing {len(self.connections)} connections")
                break
        return 0


def main():
    listeners = listen_fds()
    service = os.environ.get("BROKER_SERVICE") or "standalone"
    generation = os.environ.get("BROKER_GENERATION") or "0"
    body = f"hello from {service} gen {generation} pid {os.getpid()} (python)\n".encode()
    return Server(listeners, body).run()


if __name__ == "__main__":
    sys.exit(main())
