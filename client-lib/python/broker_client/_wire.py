"""Varlink framing over a non-blocking AF_UNIX stream: NUL-terminated JSON, and fds passed with
SCM_RIGHTS by the rules of docs/protocol.md ("Passing file descriptors"). It never blocks and
never logs; errors are negative errno values, as proto/varlink.cpp's Stream returns them."""

import array
import collections
import errno
import json
import os
import socket

from . import _limits

WORKER = "io.brokerd.Worker."
READ_CHUNK = 1 << 16
FD_PRESSURE_RETRY = 0.010  # seconds before writing again when the kernel refuses more fds in flight
_CONTROL_SPACE = socket.CMSG_SPACE(4 * _limits.MAX_FDS_PER_MESSAGE)
_LOST = None  # in the fd queue: where a message's fds the kernel could not install begin


def _depth_ok(value):
    """Whether value nests at most MAX_JSON_DEPTH objects and arrays, walked without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > _limits.MAX_JSON_DEPTH:
                return False
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse(text):
    """A message's JSON object, or None when it is not valid JSON, not an object, or too deep."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) and _depth_ok(body) else None


def count_fd_refs(body):
    """The fds a message references by its "fd" members inside "parameters" (rule 3), or
    -EBADMSG when they are not exactly 0..n-1, each once. A null "fd" refers to nothing."""
    refs = []
    stack = [body.get("parameters")]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for key, member in v.items():
                if key != "fd":
                    stack.append(member)
                elif member is None:
                    continue
                elif type(member) is not int or member < 0:
                    return -errno.EBADMSG
                else:
                    refs.append(member)
        elif isinstance(v, list):
            stack.extend(v)
    if len(refs) > _limits.MAX_FDS_PER_MESSAGE or sorted(refs) != list(range(len(refs))):
        return -errno.EBADMSG
    return len(refs)


def encode(body):
    """A message's bytes without the NUL: JSON with every non-ASCII character escaped, so it holds no NUL."""
    return json.dumps(body, separators=(",", ":")).encode()


def call(method, parameters=None, more=False, oneway=False):
    """A call of io.brokerd.Worker's method."""
    body = {"method": WORKER + method}
    if parameters is not None:
        body["parameters"] = parameters
    if more:
        body["more"] = True
    if oneway:
        body["oneway"] = True
    return body


def socket_for(fd):
    """A socket object that owns fd, or None (fd closed) when it is not a socket."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        close_all([fd])
        return None


def close_all(fds):
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class _Outgoing:
    __slots__ = ("data", "offset", "fds", "owned", "borrowing")

    def __init__(self, data, fds, owned):
        self.data = data
        self.offset = 0
        self.fds = fds          # sent with the first byte
        self.owned = owned      # closed once sent; borrowed ones never are
        self.borrowing = bool(fds) and not owned


class Stream:
    """One connection to brokerd. receive() reads once and queues the fds that came, in order;
    next() takes one whole message with exactly the fds it references. A protocol error closes
    every fd involved and leaves the stream broken."""

    def __init__(self, sock, max_message=_limits.MAX_MESSAGE_SIZE, max_queued_fds=_limits.MAX_QUEUED_FDS):
        self.sock = sock
        self.max_message = max_message
        self.max_queued_fds = max_queued_fds
        self.max_write_queue = _limits.MAX_WRITE_QUEUE
        self.allow_lost_fds = False
        self._in = bytearray()
        self._scanned = 0
        self._in_fds = collections.deque()
        self._out = collections.deque()
        self._out_bytes = 0
        self.broken = False

    def fileno(self):
        return self.sock.fileno() if self.sock is not None else -1

    def close(self):
        """Closes the socket and every received fd not yet taken. Borrowed fds stay open."""
        self._break()
        for o in self._out:
            if o.owned:
                close_all(o.fds)
        self._out.clear()
        self._out_bytes = 0
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _break(self):
        self.broken = True
        close_all(self._in_fds)
        self._in_fds.clear()

    def receive(self):
        """Reads once: bytes read (> 0), 0 at end of stream, -EAGAIN, or another negative errno
        (-EPROTO for fds that break the rules)."""
        if self.broken:
            return -errno.EPROTO
        chunk = min(READ_CHUNK, self.max_message + 1)
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(chunk, _CONTROL_SPACE,
                                                        socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return -errno.EAGAIN
        except OSError as e:
            return -(e.errno or errno.EIO)
        # Every fd is ours the moment recvmsg returns: queued (so owned) before any check.
        received = 0
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            self._in_fds.extend(fds)
            received += len(fds)
        if flags & socket.MSG_CTRUNC and self.allow_lost_fds and data:
            # One read carries the fds of one message, those that fit first.
            self._in_fds.append(_LOST)
        elif flags & socket.MSG_CTRUNC:
            self._break()
            return -errno.EPROTO
        if sum(fd is not _LOST for fd in self._in_fds) > self.max_queued_fds:
            self._break()
            return -errno.EPROTO
        if received and not data:
            self._break()  # fds travel with the first byte of their message
            return -errno.EPROTO
        self._in += data
        if len(self._in) > self.max_message + chunk:
            self._break()
            return -errno.EMSGSIZE
        return len(data)

    def message_ready(self):
        return self._in.find(b"\0", self._scanned) >= 0

    def next(self):
        """(1, (body, fds)) for a whole message, (0, None) when none is complete, or (-errno, None)
        for a protocol error. A lost fd (see allow_lost_fds) is None in fds."""
        if self.broken:
            return -errno.EPROTO, None
        end = self._in.find(b"\0", self._scanned)
        if end < 0:
            self._scanned = len(self._in)
            if len(self._in) > self.max_message:
                self._break()
                return -errno.EMSGSIZE, None
            return 0, None
        if end > self.max_message:
            self._break()
            return -errno.EMSGSIZE, None
        body = parse(bytes(self._in[:end]))
        del self._in[:end + 1]
        self._scanned = 0
        n = -errno.EBADMSG if body is None else count_fd_refs(body)
        if n < 0:
            self._break()
            return n, None
        fds = []
        lost = False
        while len(fds) < n and self._in_fds:
            if self._in_fds[0] is _LOST:
                lost = True
                break
            fds.append(self._in_fds.popleft())
        if len(fds) < n and not lost:
            close_all(fds)
            self._break()
            return -errno.EPROTO, None
        if lost:
            self._in_fds.popleft()
            fds.extend([None] * (n - len(fds)))
        # fds with no buffered byte of a following message to claim them are surplus.
        if self._in_fds and not self._in:
            close_all(fds)
            self._break()
            return -errno.EPROTO, None
        return 1, (body, fds)

    def enqueue(self, body, fds=(), borrowed=False):
        """Queues a message with its fds: owned ones close once sent, borrowed ones stay the
        caller's and must stay open until then. 0, -E2BIG, -EBADMSG, -EMSGSIZE or -ENOBUFS."""
        fds = list(fds)
        if len(fds) > _limits.MAX_FDS_PER_MESSAGE:
            return -errno.E2BIG
        if count_fd_refs(body) != len(fds):
            return -errno.EBADMSG
        data = encode(body)
        if len(data) > self.max_message:
            return -errno.EMSGSIZE
        if self._out_bytes + len(data) + 1 > self.max_write_queue:
            return -errno.ENOBUFS
        data += b"\0"
        self._out.append(_Outgoing(data, fds, not borrowed))
        self._out_bytes += len(data)
        return 0

    def want_write(self):
        return bool(self._out)

    def queued_bytes(self):
        return self._out_bytes

    def unsent_borrowed(self):
        """Queued messages with borrowed fds not written whole: brokerd cannot have acted on one."""
        return sum(o.borrowing for o in self._out)

    def flush(self):
        """Writes what the socket takes: 0 when all is written, -EAGAIN when some remains, or
        another negative errno (-EPIPE, -ECONNRESET, -ETOOMANYREFS, ...)."""
        while self._out:
            o = self._out[0]
            anc = []
            if o.fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", o.fds))]
            try:
                n = self.sock.sendmsg([memoryview(o.data)[o.offset:]], anc, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return -errno.EAGAIN
            except OSError as e:
                return -(e.errno or errno.EIO)
            if o.owned:
                close_all(o.fds)  # delivered with the first byte: our copies close now
            o.fds = []
            o.offset += n
            self._out_bytes -= n
            if o.offset == len(o.data):
                self._out.popleft()
        return 0
