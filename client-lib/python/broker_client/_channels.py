"""The Client's direct handoff channels, as client-lib/src/channel.cpp has them: a sender writes its
connections straight to each receiver on a socket pair brokerd made for the two, and the receiver
acknowledges each frame there (_frames.py). brokerd still counts: the sender tells it what moved
(Handed).

What holds whatever happens:
- A sender keeps each connection until its frame is acknowledged. A channel that ends first (the
  receiver died or broke the protocol) gives its unacknowledged connections back (on_returned);
  what was never sent goes to the other receivers or, when none is left, brokerd's path.
- A receiver acknowledges a frame once on_connection has each of its connections, so one that dies
  in its handler loses none: the sender serves them on.

Channels is a part of Client (client.py), kept apart as channel.cpp is from client.cpp.
"""

import collections
import enum
import errno
import fcntl
import os
import resource
import select
import socket
import time

from . import _frames
from ._wire import FD_PRESSURE_RETRY, call, close_all

# Channels at once in each direction: a sender's receivers, and a receiver's senders. One past it
# closes at once, and its sender takes back what it writes.
MAX_PEERS = 64
# Frames read from one channel in a row before the others get a turn.
FRAMES_PER_WAKEUP = 64
# The fd table a receiver grows to when connections first come (see _grow_fd_table()).
FD_TABLE_SLOTS = 65536


def _grow_fd_table(any_fd):
    """Connections are coming, as many as a sender's window: the process's fd table grows to hold
    them now, in one step, instead of doubling again and again as they arrive. In a process with
    more than one thread each step waits for an RCU grace period (about 10 ms); here it costs one.
    Up to the fd limit, at most FD_TABLE_SLOTS; tables never shrink."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    slots = FD_TABLE_SLOTS if soft == resource.RLIM_INFINITY else min(soft, FD_TABLE_SLOTS)
    if slots < 2:
        return
    try:
        os.close(fcntl.fcntl(any_fd, fcntl.F_DUPFD_CLOEXEC, slots - 1))
    except OSError:
        pass


class Path(enum.Enum):
    """Where the connections queued in the Sender go."""
    UNASKED = 1   # nowhere yet: Peers asks brokerd for channels
    ASKED = 2     # waiting for the "peers" event
    DIRECT = 3    # on the channels
    BROKERED = 4  # as Handoff calls


class _Peer:
    __slots__ = ("sock", "instance", "sending", "watched", "unacked", "unacked_count", "blocked",
                 "sent", "landed", "returned", "acks", "ended")

    def __init__(self, sock, instance, sending):
        self.sock = sock            # a SOCK_SEQPACKET end brokerd gave us
        self.instance = instance    # at the other end
        self.sending = sending      # ours to write connections on ("peers"), else a sender's ("peer")
        self.watched = select.EPOLLIN
        # Sending: the frames not acknowledged yet, by id, their Items still ours.
        self.unacked = {}
        self.unacked_count = 0
        self.blocked = False        # the socket is full: wait for EPOLLOUT
        self.sent = self.landed = self.returned = 0  # not told to brokerd yet (Handed)
        # Receiving: acknowledgements the socket did not take yet.
        self.acks = collections.deque()
        self.ended = False          # the other end closed, or broke the protocol


def _peer_entry(p, fds):
    """(instance, fd or None) of a "peers" or "peer" entry, the fd taken out of fds; None when
    malformed."""
    if not isinstance(p, dict) or not isinstance(p.get("instance"), str):
        return None
    i = p.get("fd")
    if type(i) is not int or not 0 <= i < len(fds):
        return None
    fd, fds[i] = fds[i], None
    return p["instance"], fd


def _waiting(p):
    """The frames waiting on p's channel, at most FRAMES_PER_WAKEUP: (r, Received or None) as
    receive_frame() gives each, until nothing waits or the channel has ended."""
    for _ in range(FRAMES_PER_WAKEUP):
        if p.ended:
            return
        r, got = _frames.receive_frame(p.sock)
        if r == -errno.EAGAIN:
            return
        yield r, got


class Channels:
    """The channel half of Client: its state, and the methods client.py calls."""

    def _init_channels(self):
        self._peer_handoff = False  # brokerd makes channels, and our Events said we speak them
        self._path = Path.UNASKED
        self._peers = []
        self._rotation = 0          # the sending peer that gets the next frame
        self._next_frame = 1
        self._window_fds = 1 << 62  # connections unacknowledged on all channels at once
        self._unacked_out = 0
        # Once brokerd makes channels, fileno() is this epoll set, holding the stream and every
        # channel; it stays for the Client's life, as the caller may hold its number.
        self._epoll = None
        self._fd_table_grown = False
        self._watched_stream = -1
        self._watched_stream_events = 0

    def _events_parameters(self, hello_params):
        """Events' parameters after a Hello whose reply said hello_params."""
        self._peer_handoff = hello_params.get("peer_handoff") is True
        if self._peer_handoff and self._epoll is None:
            self._epoll = select.epoll()  # CLOEXEC
        self._watch()
        return {"peer_handoff": True} if self._peer_handoff else {}

    def _pending(self):
        return self._sender.pending() + self._unacked_out

    def _close_channels(self):
        for p in self._peers:
            p.sock.close()
            for items in p.unacked.values():
                close_all(item.fd for item in items)
        self._peers = []
        self._unacked_out = 0
        self._unwatch_stream()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    # -- brokerd's events ----------------------------------------------------------------------

    def _peers_event(self, params, fds):
        """The answer to our Peers call: a channel per receiver, or none, and brokerd's path is
        ours. An answer nobody waits for (a Peers of a connection lost since) closes its ends."""
        asked = self._path is Path.ASKED
        entries = params.get("peers")
        ok = isinstance(entries, list)
        for p in entries if ok else []:
            entry = _peer_entry(p, fds)
            ok = ok and entry is not None
            if entry is not None and entry[1] is not None:
                if asked:
                    self._add_peer(entry[1], entry[0], True)
                else:
                    close_all([entry[1]])
        if asked:
            direct = any(p.sending and not p.ended for p in self._peers)
            self._path = Path.DIRECT if direct else Path.BROKERED
            self._pump()
        if not ok:
            raise self._error(errno.EBADMSG, "invalid peers event from brokerd")

    def _peer_event(self, params, fds):
        """A sender of our service will write connections on this channel."""
        entry = _peer_entry(params.get("peer"), fds)
        if entry is None:
            raise self._error(errno.EBADMSG, "invalid peer event from brokerd")
        receiving = sum(not p.sending for p in self._peers)
        if entry[1] is None:
            return
        if receiving < MAX_PEERS:
            had = len(self._peers)
            self._add_peer(entry[1], entry[0], False)
            if len(self._peers) > had:
                self._grow_fd_table(self._peers[-1].sock.fileno())
        else:
            close_all([entry[1]])

    def _grow_fd_table(self, any_fd):
        """Once, when connections first come (a channel, or brokerd's connections event)."""
        if not self._fd_table_grown:
            self._fd_table_grown = True
            _grow_fd_table(any_fd)

    def _add_peer(self, fd, instance, sending):
        """Into the epoll set that fileno() is; closed at once when it cannot be watched: its
        sender takes back what it writes, or ours go brokerd's way."""
        if (sending and sum(p.sending for p in self._peers) >= MAX_PEERS) or self._epoll is None:
            close_all([fd])
            return
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            close_all([fd])
            return
        try:
            self._epoll.register(sock.fileno(), select.EPOLLIN)
        except OSError:
            sock.close()
            return
        self._peers.append(_Peer(sock, instance, sending))

    # -- Sending -------------------------------------------------------------------------------

    def _pump_direct(self):
        """Frames to the receivers in turn, while one has room; what they cannot take waits."""
        queue = self._sender.queue
        while queue:
            if self._retry_at and time.monotonic() < self._retry_at:
                return
            self._retry_at = 0.0
            p = None
            for k in range(len(self._peers)):
                c = self._peers[(self._rotation + k) % len(self._peers)]
                if c.sending and not c.ended and not c.blocked and self._unacked_out < self._window_fds:
                    p = c
                    self._rotation = (self._rotation + k + 1) % len(self._peers)
                    break
            if p is None:
                break
            n = _frames.frame_fit(queue, self._window_fds - self._unacked_out)
            frame = _frames.encode_connections(self._next_frame, (queue[i].state for i in range(n)))
            r = _frames.send_frame(p.sock, frame, [queue[i].fd for i in range(n)])
            if r == -errno.EAGAIN:
                p.blocked = True
                continue
            if r == -errno.ETOOMANYREFS:
                self._retry_at = time.monotonic() + FD_PRESSURE_RETRY
                return
            if r < 0:
                p.ended = True  # _serve_peers() gives its connections back
                continue
            p.unacked[self._next_frame] = [queue.popleft() for _ in range(n)]
            self._next_frame += 1
            p.unacked_count += n
            self._unacked_out += n
            p.sent += n
        if not any(p.sending and not p.ended for p in self._peers):
            self._path = Path.UNASKED  # every receiver has gone: ask brokerd again

    def _lose_peer(self, p, back):
        """The channel to a receiver has ended: what it never acknowledged comes back."""
        p.ended = True
        for items in p.unacked.values():
            p.returned += len(items)
            back.extend(items)
        p.unacked.clear()
        self._unacked_out -= p.unacked_count
        p.unacked_count = 0

    def _read_acks(self, p, back):
        """A receiver's acknowledgements: the landed connections close, the refused come back.
        Anything else from it (fds, a frame we never sent, bad indices) ends the channel."""
        did = False
        for r, got in _waiting(p):
            did = True
            items = refused = None
            if r > 0:
                clean = not got.fds and not got.truncated
                got.close()
                try:
                    ident, _ = _frames.decode_ack(got.data)
                    items = p.unacked.get(ident) if clean else None
                    if items is not None:
                        _, refused = _frames.decode_ack(got.data, len(items))
                except _frames.FrameError:
                    items = None
            if items is None or refused is None:
                self._lose_peer(p, back)
                break
            back.extend(items[i] for i in refused)
            landed = len(items) - len(refused)
            p.landed += landed
            p.returned += len(refused)
            self.summary.landed += landed
            p.unacked_count -= len(items)
            self._unacked_out -= len(items)
            del p.unacked[ident]
            gone = set(refused)
            # The landed ones close here: the receiver holds them now.
            close_all(item.fd for i, item in enumerate(items) if i not in gone)
        return did

    def _report_handed(self):
        """What moved on each channel since the last report, to brokerd, for its counters. Lost
        with a lost link: the connections never depend on it."""
        if not self._link_up():
            return
        told = False
        for p in self._peers:
            if not p.sending or not (p.sent or p.landed or p.returned):
                continue
            params = {"peer": p.instance, "sent": p.sent, "landed": p.landed, "returned": p.returned,
                      "remaining": len(self._sender.queue)}
            p.sent = p.landed = p.returned = 0
            if self._stream.enqueue(call("Handed", params, oneway=True)) < 0:
                break
            told = True
        if told:
            self._flush_or_defer()

    # -- Receiving -----------------------------------------------------------------------------

    def _read_frames(self, p):
        """A sender's frames, checked: [(id, fds, states)], a None fd where it did not arrive.
        One that breaks the protocol ends the channel, its fds closed."""
        frames = []
        for r, got in _waiting(p):
            if r <= 0 or got.truncated:
                if got is not None:
                    got.close()
                p.ended = True
                break
            try:
                ident, states = _frames.decode_connections(got.data)
            except _frames.FrameError:
                states = None
            if states is None or len(got.fds) > len(states) or (len(got.fds) < len(states) and not got.fds_cut):
                got.close()
                p.ended = True
                break
            fds = got.fds + [None] * (len(states) - len(got.fds))  # those the fd limit cut off: refused
            got.fds = []
            frames.append((ident, fds, states))
        return frames

    def _take_frame(self, p, frame, failure):
        """A frame's connections to on_connection, then its acknowledgement: a receiver that dies
        inside the handler never acknowledged them (refused as _deliver() says). Returns the first
        exception a handler raised, or failure as it was."""
        ident, fds, states = frame
        refused = []
        for i, (fd, state) in enumerate(zip(fds, states)):
            failure = self._deliver(fd, state, failure, refused, i)
        p.acks.append(_frames.encode_ack(ident, refused))
        return failure

    def _write_acks(self, p):
        """Writes what acknowledgements the socket takes. With the sender gone they have nobody to
        go to, and need none: its copies closed as it went."""
        p.blocked = False
        while p.acks:
            r = _frames.send_frame(p.sock, p.acks[0])
            if r == -errno.EAGAIN:
                p.blocked = True
                return
            if r < 0:
                p.ended = True
                p.acks.clear()
                return
            p.acks.popleft()

    # -- The loop ------------------------------------------------------------------------------

    def _serve_peers(self):
        """Every channel's pending reads and writes, then what they brought: connections to
        on_connection, refused ones to on_returned, and the queue onward."""
        before = self._pending()
        did = False
        failure = None
        back = []
        for p in list(self._peers):
            if p.sending and p.ended and p.unacked_count:
                self._lose_peer(p, back)  # a write found it gone
                did = True
                continue
            if p.ended and not p.acks:
                continue
            if p.sending:
                did = self._read_acks(p, back) or did
                p.blocked = False  # EPOLLOUT, maybe: the next frame finds out
                continue
            frames = self._read_frames(p)
            did = did or bool(frames) or p.ended
            for frame in frames:
                failure = self._take_frame(p, frame, failure)
                self._write_acks(p)
            self._write_acks(p)
        try:
            self._give_back(back)
        except BaseException as e:  # noqa: B902
            failure = failure or e
        try:
            if self._path is Path.DIRECT:
                self._pump()
            else:
                self._report_handed()
        except BaseException as e:  # noqa: B902
            failure = failure or e
        self._prune_peers()
        self._check_done(before)
        if failure is not None:
            raise failure
        return did

    def _prune_peers(self):
        """Ended channels with nothing left to settle close."""
        keep = []
        for p in self._peers:
            if not p.ended or p.acks or p.unacked_count:
                keep.append(p)
                continue
            if self._epoll is not None:
                try:
                    self._epoll.unregister(p.sock.fileno())
                except (OSError, ValueError):
                    pass
            p.sock.close()
        self._peers = keep

    def _end_sending(self):
        """Everything handed has settled: the next handoff asks for channels again (to the
        receivers there are then), and ours to the receivers of this one close."""
        self._path = Path.UNASKED
        for p in self._peers:
            if p.sending:
                p.ended = True
        self._prune_peers()

    def _unwatch_stream(self):
        if self._epoll is not None and self._watched_stream >= 0:
            try:
                self._epoll.unregister(self._watched_stream)
            except (OSError, ValueError):
                pass
        self._watched_stream = -1
        self._watched_stream_events = 0

    def _watch(self):
        """The epoll set as the next wait needs it: the stream (in and, with output queued, out)
        and each channel (out while it waits for room)."""
        if self._epoll is None:
            return
        fd = self._stream.fileno() if self._stream is not None else -1
        want = select.EPOLLIN
        if self._stream is not None and self._stream.want_write() and not self._retry_at:
            want |= select.EPOLLOUT
        try:
            if fd != self._watched_stream:
                if fd >= 0:  # _close_stream() took the old one out before closing it
                    self._epoll.register(fd, want)
                    self._watched_stream, self._watched_stream_events = fd, want
            elif fd >= 0 and want != self._watched_stream_events:
                self._epoll.modify(fd, want)
                self._watched_stream_events = want
        except OSError:
            pass
        for p in self._peers:
            w = select.EPOLLIN | (select.EPOLLOUT if p.blocked or p.acks else 0)
            if (not p.ended or p.acks) and w != p.watched:
                try:
                    self._epoll.modify(p.sock.fileno(), w)
                    p.watched = w
                except OSError:
                    pass
