#!/usr/bin/env python3
"""broker_client's handoff bookkeeping (_handoff.py), as proto/handoff.cpp's tests hold it: batches
of at most 253 fds under the message limit, the window, brokerd's answers matched to the fds held
(landed and abandoned closed, returned given back, nothing else touched), and the receipts ring."""

import os
import unittest

from broker_client import _handoff, _limits
from broker_client._handoff import Item, Receipts, Sender


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class Handoff(unittest.TestCase):
    def setUp(self):
        self.fds = []

    def tearDown(self):
        for fd in self.fds:
            if is_open(fd):
                os.close(fd)

    def items(self, n, state=b""):
        out = []
        for _ in range(n):
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            self.fds.append(fd)
            out.append(Item(fd, state))
        return out

    def test_batches_of_at_most_253_and_the_window(self):
        s = Sender()
        for item in self.items(253 * 9 + 1):
            s.add(item)
        sizes = []
        while True:
            b = s.next()
            if b is None:
                break
            batch, params, fds = b
            self.assertEqual(len(params["connections"]), len(fds))
            self.assertEqual([c["fd"] for c in params["connections"]], list(range(len(fds))))
            sizes.append(len(fds))
        self.assertEqual(sizes, [253] * _limits.HANDOFF_WINDOW, "8 batches in flight, then it waits")
        self.assertEqual(s.pending(), 253 * 9 + 1)

    def test_a_batch_stays_under_the_message_limit(self):
        s = Sender()
        for item in self.items(200, b"x" * _limits.MAX_HANDOFF_STATE):
            s.add(item)
        batch, params, fds = s.next()
        size = len(str(params).encode())
        self.assertLess(size, _limits.MAX_MESSAGE_SIZE)
        self.assertEqual(len(fds), 47, "16 KiB states: 47 fit under 1 MiB minus 4 KiB")
        self.assertEqual(params["remaining"], 200 - 47)
        self.assertEqual(_handoff.decode_state(params["connections"][0]["state"]), b"x" * _limits.MAX_HANDOFF_STATE)

    def test_complete_closes_landed_and_abandoned_and_gives_back_returned(self):
        s = Sender()
        items = self.items(5, b"st")
        for item in items:
            s.add(item)
        batch, _, fds = s.next()
        self.assertTrue(all(is_open(fd) for fd in fds), "held while in flight")
        self.assertIsNone(s.complete(batch, 2, [1], [2]), "counts that do not add up change nothing")
        self.assertIsNone(s.complete(batch, 3, [1], [1]), "an index twice changes nothing")
        self.assertIsNone(s.complete(batch + 1, 5, [], []), "an unknown batch changes nothing")
        self.assertTrue(all(is_open(fd) for fd in fds))
        done = s.complete(batch, 3, [1], [4])
        self.assertEqual((done.landed, done.abandoned, [i.fd for i in done.returned]), (3, 1, [fds[1]]))
        self.assertEqual([is_open(fd) for fd in fds], [False, True, False, False, False])
        self.assertEqual(s.pending(), 0)

    def test_after_a_loss_the_unsent_batches_come_back_in_order(self):
        s = Sender()
        items = self.items(253 * 3)
        for item in items:
            s.add(item)
        batches = [s.next() for _ in range(3)]
        s.requeue_newest(2)
        self.assertEqual(s.in_flight(), [(batches[0][0], 253)])
        self.assertEqual([i.fd for i in s.take_unsent()], [i.fd for i in items[253:]])
        self.assertEqual(s.drop_in_flight(), 253)
        self.assertFalse(any(is_open(i.fd) for i in items[:253]), "in flight without reconnect: closed")

    def test_receipts_keep_the_newest_4096_and_fit_the_bytes_given(self):
        r = Receipts()
        r.add({"instance": "web/1/0", "pid": 7}, 1, [])  # no batch: a brokerd before origins
        self.assertEqual(len(r), 0)
        for i in range(_limits.MAX_RESUME_RECEIPTS + 10):
            r.add({"instance": "web/1/0", "pid": 7, "batch": i, "first": 0}, 3, [1] if i % 2 else [])
        self.assertEqual(len(r), _limits.MAX_RESUME_RECEIPTS)
        listed = r.list(1 << 30)
        self.assertEqual(listed[0]["batch"], 10)
        self.assertEqual(listed[-1], {"instance": "web/1/0", "pid": 7, "batch": 4105, "first": 0, "count": 3,
                                      "refused": [1]})
        short = r.list(200)
        self.assertEqual([x["batch"] for x in short], [4104, 4105], "the newest, oldest first")

    def test_state_base64(self):
        for raw in (b"", b"a", b"ab", b"abc", bytes(range(256))):
            self.assertEqual(_handoff.decode_state(_handoff.encode_state(raw)), raw)
        for bad in ("abc", "ab=c", "a$==", 5):
            self.assertIsNone(_handoff.decode_state(bad))


if __name__ == "__main__":
    unittest.main()
