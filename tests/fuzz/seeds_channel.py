#!/usr/bin/env python3
"""Writes the seed corpus of the `channel` target (fuzz_channel.cpp): frames of the direct handoff
channel (proto/handoff_channel.hpp), valid and not, to decode, and queues of states to encode.

usage: tests/fuzz/seeds_channel.py [CORPUS_DIR]   (default: tests/fuzz/corpus beside this script)

The input is read through fuzz::DataProvider, as seeds.py explains: a bool first (odd: encode a
queue; even: decode), then for decode the frame's size the sender knows (0..253, 0: unknown) and
the frame as the rest of the input.
"""
import pathlib
import struct
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from seeds import Script  # noqa: E402

MAGIC = 0x4B484250
VERSION = 1
CONNECTIONS = 1
ACK = 2
MAX_STATE = 16384


def header(kind, count, nbytes, frame_id, magic=MAGIC, version=VERSION):
    """The 24-byte header, in host byte order as the channel sends it."""
    return struct.pack("=IHHIIQ", magic, version, kind, count, nbytes, frame_id)


def connections(frame_id, states):
    body = b"".join(struct.pack("=I", len(s)) for s in states) + b"".join(states)
    return header(CONNECTIONS, len(states), sum(len(s) for s in states), frame_id) + body


def ack(frame_id, refused):
    return header(ACK, len(refused), 0, frame_id) + b"".join(struct.pack("=I", r) for r in refused)


def decode(frame, count=0):
    return Script().boolean(False).integer(count, 0, 253).rest(frame).bytes()


def encode(states, max_fds=253):
    """A queue whose states are each a text repeated to a size."""
    s = Script().boolean(True).integer(len(states), 0, 300).integer(max_fds, 1, 300)
    for text, size in states:
        s.string(text).integer(size, 0, MAX_STATE)
    return s.bytes()


CHANNEL = {
    "connections-one": decode(connections(1, [b"GET / HTTP/1.1\r\n"])),
    "connections-empty-states": decode(connections(2, [b"", b"", b"x"])),
    "connections-none": decode(connections(3, [])),
    "connections-big-state": decode(connections(4, [b"s" * MAX_STATE])),
    # Lengths that do not add up to the header's bytes.
    "connections-bad-lengths": decode(header(CONNECTIONS, 2, 10, 5) + struct.pack("=II", 6, 5) + b"a" * 10),
    # Lengths that add up to less than the header's bytes.
    "connections-short-lengths": decode(header(CONNECTIONS, 2, 10, 5) + struct.pack("=II", 4, 5) + b"a" * 10),
    "connections-other-version": decode(header(CONNECTIONS, 1, 1, 6, version=2) + struct.pack("=I", 1) + b"a"),
    "ack-none": decode(ack(7, [])),
    "ack-refused": decode(ack(8, [0, 2]), count=3),
    # An acknowledgement whose header claims state bytes.
    "ack-with-bytes": decode(header(ACK, 1, 4, 11) + struct.pack("=I", 0)),
    "ack-out-of-order": decode(ack(9, [2, 1])),
    "ack-over-frame": decode(ack(10, [3]), count=3),
    # Three of the largest states: the fourth does not fit in 64 KiB.
    "encode-full-frame": encode([(b"abc", MAX_STATE)] * 4),
    "encode-mixed": encode([(b"", 0), (b"state", 5), (b"x\\y", 100)], max_fds=2),
}


def main():
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "corpus"
    (root / "channel").mkdir(parents=True, exist_ok=True)
    for name, data in CHANNEL.items():
        (root / "channel" / name).write_bytes(data)


if __name__ == "__main__":
    main()
