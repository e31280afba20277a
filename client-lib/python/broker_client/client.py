"""broker_client.Client: the worker's side of io.brokerd.Worker, as libbroker-client's
broker::Client has it (client-lib/src/client.cpp and link.cpp), with a plain systemd fallback.

Apart from from_env(), whose Hello waits for its reply (at most 30 s, before the caller's loop
runs), no call blocks: the caller's loop polls fileno() for events(), wakes at timeout(), and
calls process(). The library starts no thread and never logs.
"""

import errno
import enum
import fcntl
import os
import random
import resource
import selectors
import socket
import time

from . import _limits
from ._handoff import Item, Receipts, Sender, decode_state
from ._channels import Channels, Path
from ._wire import FD_PRESSURE_RETRY, WORKER, Stream, close_all, socket_for
from ._wire import call as _call

LISTEN_FDS_START = 3

# Varlink errors whose errno the caller may match, as proto/varlink.cpp's errno_for_error maps them.
_ERRNO_FOR_ERROR = {
    "org.varlink.service.PermissionDenied": errno.EACCES,
    WORKER + "InvalidToken": errno.EACCES,
    WORKER + "NotAuthenticated": errno.EACCES,
    WORKER + "NoSuchService": errno.ENOENT,
    WORKER + "PeerExited": errno.ESRCH,
    WORKER + "EventsInUse": errno.EBUSY,
    "org.varlink.service.InvalidParameter": errno.EINVAL,
}


class Error(OSError):
    """A failure of the library: errno, a message, and the Varlink error name brokerd gave, if any."""

    def __init__(self, code, message, varlink_error=None):
        super().__init__(code, message)
        self.varlink_error = varlink_error


class Link(enum.Enum):
    """The connection to brokerd. LOST: the worker serves on and the library finds a brokerd again
    (or, without reconnect, it is over); REJECTED: no brokerd knows this instance any more, so the
    worker drains, as nothing would ever tell it to."""
    CONNECTED = "connected"
    LOST = "lost"
    REJECTED = "rejected"


class DrainRequest:
    """brokerd's "drain": stop accepting, finish what is in flight (or hand it off), and exit by
    deadline, a time.monotonic() value (None when brokerd gave no timeout)."""

    def __init__(self, deadline):
        self.deadline = deadline

    def remaining(self):
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class HandoffSummary:
    """Connections handed, and how they went: landed (closed here: the successor holds them),
    returned (given back through on_returned) and abandoned (closed here after a restart of
    brokerd: nobody could tell where they went)."""

    def __init__(self):
        self.handed = self.landed = self.returned = self.abandoned = 0

    def __repr__(self):
        return ("HandoffSummary(handed=%d, landed=%d, returned=%d, abandoned=%d)"
                % (self.handed, self.landed, self.returned, self.abandoned))


class Listener:
    """A listening socket of the service: its name and fd. Inherited ones (LISTEN_FDS) are the
    process's; those a Hello reply brought are the Client's and stay open for its life."""

    def __init__(self, name, fd):
        self.name = name
        self.fd = fd

    def __repr__(self):
        return "Listener(%r, %d)" % (self.name, self.fd)


class _Phase(enum.Enum):
    CONNECTED = 1
    WAITING = 2   # lost: fileno() -1 until attempt_at
    HELLO = 3     # lost: a new connection, its Hello not answered yet
    REJECTED = 4
    CLOSED = 5    # lost with reconnect off


def _env(name):
    v = os.environ.get(name)
    return v if v else None


def _listen_fds_are_ours():
    fds, pid = _env("LISTEN_FDS"), _env("LISTEN_PID")
    return fds is not None and pid is not None and pid.isdigit() and int(pid) == os.getpid()


def _inherited_listeners():
    """The sockets at fd 3 and up, CLOEXEC as sd_listen_fds() leaves them; neither duplicated nor
    closed here."""
    count = _env("LISTEN_FDS")
    if not count.isdigit():
        raise Error(errno.EINVAL, "invalid LISTEN_FDS: %r" % count)
    names = (_env("LISTEN_FDNAMES") or "").split(":")
    out = []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise Error(e.errno, "LISTEN_FDS names fd %d, which is not open" % fd) from None
        out.append(Listener(names[i] if i < len(names) and names[i] else "unknown", fd))
    return out


def _sd_notify(text):
    """sd_notify(3): one datagram to NOTIFY_SOCKET; nothing without one."""
    path = _env("NOTIFY_SOCKET")
    if path is None:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(text.encode(), path)
        except OSError as e:
            raise Error(e.errno, "sd_notify: %s" % e.strerror) from None


def check_status_text(text):
    """brokerd's rule for a status text (proto/status_text.cpp), checked before sending, since a
    oneway call would be refused unseen. Returns the text; raises Error otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Error(errno.EINVAL, "status text: not valid UTF-8 at byte %d" % e.start) from None
    if "\n" in text or "\0" in text:
        raise Error(errno.EINVAL, "status text must be one line")
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > _limits.MAX_STATUS_TEXT:
        raise Error(errno.EMSGSIZE, "status text is longer than %d bytes" % _limits.MAX_STATUS_TEXT)
    at = 0
    for ch in text:
        cp = ord(ch)
        if 0xD800 <= cp <= 0xDFFF:
            raise Error(errno.EINVAL, "status text: not valid UTF-8 at byte %d" % at)
        if cp < 0x20 or cp == 0x7F or 0x80 <= cp <= 0x9F:
            raise Error(errno.EINVAL, "status text: control character at byte %d" % at)
        at += len(ch.encode("utf-8"))
    return text


def _unix_address(path):
    return "\0" + path[1:] if path.startswith("@") else path


def _error_of(body, what):
    name = body.get("error")
    name = name if isinstance(name, str) else "invalid error reply"
    return Error(_ERRNO_FOR_ERROR.get(name, errno.EPROTO), "%s: %s" % (what, name), name)


def _member(params, key, kind):
    v = params.get(key)
    ok = type(v) is int and v >= 0 if kind is int else isinstance(v, kind)
    if not ok:
        raise Error(errno.EBADMSG, "invalid Hello reply from brokerd: %r missing or of the wrong type" % key)
    return v


class Client(Channels):
    """A worker's connection to brokerd. Make one with Client.from_env()."""

    def __init__(self):
        self.brokered = False
        self.service = ""
        self.instance = ""
        self.generation = 0
        self._listeners = []
        self._owns_listeners = False  # those a Hello reply brought; inherited ones are the process's
        self._stream = None
        self._sender = Sender()
        self._receipts = Receipts()
        self.summary = HandoffSummary()
        self._on_drain = self._on_connection = self._on_returned = None
        self._on_handoff_done = self._on_link = None
        self._accept_handoff = False
        self._reconnect = True
        self._reconnect_min = 0.05
        self._reconnect_max = 2.0
        self._socket_path = None
        self._hello = None
        self._phase = _Phase.CONNECTED
        self._said_ready = False
        self._last_status = None
        self._attempt_at = 0.0
        self._hello_deadline = 0.0
        self._failures = 0
        self._last_fd = -1
        self._retry_at = 0.0
        self._peer_gone = False
        self._in_process = False
        self._registered = {}  # id(selector) -> the fd register() gave it
        self._jitter = random.Random(os.getpid() ^ time.monotonic_ns())
        self._init_channels()

    # -- Construction --------------------------------------------------------------------------

    @classmethod
    def from_env(cls, accept_handoff=False, reconnect=True, reconnect_min=0.05, reconnect_max=2.0):
        """The worker's Client, from BROKER_SOCKET and BROKER_TOKEN (spawned by brokerd) or
        BROKER_SERVICE (started elsewhere: its sockets come with the Hello reply); without
        BROKER_SOCKET, from LISTEN_FDS alone (a plain systemd worker: ready() and status() go to
        NOTIFY_SOCKET). accept_handoff: this instance takes connections handed off by its
        predecessors (set on_connection). reconnect: after brokerd dies, find it again with a
        backoff from reconnect_min to reconnect_max seconds. The Hello waits for its reply, at
        most 30 s: call this before the loop runs."""
        c = cls()
        socket_path = _env("BROKER_SOCKET")
        inherited = _listen_fds_are_ours()
        if socket_path is None:
            if not inherited:
                raise Error(errno.ENXIO, "no BROKER_SOCKET or LISTEN_FDS in the environment")
            c._listeners = _inherited_listeners()
            return c
        hello = {}
        token = _env("BROKER_TOKEN")
        if token is not None:
            hello["token"] = token
        else:
            service = _env("BROKER_SERVICE")
            if service is None:
                raise Error(errno.EINVAL, "BROKER_SOCKET is set, but neither BROKER_TOKEN nor BROKER_SERVICE")
            hello["service"] = service
            if _env("BROKER_VERSION") is not None:
                hello["version"] = _env("BROKER_VERSION")
            inherited = False  # a registered worker's LISTEN_FDS, if any, are its own
        hello["want_fds"] = not inherited
        if accept_handoff:
            hello["accept_handoff"] = True
        c._accept_handoff = accept_handoff
        c._reconnect = reconnect
        c._reconnect_min = reconnect_min
        c._reconnect_max = reconnect_max
        c._socket_path = socket_path
        c._hello = dict(hello, want_fds=False)  # a reconnect holds its sockets already

        body, fds = c._hello_call(socket_path, hello)
        try:
            params = body.get("parameters")
            if not isinstance(params, dict):
                raise Error(errno.EBADMSG, "invalid Hello reply from brokerd: no parameters")
            c.brokered = True
            c.service = _member(params, "service", str)
            c.instance = _member(params, "instance", str)
            c.generation = _member(params, "generation", int)
            c._remember_token(params)
            sockets = _member(params, "sockets", list)
            if len(sockets) > _limits.MAX_SOCKETS_PER_SERVICE:
                raise Error(errno.EBADMSG, "invalid Hello reply from brokerd: too many sockets")
            if inherited:
                c._listeners = _inherited_listeners()
            else:
                for s in sockets:
                    if not isinstance(s, dict) or not isinstance(s.get("name"), str) or type(s.get("fd")) is not int:
                        raise Error(errno.EBADMSG, "invalid Hello reply from brokerd: a socket came without its fd")
                    c._listeners.append(Listener(s["name"], fds[s["fd"]]))
                fds = []  # the listeners' now
                c._owns_listeners = True
        except BaseException:
            c._stream.close()
            raise
        finally:
            close_all(fds)
        c._stream.allow_lost_fds = True  # connections beyond the fd limit are refused, not the end
        c._enqueue(_call("Events", c._events_parameters(params), more=True))
        c._flush_now()
        return c

    def _hello_call(self, path, hello):
        """Connects and says Hello, waiting for the reply under DEFAULT_CALL_TIMEOUT."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(_limits.DEFAULT_CALL_TIMEOUT)
        try:
            sock.connect(_unix_address(path))
        except OSError as e:
            sock.close()
            raise Error(e.errno or errno.ECONNREFUSED, "connect to brokerd at %s: %s" % (path, e.strerror or e)) from None
        sock.setblocking(False)
        self._stream = Stream(sock)
        self._enqueue(_call("Hello", hello))
        deadline = time.monotonic() + _limits.DEFAULT_CALL_TIMEOUT
        while True:
            r = self._stream.flush()
            if r < 0 and r != -errno.EAGAIN:
                break
            n, message = self._stream.next()
            if n:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self._stream.close()
                raise Error(errno.ETIMEDOUT, "brokerd did not answer Hello within %gs" % _limits.DEFAULT_CALL_TIMEOUT)
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self._stream.want_write() else 0))
                sel.select(left)
            r = self._stream.receive()
            if r == 0:
                break
            if r < 0 and r != -errno.EAGAIN:
                break
        if n <= 0:
            self._stream.close()
            raise Error(errno.ECONNRESET, "brokerd closed the connection before answering Hello")
        body, fds = message
        if "error" in body:
            close_all(fds)
            self._stream.close()
            raise _error_of(body, "brokerd refused Hello")
        return body, fds

    # -- What the worker asks ------------------------------------------------------------------

    def listeners(self):
        return list(self._listeners)

    def listener(self, name):
        """The fd of the socket named name; Error(ENOENT) if there is none."""
        for entry in self._listeners:
            if entry.name == name:
                return entry.fd
        raise Error(errno.ENOENT, "no socket named %r" % name)

    def ready(self):
        """This instance serves. Remembered, and said again to a brokerd found after a loss."""
        if not self.brokered:
            _sd_notify("READY=1")
            return
        self._said_ready = True
        self._tell(_call("Ready", oneway=True))

    def status(self, text):
        """A status text for `brokerctl status`: one line of valid UTF-8 without control
        characters, at most 512 bytes (else Error, nothing sent). Remembered like ready()."""
        text = check_status_text(text)
        if not self.brokered:
            _sd_notify("STATUS=" + text)
            return
        self._last_status = text
        self._tell(_call("Status", {"text": text}, oneway=True))

    def handoff(self, connections):
        """Hands established connections to the successor generation: an iterable of
        (connection, state), a connection being a socket object (detached here) or an fd, state
        bytes (at most 16384; b"" for none). From this call on the library owns every one: those
        that land close once their receiver acknowledged them (on a direct channel, or brokerd's
        "handoff" event), never before; those that come back go to on_returned. Nothing is taken
        if it raises (a closed fd; one listed twice, one of the library's own, or one handed off
        and not settled yet; a state too long; no brokerd)."""
        if not self.brokered:
            raise Error(errno.ENOTCONN, "not connected to brokerd: there is no successor to hand connections to")
        if self._phase is not _Phase.CONNECTED:
            raise Error(errno.ENOTCONN, "the connection to brokerd is lost: there is no successor to hand connections to")
        checked = []
        seen = set()  # two entries owning one fd would close it twice
        own, handed = self._own_fds(), self._handed_fds()
        for conn, state in connections:
            fd = conn if isinstance(conn, int) else conn.fileno()
            if isinstance(state, str):
                state = state.encode()
            state = bytes(state or b"")
            try:
                fcntl.fcntl(fd, fcntl.F_GETFD)
            except (OSError, ValueError):
                raise Error(errno.EBADF, "handoff: fd %d is not open" % fd) from None
            if fd in seen:
                raise Error(errno.EINVAL, "handoff: fd %d is in the list twice" % fd)
            if fd in own:
                raise Error(errno.EINVAL, "handoff: fd %d is the library's own" % fd)
            if fd in handed:
                raise Error(errno.EINVAL, "handoff: fd %d is handed off already" % fd)
            seen.add(fd)
            if len(state) > _limits.MAX_HANDOFF_STATE:
                raise Error(errno.EMSGSIZE, "handoff: state of %d bytes, over %d" % (len(state), _limits.MAX_HANDOFF_STATE))
            checked.append((conn, state))
        # The kernel refuses to pass more fds at once than the sender's fd limit allows, and fds
        # in flight count against it: keep the window within half of it.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            self._sender.set_window(soft // 2 // _limits.MAX_FDS_PER_MESSAGE)
            self._window_fds = max(soft // 2, 1)
        for conn, state in checked:
            fd = conn if isinstance(conn, int) else conn.detach()
            self._sender.add(Item(fd, state))
        self.summary.handed += len(checked)
        try:
            self._pump()
        except Error:
            pass  # the next process() reports what is wrong; the fds stay the library's

    def _own_fds(self):
        """The fds the library itself holds open: its connection to brokerd, the epoll set
        fileno() is, every channel, and the sockets a Hello reply gave it."""
        own = {p.sock.fileno() for p in self._peers}
        if self._stream is not None:
            own.add(self._stream.fileno())
        if self._epoll is not None:
            own.add(self._epoll.fileno())
        if self._owns_listeners:
            own.update(entry.fd for entry in self._listeners)
        return own

    def _handed_fds(self):
        """The fds of connections handed off and not settled yet, queued or in flight."""
        handed = set(self._sender.fds())
        handed.update(item.fd for p in self._peers for items in p.unacked.values() for item in items)
        return handed

    def handoff_pending(self):
        """Connections handed and not settled yet (queued or in flight)."""
        return self._pending()

    def link(self):
        if self._phase is _Phase.CONNECTED:
            return Link.CONNECTED
        return Link.REJECTED if self._phase is _Phase.REJECTED else Link.LOST

    # Handlers. Each is called from process() (or handoff()), never from another thread.
    def on_drain(self, handler):
        """handler(DrainRequest). brokerd may say it again after a restart: the later deadline holds."""
        self._on_drain = handler

    def on_connection(self, handler):
        """handler(sock, state): a connection handed to this instance, the handler's from then
        on. Without a handler, connections are refused (their sender gets them back)."""
        self._on_connection = handler

    def on_returned(self, handler):
        """handler(sock, state): a connection this worker handed that came back; it serves it on
        (or closes it). Without a handler it is closed."""
        self._on_returned = handler

    def on_handoff_done(self, handler):
        """handler(HandoffSummary): nothing handed is pending any more."""
        self._on_handoff_done = handler

    def on_link(self, handler):
        """handler(Link, Error or None) when the connection to brokerd is lost, taken back
        (CONNECTED) or refused for good (REJECTED)."""
        self._on_link = handler

    # -- The caller's loop ---------------------------------------------------------------------

    def fileno(self):
        """The fd to poll. With a brokerd that makes direct handoff channels (its Hello said
        peer_handoff), an epoll fd of the library's holding the connection to brokerd and every
        channel, the same for the Client's life. Otherwise the connection: -1 while there is none
        (lost, waiting to reconnect), and it changes on a reconnect, never to the number of the
        connection before."""
        if self._epoll is not None:
            return self._epoll.fileno()
        return self._stream.fileno() if self._stream is not None else -1

    def events(self):
        """The selectors mask to poll fileno() for (0 with no fd); EVENT_READ alone for the epoll
        fd, whose members it sets up for the next wait."""
        if self._epoll is not None:
            self._watch()
            return selectors.EVENT_READ
        if self._stream is None:
            return 0
        write = self._stream.want_write() and not self._retry_at
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)

    def timeout(self):
        """When to call process() even without an event: a time.monotonic() value, or None."""
        if self._phase is _Phase.WAITING:
            return self._attempt_at
        if self._stream is None:
            return None
        if self._stream.message_ready() or self._peer_gone:
            return 0.0
        t = self._retry_at or None
        if self._phase is _Phase.HELLO:
            t = self._hello_deadline if t is None else min(t, self._hello_deadline)
        return t

    def wait(self):
        """Seconds until timeout(), for selector.select(); None for no timeout."""
        t = self.timeout()
        return None if t is None else max(0.0, t - time.monotonic())

    def register(self, selector, data=None):
        """Keeps a selectors selector watching this Client: call it once, and again after each
        process() (the fd and the events it wants change). Its key's data is data."""
        fd, events = self.fileno(), self.events()
        old = self._registered.get(id(selector))
        if old is not None and old != fd:
            try:
                selector.unregister(old)
            except (KeyError, ValueError, OSError):
                pass
            del self._registered[id(selector)]
        if fd < 0:
            return
        if id(selector) in self._registered:
            key = selector.get_key(fd)
            if key.events != events:
                selector.modify(fd, events, data)
        else:
            selector.register(fd, events, data)
            self._registered[id(selector)] = fd

    def process(self):
        """Does what is due without blocking: writes, reads once, runs handlers, reconnects.
        Returns True when it did something. A handler's exception, or brokerd's error, comes out
        of it (as Error for the latter); what was queued goes on at the next call."""
        did = False
        if self._peers:
            did = self._serve_peers()
            if self._phase is _Phase.CLOSED and self._stream is None:
                return True  # a handler closed the Client
        return self._process_stream() or did

    def _process_stream(self):
        if self._phase is _Phase.WAITING:
            return self._attempt()
        if self._stream is None:
            return False
        if self._phase is _Phase.HELLO and time.monotonic() >= self._hello_deadline:
            self._retry_later()  # a brokerd that accepts but never answers is as good as none
            return True
        s = self._stream
        self._in_process = True
        before = s.queued_bytes()
        r = self._flush_or_defer()
        if r < 0 and r != -errno.EAGAIN and not _is_disconnect(r):
            self._in_process = False
            self._disconnected(Error(-r, "send to brokerd: %s" % os.strerror(-r)))
            return True
        did = s.queued_bytes() != before
        eof = False
        failure = None
        more = True
        while more:
            r = s.receive()
            if r > 0:
                did = True
            elif r == 0 or _is_disconnect(r):
                eof = True
            elif r != -errno.EAGAIN:
                self._in_process = False
                self._disconnected(Error(-r, "receive from brokerd: %s" % os.strerror(-r)))
                return True
            while True:
                n, message = s.next()
                if n == 0:
                    break
                if n < 0:
                    self._in_process = False
                    self._disconnected(Error(-n, "protocol error from brokerd: %s" % os.strerror(-n)))
                    return True
                did = True
                try:
                    if self._phase is _Phase.HELLO:
                        self._hello_reply(*message)
                    else:
                        self._dispatch(*message)
                except BaseException as e:  # noqa: B902 - a handler's, passed on after the rest
                    failure = e
                    break
                if self._stream is not s:  # a handler closed the Client
                    self._in_process = False
                    return True
            # Once brokerd is found gone, read to the end: what it sent before it left is handled.
            more = failure is None and not eof and self._peer_gone and r > 0 and self._stream is s
        self._in_process = False
        if failure is not None:
            try:
                self._pump()  # whatever waits to be sent goes on: no other event may move it
            except Error:
                pass
            raise failure
        if eof or self._peer_gone:
            self._disconnected(Error(errno.ECONNRESET, "brokerd closed the connection"))
            return True
        return did

    def close(self):
        """Closes the connection to brokerd and every fd the library holds: handoffs queued or in
        flight, and the listeners a Hello reply brought."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._sender.drop_in_flight()
        close_all(item.fd for item in self._sender.take_unsent())
        self._close_channels()
        if self._owns_listeners:
            close_all(entry.fd for entry in self._listeners)
        self._listeners = []
        self._phase = _Phase.CLOSED

    # -- Sending -------------------------------------------------------------------------------

    def _enqueue(self, call, fds=(), borrowed=False):
        r = self._stream.enqueue(call, fds, borrowed)
        if r < 0:
            raise Error(-r, "cannot queue %s: %s" % (call["method"], os.strerror(-r)))

    def _tell(self, call):
        """Ready and Status: they go out now only while brokerd knows this instance."""
        if self._phase is _Phase.CLOSED:
            raise Error(errno.ECONNRESET, "brokerd closed the connection")
        if self._phase is _Phase.REJECTED:
            raise Error(errno.ENOTCONN, "brokerd refused this instance: there is nobody to tell")
        if self._phase is not _Phase.CONNECTED:
            return
        self._enqueue(call)
        self._flush_now()

    def _flush_now(self):
        if self._stream is None:
            raise Error(errno.ECONNRESET, "brokerd closed the connection")
        r = self._flush_or_defer()
        if _is_disconnect(r):
            # Inside process(), what brokerd sent before it went is still to be read; with
            # reconnect, the next process() finds the loss (timeout() asks for it at once).
            if self._in_process or self._reconnect:
                return
            raise Error(errno.ECONNRESET, "brokerd closed the connection")
        if r < 0 and r != -errno.EAGAIN:
            raise Error(-r, "send to brokerd: %s" % os.strerror(-r))

    def _flush_or_defer(self):
        """ETOOMANYREFS, the per-user limit on fds in flight, is a wait, not an error."""
        if self._retry_at and time.monotonic() < self._retry_at:
            return -errno.EAGAIN
        self._retry_at = 0.0
        r = self._stream.flush()
        if r == -errno.ETOOMANYREFS:
            self._retry_at = time.monotonic() + FD_PRESSURE_RETRY
            return -errno.EAGAIN
        if _is_disconnect(r):
            self._peer_gone = True
        return r

    def _pump(self):
        """Sends what is queued: on the direct channels (_channels.py), once brokerd has made
        them; otherwise as Handoff batches while the window has room, each outcome coming as a
        "handoff" event."""
        if self._path is Path.DIRECT:
            self._pump_direct()
            self._report_handed()
            if self._path is Path.DIRECT:
                return
        if self._path is Path.UNASKED and self._peer_handoff and self._sender.queue:
            if self._phase is not _Phase.CONNECTED:
                return  # the Hello of a reconnect pumps again
            self._enqueue(_call("Peers", {}, oneway=True))
            self._path = Path.ASKED
            self._flush_now()
            return
        if self._path is Path.ASKED or self._stream is None:
            return  # lost: the Hello of a reconnect pumps again
        while True:
            b = self._sender.next()
            if b is None:
                break
            batch, params, fds = b
            r = self._stream.enqueue(_call("Handoff", params, oneway=True), fds, borrowed=True)
            if r < 0:
                self._sender.requeue(batch)  # not sent: it waits for the next try, still ours
                if r == -errno.ENOBUFS:
                    break
                raise Error(-r, "cannot queue Handoff: %s" % os.strerror(-r))
        self._flush_now()

    # -- Events --------------------------------------------------------------------------------

    def _dispatch(self, body, fds):
        if "error" in body:
            close_all(fds)
            raise _error_of(body, "brokerd")
        params = body.get("parameters")
        event = params.get("event") if isinstance(params, dict) else None
        # Events this version does not know are skipped, so a newer broker can add them.
        if event == "drain":
            ms = params.get("timeout_ms")
            deadline = time.monotonic() + max(0, ms) / 1000 if type(ms) is int else None
            if self._on_drain is not None:
                self._on_drain(DrainRequest(deadline))
        elif event == "connections":
            self._connections_event(params, fds)
            return
        elif event == "handoff":
            self._handoff_event(params)
        elif event == "peers":
            try:
                self._peers_event(params, fds)
            finally:
                close_all(fds)
            return
        elif event == "peer":
            try:
                self._peer_event(params, fds)
            finally:
                close_all(fds)
            return
        close_all(fds)

    def _connections_event(self, params, fds):
        """Each connection is the handler's from the moment it is called; any this instance cannot
        take are closed and refused, and their sender still holds them."""
        batch, conns = params.get("batch"), params.get("connections")
        if type(batch) is not int or batch < 0 or not isinstance(conns, list):
            close_all(fds)
            raise Error(errno.EBADMSG, "invalid connections event from brokerd")
        if fds and fds[0] is not None:
            self._grow_fd_table(fds[0])  # for the batches after this one
        refused = []
        failure = None
        for i, c in enumerate(conns):
            fd_index = c.get("fd") if isinstance(c, dict) else None
            if type(fd_index) is not int or fd_index >= len(fds):
                refused.append(i)
                continue
            fd, fds[fd_index] = fds[fd_index], None
            state = decode_state(c["state"]) if "state" in c else b""
            failure = self._deliver(fd, state, failure, refused, i)
        close_all(fds)
        # Remembered before the acknowledgement, which may never reach brokerd: a brokerd that
        # restarts learns from this what landed here (Resume).
        if "origin" in params:
            self._receipts.add(params["origin"], len(conns), refused)
        ack = {"batch": batch}
        if refused:
            ack["refused"] = refused
        if self._stream is None:
            raise Error(errno.ECONNRESET, "brokerd closed the connection")
        self._enqueue(_call("Received", ack, oneway=True))
        self._flush_now()
        if failure is not None:
            raise failure

    def _deliver(self, fd, state, failure, refused, index):
        """One connection handed to this instance, to on_connection, the handler's from then on.
        Refused (index into refused) and closed here: one whose fd or state did not arrive, all
        without a handler, and the rest once a handler raised. Returns the first exception a
        handler raised (failure until then)."""
        sock = socket_for(fd) if fd is not None else None
        if sock is None or state is None or self._on_connection is None or failure is not None:
            if sock is not None:
                sock.close()
            refused.append(index)
            return failure
        try:
            self._on_connection(sock, state)
        except BaseException as e:  # noqa: B902 - the handler owns that one; the rest go back
            return e
        return None

    def _handoff_event(self, params):
        def indices(key):
            v = params.get(key)
            if v is None:
                return []
            if not isinstance(v, list) or not all(type(i) is int and i >= 0 for i in v):
                return None
            return v

        batch, landed = params.get("batch"), params.get("landed")
        returned, abandoned = indices("returned"), indices("abandoned")
        done = None
        before = self._pending()
        if type(batch) is int and type(landed) is int and landed >= 0 and returned is not None and abandoned is not None:
            done = self._sender.complete(batch, landed, returned, abandoned)
        if done is None:
            raise Error(errno.EBADMSG, "invalid handoff event from brokerd")
        self.summary.landed += done.landed
        self.summary.abandoned += done.abandoned
        # A handler that raises stops nothing here: the rest is given back, and the queue moves on.
        failure = None
        try:
            self._give_back(done.returned)
        except BaseException as e:  # noqa: B902
            failure = e
        try:
            self._pump()
        except BaseException as e:  # noqa: B902
            failure = failure or e
        self._check_done(before)
        if failure is not None:
            raise failure

    def _give_back(self, items):
        """Every item reaches on_returned (or is closed without one); the first exception is
        raised once all are given."""
        self.summary.returned += len(items)
        failure = None
        for item in items:
            sock = socket_for(item.fd)
            if sock is None:
                continue
            if self._on_returned is None:
                sock.close()
                continue
            try:
                self._on_returned(sock, item.state)
            except BaseException as e:  # noqa: B902
                failure = failure or e
        if failure is not None:
            raise failure

    def _check_done(self, pending_before):
        if pending_before == 0 or self._pending() != 0:
            return
        self._end_sending()
        if self._on_handoff_done is not None:
            self._on_handoff_done(self.summary)

    # -- The link (client-lib/src/link.cpp) ----------------------------------------------------

    def _link_up(self):
        return self._phase is _Phase.CONNECTED and self._stream is not None

    @staticmethod
    def _error(code, message):
        return Error(code, message)

    def _close_stream(self):
        self._unwatch_stream()
        if self._stream is not None:
            self._last_fd = self._stream.fileno()
            self._stream.close()
            self._stream = None

    def _disconnected(self, error):
        """What was never sent is the caller's again. What was in flight may be served already:
        with reconnect it is in doubt, held until the brokerd found again says where it went
        (Resume); without, it closes, so that nothing is served twice."""
        if self._phase is _Phase.HELLO:
            self._retry_later()  # nothing was handed on this connection
            return
        before = self._pending()
        self._sender.requeue_newest(self._stream.unsent_borrowed() if self._stream else 0)
        # The direct channels go on without brokerd; a Peers question dies with it.
        direct = self._path is Path.DIRECT
        if self._path is Path.ASKED:
            self._path = Path.UNASKED
        self._close_stream()  # nothing queued may go out after this: its borrowed fds are given back
        self._peer_gone = False
        self._retry_at = 0.0
        again = self._reconnect
        if not again:
            self.summary.abandoned += self._sender.drop_in_flight()
        self._phase = _Phase.WAITING if again else _Phase.CLOSED
        self._failures = 0
        self._attempt_at = time.monotonic() + self._backoff(0)
        failure = None
        try:
            if not direct:
                self._give_back(self._sender.take_unsent())
        except BaseException as e:  # noqa: B902
            failure = e
        self._check_done(before)
        if self._on_link is not None:
            try:
                self._on_link(Link.LOST, error)
            except BaseException as e:  # noqa: B902
                failure = failure or e
        if failure is not None:
            raise failure
        if not again:
            raise error

    def _backoff(self, n):
        """The wait before attempt n: min * 2^n capped at max, then between half and all of it."""
        lo = max(0.001, self._reconnect_min)
        hi = max(lo, self._reconnect_max)
        d = min(hi, lo * (2 ** min(n, 32)))
        return d - d / 2 + self._jitter.uniform(0, d / 2)

    def _retry_later(self):
        self._close_stream()
        self._peer_gone = False
        self._retry_at = 0.0
        self._phase = _Phase.WAITING
        self._failures += 1
        self._attempt_at = time.monotonic() + self._backoff(self._failures)

    def _attempt(self):
        """One non-blocking connect(): an AF_UNIX connect completes or fails at once, and any
        failure is a wait. On success the Hello goes out; process() reads its reply."""
        if time.monotonic() < self._attempt_at:
            return False
        sock = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            if sock.fileno() == self._last_fd:
                # A caller that polls fileno() re-registers when the number changes: never the
                # number of the connection before, which it may still take for the one it registered.
                moved = socket.socket(fileno=fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, self._last_fd + 1))
                sock.close()
                sock = moved
            sock.connect(_unix_address(self._socket_path))
        except OSError:
            if sock is not None:
                sock.close()
            self._retry_later()
            return True
        self._stream = Stream(sock)
        self._stream.allow_lost_fds = True
        self._phase = _Phase.HELLO
        self._hello_deadline = time.monotonic() + _limits.DEFAULT_CALL_TIMEOUT
        if self._stream.enqueue(_call("Hello", self._hello)) < 0:
            self._retry_later()
            return True
        r = self._flush_or_defer()
        if r < 0 and r != -errno.EAGAIN and not _is_disconnect(r):
            self._retry_later()
        return True

    def _hello_reply(self, body, fds):
        """The new brokerd's answer. As the same instance: subscribe, tell it what the one before
        left unsaid (Resume), say again what it had been told, report CONNECTED; else rejected."""
        close_all(fds)
        if "error" in body:
            self._reject(_error_of(body, "brokerd refused the new Hello"))
        params = body.get("parameters")
        try:
            if not isinstance(params, dict):
                raise Error(errno.EBADMSG, "invalid Hello reply from brokerd: no parameters")
            who = (_member(params, "service", str), _member(params, "instance", str), _member(params, "generation", int))
            events = self._events_parameters(params)
            self._remember_token(params)
        except Error as e:
            self._reject(e)
        was = (self.service, self.instance, self.generation)
        if who != was:
            self._reject(Error(errno.ESTALE, "brokerd knows this worker as %s instance %s generation %d, not %s "
                               "instance %s generation %d" % (who + was)))
        self._phase = _Phase.CONNECTED
        self._failures = 0
        # Said even when empty: brokerd waits for every instance that spoke to its predecessor.
        resume = {"in_doubt": [{"batch": b, "count": n} for b, n in self._sender.in_flight()],
                  "received": self._receipts.list(_limits.HANDOFF_BATCH_BYTES // 2)}
        calls = [_call("Events", events, more=True), _call("Resume", resume, oneway=True)]
        if self._said_ready:
            calls.append(_call("Ready", oneway=True))
        if self._last_status is not None:
            calls.append(_call("Status", {"text": self._last_status}, oneway=True))
        for call in calls:
            self._enqueue(call)
        self._flush_now()
        # Connections queued while it was gone (a direct channel's receiver lost with it) go on.
        self._pump()
        if self._on_link is not None:
            self._on_link(Link.CONNECTED, None)

    def _remember_token(self, params):
        """A brokerd that names this instance's token (a registered worker has none of its own)
        is told it on reconnect."""
        token = params.get("token")
        if isinstance(token, str):
            self._hello = {"token": token, "want_fds": False}
            if self._accept_handoff:
                self._hello["accept_handoff"] = True

    def _reject(self, error):
        self._close_stream()
        self._peer_gone = False
        self._retry_at = 0.0
        self._phase = _Phase.REJECTED
        # No brokerd will say where the handoffs in doubt went: closed, as without reconnect.
        before = self._pending()
        self.summary.abandoned += self._sender.drop_in_flight()
        if self._on_link is not None:
            self._on_link(Link.REJECTED, error)
        self._check_done(before)
        raise error


def _is_disconnect(r):
    return r in (-errno.EPIPE, -errno.ECONNRESET)
