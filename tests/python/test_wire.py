#!/usr/bin/env python3
"""broker_client's framing and fd queue, by docs/protocol.md's rules, on socketpairs: split reads,
fds that arrive with the tail of the message before, surplus and missing fds, MSG_CTRUNC, the
limits on size, depth and queued fds, and which fds a send closes."""

import array
import errno
import json
import os
import resource
import socket
import unittest

from broker_client import _limits, _wire


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def send(sock, data, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return sock.sendmsg([data], anc)


def message(params):
    return json.dumps({"parameters": params}).encode() + b"\0"


class Framing(unittest.TestCase):
    def setUp(self):
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.b.setblocking(False)
        self.stream = _wire.Stream(self.b)
        self.before = open_fds()

    def tearDown(self):
        self.a.close()
        self.stream.close()

    def receive_all(self):
        while self.stream.receive() > 0:
            pass

    def test_a_message_split_in_one_byte_reads(self):
        data = message({"event": "drain", "timeout_ms": 30000})
        for i, byte in enumerate(data):
            send(self.a, bytes([byte]))
            self.assertEqual(self.stream.receive(), 1)
            n, got = self.stream.next()
            if i < len(data) - 1:
                self.assertEqual(n, 0, "a message before its NUL, at byte %d" % i)
        self.assertEqual(n, 1)
        self.assertEqual(got, ({"parameters": {"event": "drain", "timeout_ms": 30000}}, []))

    def test_fds_that_come_with_the_tail_of_the_message_before_are_the_next_ones(self):
        r, w = os.pipe()
        first = message({"event": "drain"})
        second = message({"connections": [{"fd": 0}]})
        send(self.a, first[:5])
        self.stream.receive()
        # The second message's fd rides the sendmsg that also carries the first's tail.
        send(self.a, first[5:] + second, [r])
        os.close(r)
        self.receive_all()
        n, (body, fds) = self.stream.next()
        self.assertEqual((n, body["parameters"], fds), (1, {"event": "drain"}, []))
        n, (body, fds) = self.stream.next()
        self.assertEqual(n, 1)
        self.assertEqual(len(fds), 1)
        os.write(w, b"x")
        self.assertEqual(os.read(fds[0], 1), b"x", "the fd is the pipe sent")
        os.close(fds[0])
        os.close(w)

    def test_surplus_fds_are_a_protocol_error_and_closed(self):
        r, w = os.pipe()
        send(self.a, message({"event": "drain"}), [r, w])
        os.close(r)
        os.close(w)
        self.receive_all()
        self.assertEqual(self.stream.next(), (-errno.EPROTO, None))
        self.assertTrue(self.stream.broken)
        self.assertEqual(open_fds(), self.before, "the surplus fds are closed")

    def test_missing_fds_are_a_protocol_error(self):
        send(self.a, message({"connections": [{"fd": 0}, {"fd": 1}]}))
        self.receive_all()
        self.assertEqual(self.stream.next(), (-errno.EPROTO, None))

    def test_ctrunc_breaks_the_stream_and_closes_what_came(self):
        fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(4)]
        send(self.a, message({"connections": [{"fd": i} for i in range(4)]}), fds)
        for fd in fds:
            os.close(fd)
        with fd_limit(room_for(2)):
            r = self.stream.receive()
        self.assertEqual(r, -errno.EPROTO)
        self.assertEqual(open_fds(), self.before, "the fds that were installed are closed")

    def test_ctrunc_on_the_events_stream_gives_the_message_with_the_missing_fds_as_none(self):
        self.stream.allow_lost_fds = True
        fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(4)]
        send(self.a, message({"connections": [{"fd": i} for i in range(4)]}), fds)
        for fd in fds:
            os.close(fd)
        with fd_limit(room_for(2)):
            self.assertGreater(self.stream.receive(), 0)
        n, (body, got) = self.stream.next()
        self.assertEqual(n, 1)
        self.assertEqual(len(got), 4)
        came = [fd for fd in got if fd is not None]
        self.assertEqual(got[len(came):], [None] * (4 - len(came)), "what came comes first, then None")
        self.assertLess(len(came), 4)
        _wire.close_all(came)
        self.assertEqual(open_fds(), self.before)

    def test_received_fds_are_cloexec(self):
        r, w = os.pipe2(0)  # inheritable on this side
        send(self.a, message({"c": [{"fd": 0}]}), [r])
        os.close(r)
        os.close(w)
        self.receive_all()
        _, (_, fds) = self.stream.next()
        self.assertFalse(os.get_inheritable(fds[0]))
        os.close(fds[0])

    def test_more_than_506_unclaimed_fds_are_refused(self):
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        refs = {"c": [{"fd": i} for i in range(253)]}
        send(self.a, json.dumps({"parameters": refs}).encode(), [fd] * 253)  # no NUL yet: unclaimed
        self.assertGreater(self.stream.receive(), 0)
        send(self.a, b" ", [fd] * 253)
        self.assertGreater(self.stream.receive(), 0, "506 queued is the limit, not over it")
        send(self.a, b" ", [fd])
        self.assertEqual(self.stream.receive(), -errno.EPROTO)
        os.close(fd)
        self.assertEqual(open_fds(), self.before)

    def test_size_limit(self):
        pad = _limits.MAX_MESSAGE_SIZE - len(json.dumps({"p": ""}))
        at_limit = json.dumps({"p": "x" * pad}).encode()
        self.assertEqual(len(at_limit), _limits.MAX_MESSAGE_SIZE)
        self.a.setblocking(False)
        for data, want in ((at_limit + b"\0", 1), (b"{" + at_limit + b"\0", -errno.EMSGSIZE)):
            stream = _wire.Stream(self.b)
            pending = memoryview(data)
            n = 0
            while n == 0:
                try:
                    pending = pending[self.a.send(pending):]
                except BlockingIOError:
                    pass
                r = stream.receive()
                self.assertNotEqual(r, 0)
                n, _ = stream.next()
            self.assertEqual(n, want)

    def test_depth_limit(self):
        for depth, ok in ((64, True), (65, False)):
            text = "[" * (depth - 1) + "]" * (depth - 1)
            body = '{"p":%s}' % text if depth > 1 else "{}"
            self.assertEqual(_wire.parse(body.encode()) is not None, ok, "depth %d" % depth)

    def test_fd_references(self):
        table = [
            ({"fd": 0}, 1),
            ({"a": [{"fd": 1}, {"b": {"fd": 0}}]}, 2),
            ({"fd": None}, 0),
            ({"fd": 1}, -errno.EBADMSG),
            ({"a": [{"fd": 0}, {"fd": 0}]}, -errno.EBADMSG),
            ({"fd": -1}, -errno.EBADMSG),
            ({"fd": "0"}, -errno.EBADMSG),
            ({"fd": True}, -errno.EBADMSG),
            ({"fd": 0.0}, -errno.EBADMSG),
            ({"c": [{"fd": i} for i in range(254)]}, -errno.EBADMSG),
        ]
        for params, want in table:
            with self.subTest(params=str(params)[:40]):
                self.assertEqual(_wire.count_fd_refs({"parameters": params}), want)
        self.assertEqual(_wire.count_fd_refs({"fd": 0}), 0, "only inside parameters")

    def test_a_send_closes_owned_fds_and_keeps_borrowed_ones(self):
        owned = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        borrowed = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        out = _wire.Stream(self.a)
        self.assertEqual(out.enqueue({"method": "m", "parameters": {"fd": 0}}, [owned]), 0)
        self.assertEqual(out.enqueue({"method": "m", "parameters": {"fd": 0}}, [borrowed], borrowed=True), 0)
        self.assertEqual(out.unsent_borrowed(), 1)
        self.assertEqual(out.flush(), 0)
        self.assertEqual(out.unsent_borrowed(), 0)
        self.assertFalse(os.path.exists("/proc/self/fd/%d" % owned) and owned != borrowed, "owned fd closed once sent")
        os.fstat(borrowed)  # still open
        os.close(borrowed)
        self.receive_all()
        for _ in range(2):
            n, (_, fds) = self.stream.next()
            self.assertEqual((n, len(fds)), (1, 1))
            os.close(fds[0])
        out.sock = None  # self.a is closed by tearDown

    def test_enqueue_refusals(self):
        out = _wire.Stream(self.a)
        self.assertEqual(out.enqueue({"parameters": {"fd": 0}}, []), -errno.EBADMSG)
        self.assertEqual(out.enqueue({"parameters": {}}, list(range(254))), -errno.E2BIG)
        self.assertEqual(out.enqueue({"parameters": {"p": "x" * _limits.MAX_MESSAGE_SIZE}}), -errno.EMSGSIZE)
        self.assertFalse(out.want_write())
        out.sock = None


def room_for(n):
    """The RLIMIT_NOFILE soft limit under which exactly n more fds can be opened."""
    used = {int(fd) for fd in open_fds()}
    limit = 0
    while limit - len([fd for fd in used if fd < limit]) < n:
        limit += 1
    return limit


class fd_limit:
    """RLIMIT_NOFILE's soft limit lowered for a block: the kernel then installs fewer fds than came."""

    def __init__(self, soft):
        self.soft = soft

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_NOFILE, self.old)


if __name__ == "__main__":
    unittest.main()
