#!/usr/bin/env python3
"""Writes the seed corpora of the targets that read their input through fuzz::DataProvider
(varlink, handoff), so that each seed is the script its name says, and those of persist, whose
slot headers carry checksums no one writes by hand.

usage: tests/fuzz/seeds.py [CORPUS_DIR]   (default: tests/fuzz/corpus beside this script)

DataProvider (FuzzedDataProvider's layout) takes integers off the end of the input, most
significant byte first and one byte per 8 bits of the range, and strings off its front, where a
backslash doubles and a backslash before anything else ends the string. A seed written as plain
text is read some other way: a Varlink message whose last byte is taken for a count never ends,
and the fds meant to travel with it never go. Here each seed is the calls of one run, encoded.
"""
import pathlib
import struct
import sys
import zlib

KMAX_BATCH_ID = (1 << 64) - 1


class Script:
    """The bytes a DataProvider run consumes, in the order the target asks for them."""

    def __init__(self):
        self.front = bytearray()  # strings, in order
        self.back = bytearray()  # integers' bytes, in the order they are taken

    def integer(self, value, lo, hi):
        assert lo <= value <= hi
        span = hi - lo
        nbytes = 0
        while nbytes < 8 and span >> (8 * nbytes) > 0:
            nbytes += 1
        self.back += (value - lo).to_bytes(nbytes, "big")
        return self

    def boolean(self, value):
        return self.integer(1 if value else 0, 0, 255)

    def string(self, text):
        """ConsumeRandomLengthString: the text, then a backslash and a byte that end it."""
        self.front += text.replace(b"\\", b"\\\\") + b"\\."
        return self

    def rest(self, text):
        """ConsumeRemainingBytesAsString: the text as it is, the last thing taken."""
        self.front += text
        return self

    def bytes(self):
        return bytes(self.front) + bytes(reversed(self.back))


# fuzz_varlink.cpp: the maximum message size (a bool, then 1..512 when false), whether lost fds are
# allowed, then writes: fds attached (0..8 halved), then the bytes.
def varlink(writes, max_message=None, lose=False):
    s = Script().boolean(max_message is None)
    if max_message is not None:
        s.integer(max_message, 1, 512)
    s.boolean(lose)
    for nfds, chunk in writes:
        s.integer(nfds * 2, 0, 8)
        s.string(chunk)
    return s.bytes()


HELLO = (b'{"method":"io.brokerd.Worker.Hello","parameters":{"service":"web",'
         b'"token":"0123456789abcdef","pid":42}}\0')
EVENTS = b'{"method":"io.brokerd.Worker.Events","more":true}\0'
HANDOFF = (b'{"method":"io.brokerd.Worker.Handoff","parameters":{"batch":1,"connections":'
           b'[{"fd":0,"state":"aGVsbG8="},{"fd":1}],"remaining":0}}\0')
STATUS = b'{"method":"io.brokerd.Worker.Status","oneway":true,"parameters":{"text":"serving \\u00e9 [{\\"x\\"}"}}\0'
REPLY = (b'{"parameters":{"event":"handoff","listeners":[{"name":"http","fd":null}]},"continues":true}\0'
         b'{"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"service"}}\0')


def nested(depth):
    return b'{"parameters":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\0"


VARLINK = {
    # Two messages in one write.
    "hello": varlink([(0, HELLO + EVENTS)]),
    # A message with its two fds, which is echoed back with them.
    "handoff-fds": varlink([(2, HANDOFF)]),
    # One message cut into three writes, the escapes in its text kept.
    "oneway-pieces": varlink([(0, STATUS[:30]), (0, STATUS[30:70]), (0, STATUS[70:])]),
    "reply-continues": varlink([(0, REPLY)]),
    # An empty message: refused.
    "status": varlink([(0, b"\0" + b'{"method":"io.brokerd.Control.Status","parameters":{"service":"web"}}\0')]),
    # At the nesting limit (64 levels, the object included), and one over it.
    "nested-64": varlink([(0, nested(64))]),
    "nested-65": varlink([(0, nested(65))]),
    # A message over a 40-byte limit.
    "over-limit": varlink([(0, HELLO)], max_message=40),
    # Fds that come with a message referencing fewer of them.
    "extra-fds": varlink([(1, EVENTS)], lose=True),
}


# fuzz_handoff.cpp: a bool (odd: the base64 codec on the rest; even: a Sender script).
def codec(text):
    return Script().boolean(True).rest(text).bytes()


class Sender:
    """A Sender script: steps 0..7 of fuzz_handoff.cpp's switch, with their arguments."""

    def __init__(self):
        self.s = Script().boolean(False)
        self.sent = 0  # batches next() gave out, as the target counts them

    def add(self, n, state_len, own):
        self.s.integer(0, 0, 7).integer(n, 1, 260).boolean(state_len == 0)
        if state_len:
            self.s.integer(state_len, 1, 64)
        self.s.boolean(own)
        return self

    def next(self, gives=True):
        self.s.integer(1, 0, 7)
        self.sent += gives
        return self

    def complete(self, sent_index, landed, returned):
        """The answer for the batch sent_index (an index into what next() gave out)."""
        self.s.integer(2, 0, 7).boolean(False).integer(sent_index, 0, self.sent - 1)
        self.s.integer(landed, 0, 300).integer(len(returned), 0, 8)
        for r in returned:
            self.s.integer(r, 0, 300)
        return self

    def complete_unknown(self, batch_id):
        self.s.integer(2, 0, 7).boolean(True).integer(batch_id, 0, KMAX_BATCH_ID)
        self.s.integer(0, 0, 300).integer(0, 0, 8)
        return self

    def step(self, case, arg=None, hi=None):
        self.s.integer(case, 0, 7)
        if arg is not None:
            self.s.integer(arg, 0, hi)
        return self

    def bytes(self):
        return self.s.bytes()


HANDOFF_SEEDS = {
    "codec-pad": codec(b"QQ==QUJD"),
    "codec-text": codec(b"aGVsbG8gd29ybGQ="),
    # Three connections in one batch: two land, the third comes back.
    "sender-script": Sender().add(3, 5, True).next().complete(0, 2, [2]).step(6).bytes(),
    # An unknown batch, a repeated index, a requeue, a narrower window, then the broker gone.
    "sender-broker-gone": (Sender().add(2, 0, True).add(1, 0, False).step(5, 1, 20).next().next(gives=False)
                           .complete_unknown(99).complete(0, 0, [1, 1]).step(3, 0, 0).next()
                           .step(4, 1, 10).next().step(7).step(6).bytes()),
}


def persist_slot(seq, payload, fmt=1):
    """One slot of the crash state (broker/daemon/persist.hpp): its 64-byte header, then payload."""
    h = bytearray(64)
    h[0:8] = b"BRKDST01"
    struct.pack_into("<I", h, 8, fmt)
    struct.pack_into("<QQI", h, 16, seq, len(payload), zlib.crc32(payload))
    struct.pack_into("<I", h, 12, zlib.crc32(bytes(h)))
    return bytes(h) + payload


def persist_seed(slot0, slot1):
    """fuzz_persist's input: a little-endian u16 length of slot 0's bytes, then both slots."""
    return struct.pack("<H", len(slot0)) + slot0 + slot1


PERSIST_OLD = b'{"format":1,"services":[]}'
PERSIST_NEW = b'{"format":1,"services":[{"name":"web"}]}'
PERSIST = {
    "empty": persist_seed(b"", b""),
    "one-slot": persist_seed(b"", persist_slot(1, PERSIST_OLD)),
    "two-slots": persist_seed(persist_slot(2, PERSIST_NEW), persist_slot(1, PERSIST_OLD)),
    "torn-newest": persist_seed(persist_slot(2, PERSIST_NEW)[:-3] + b"XYZ", persist_slot(1, PERSIST_OLD)),
    "other-format": persist_seed(b"", persist_slot(1, PERSIST_OLD, fmt=2)),
    "wrong-slot-seq": persist_seed(persist_slot(1, PERSIST_OLD), b""),
    "not-a-state": persist_seed(b'{"services":[]}', b""),
}


def main():
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "corpus"
    for target, seeds in (("varlink", VARLINK), ("handoff", HANDOFF_SEEDS), ("persist", PERSIST)):
        for name, data in seeds.items():
            (root / target / name).write_bytes(data)


if __name__ == "__main__":
    main()
