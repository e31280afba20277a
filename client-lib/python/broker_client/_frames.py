"""The direct handoff channel's frames, as proto/handoff_channel.cpp has them: one SOCK_SEQPACKET
message each, integers in host byte order (both ends run on one host).

  connections frame:  Header{type CONNECTIONS, id, count = fds attached, bytes = states' size}
                      u32 length[count]   each state's size, in fd order
                      states              the count states, back to back
  acknowledgement:    Header{type ACK, id = the frame's, count = refused, bytes = 0}
                      u32 refused[count]  indices into the frame, ascending, each once

The codec is pure; send_frame() and receive_frame() at the end do the I/O, never blocking.
"""

import array
import errno
import socket
import struct

from . import _limits

MAGIC = 0x4b484250  # "PBHK" in memory on little-endian hosts
VERSION = 1
CONNECTIONS = 1
ACK = 2
# magic, version, type, count, bytes, id: 24 bytes, no padding, as proto's Header.
HEADER = struct.Struct("=IHHIIQ")
_U32 = struct.Struct("=I")
_CONTROL_SPACE = socket.CMSG_SPACE(4 * _limits.MAX_FDS_PER_MESSAGE)


class FrameError(ValueError):
    """A frame that breaks the protocol: the channel it came on ends."""


def _header(frame, kind):
    if len(frame) < HEADER.size:
        raise FrameError("a frame of %d bytes, shorter than its header" % len(frame))
    magic, version, got, count, size, ident = HEADER.unpack_from(frame)
    if magic != MAGIC or version != VERSION:
        raise FrameError("a frame of another protocol or version")
    if got != kind:
        raise FrameError("a frame of type %d where %d belongs" % (got, kind))
    if count > _limits.MAX_FDS_PER_MESSAGE:
        raise FrameError("a frame of %d entries, over %d" % (count, _limits.MAX_FDS_PER_MESSAGE))
    return count, size, ident


def frame_fit(queue, max_fds):
    """How many items from the front of queue (each with .state) one frame carries: at most
    max_fds and 253, and as many as fit in MAX_FRAME_BYTES, at least one."""
    limit = min(len(queue), max_fds, _limits.MAX_FDS_PER_MESSAGE)
    size, n = HEADER.size, 0
    while n < limit:
        more = _U32.size + len(queue[n].state)
        if n > 0 and size + more > _limits.MAX_FRAME_BYTES:
            break
        size += more
        n += 1
    return n


def encode_connections(ident, states):
    """The frame of these states (bytes each); their fds travel beside it."""
    states = list(states)
    head = HEADER.pack(MAGIC, VERSION, CONNECTIONS, len(states), sum(map(len, states)), ident)
    return head + struct.pack("=%dI" % len(states), *map(len, states)) + b"".join(states)


def decode_connections(frame):
    """(id, [state bytes]) of a whole connections frame; FrameError when it is not well formed."""
    count, size, ident = _header(frame, CONNECTIONS)
    at = HEADER.size + 4 * count
    if len(frame) != at + size:
        raise FrameError("a frame of %d bytes where its header says %d" % (len(frame), at + size))
    lengths = struct.unpack_from("=%dI" % count, frame, HEADER.size)
    states = []
    for n in lengths:
        if n > _limits.MAX_HANDOFF_STATE:
            raise FrameError("a state of %d bytes, over %d" % (n, _limits.MAX_HANDOFF_STATE))
        if n > len(frame) - at:
            raise FrameError("states longer than the frame")
        states.append(bytes(frame[at:at + n]))
        at += n
    if at != len(frame):
        raise FrameError("states shorter than the frame")
    return ident, states


def encode_ack(ident, refused=()):
    refused = list(refused)
    return HEADER.pack(MAGIC, VERSION, ACK, len(refused), 0, ident) + struct.pack("=%dI" % len(refused), *refused)


def decode_ack(frame, count=0):
    """(id, [refused]) of a whole acknowledgement: well formed, refused ascending without repeats
    and each under count (the frame's size, when the caller knows it; 0: up to 253)."""
    n, size, ident = _header(frame, ACK)
    if size != 0 or len(frame) != HEADER.size + 4 * n:
        raise FrameError("an acknowledgement of %d bytes for %d refused" % (len(frame), n))
    refused = list(struct.unpack_from("=%dI" % n, frame, HEADER.size))
    limit = count or _limits.MAX_FDS_PER_MESSAGE
    for i, index in enumerate(refused):
        if index >= limit:
            raise FrameError("refused index %d of a frame of %d" % (index, limit))
        if i > 0 and index <= refused[i - 1]:
            raise FrameError("refused indices out of order or repeated")
    return ident, refused


def send_frame(sock, frame, fds=()):
    """One non-blocking sendmsg of frame with fds attached: 0, or -errno (-EAGAIN when the socket
    is full, -ETOOMANYREFS at the kernel's limit of fds in flight)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sock.sendmsg([frame], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except BlockingIOError:
        return -errno.EAGAIN
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0  # a datagram goes whole or not at all


class Received:
    """One frame as recvmsg gave it. Its fds are the holder's: take them, or close()."""
    __slots__ = ("data", "fds", "truncated", "fds_cut")

    def __init__(self, data, fds, truncated, fds_cut):
        self.data = data
        self.fds = fds              # those the kernel installed here, CLOEXEC
        self.truncated = truncated  # MSG_TRUNC: longer than MAX_FRAME_BYTES (the rest is gone)
        self.fds_cut = fds_cut      # MSG_CTRUNC: fds beyond these did not arrive (fd limit)

    def close(self):
        for fd in self.fds:
            try:
                socket.close(fd)
            except OSError:
                pass
        self.fds = []


def receive_frame(sock):
    """One non-blocking recvmsg: (1, Received), (0, None) at the end of the stream, or (-errno,
    None) (-EAGAIN when nothing waits)."""
    try:
        data, ancdata, flags, _ = sock.recvmsg(_limits.MAX_FRAME_BYTES, _CONTROL_SPACE,
                                               socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return -errno.EAGAIN, None
    except OSError as e:
        return -(e.errno or errno.EIO), None
    # Every fd is ours the moment recvmsg returns.
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    got = Received(data, list(fds), bool(flags & socket.MSG_TRUNC), bool(flags & socket.MSG_CTRUNC))
    if not data and not got.fds and not got.truncated:
        return 0, None  # SOCK_SEQPACKET: a zero-length read is the end; frames are never empty
    return 1, got
