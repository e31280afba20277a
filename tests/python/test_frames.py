#!/usr/bin/env python3
"""broker_client's direct handoff channel: the frame codec (_frames.py) held to
proto/handoff_channel.hpp (its constants parsed from the header, the bytes of a frame spelled out),
every malformed frame decode_connections and decode_ack refuse, frames on a SOCK_SEQPACKET pair
(fds CLOEXEC, MSG_TRUNC, MSG_CTRUNC, the end), and a Client's channel ends as a sender and as a
receiver: acks close the landed, give back the refused; a channel's end gives back what it never
acknowledged; a bad frame closes the channel and its fds."""

import os
import re
import select
import socket
import struct
import subprocess
import sys
import unittest

from broker_client import Client, _frames, _limits, _wire
from broker_client._channels import Path
from broker_client._handoff import Item
from test_handoff import is_open
from test_limits import SOURCE_ROOT, constants
from test_wire import fd_limit, room_for


def dev_null():
    """An fd to pass: a socket, as a connection is (on_connection and on_returned take sockets)."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC).detach()


def pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def header(magic=_frames.MAGIC, version=1, kind=1, count=0, size=0, ident=0):
    return struct.pack("=IHHIIQ", magic, version, kind, count, size, ident)


class Codec(unittest.TestCase):
    def test_the_constants_are_the_headers(self):
        c = constants("proto/handoff_channel.hpp")
        self.assertEqual((_frames.MAGIC, _frames.VERSION, _limits.MAX_FRAME_BYTES),
                         (c["kMagic"], c["kVersion"], c["kMaxFrameBytes"]))
        with open(os.path.join(SOURCE_ROOT, "proto/handoff_channel.hpp")) as f:
            types = dict(re.findall(r"(\w+) = (\d+)", re.search(r"enum class Type[^{]*{([^}]*)}", f.read()).group(1)))
        self.assertEqual((_frames.CONNECTIONS, _frames.ACK), (int(types["Connections"]), int(types["Ack"])))
        self.assertEqual(_frames.HEADER.size, 24)

    def test_the_bytes_of_a_frame(self):
        frame = _frames.encode_connections(7, [b"ab", b"", b"xyz"])
        self.assertEqual(frame, header(count=3, size=5, ident=7) + struct.pack("=3I", 2, 0, 3) + b"abxyz")
        self.assertEqual(_frames.encode_ack(7, [0, 2]), header(kind=2, count=2, ident=7) + struct.pack("=2I", 0, 2))
        self.assertEqual(_frames.encode_ack(9), header(kind=2, ident=9))

    def test_round_trips(self):
        states = [b"", bytes(range(256)), b"s" * _limits.MAX_HANDOFF_STATE]
        self.assertEqual(_frames.decode_connections(_frames.encode_connections(1 << 40, states)), (1 << 40, states))
        self.assertEqual(_frames.decode_ack(_frames.encode_ack(3, [1, 4, 252])), (3, [1, 4, 252]))
        self.assertEqual(_frames.decode_ack(_frames.encode_ack(3, [1, 4]), 5), (3, [1, 4]))

    def test_malformed_connections_frames(self):
        good = _frames.encode_connections(1, [b"ab", b"c"])
        too_long = _limits.MAX_HANDOFF_STATE + 1
        table = [
            ("short", good[:23], "shorter than its header"),
            ("magic", header(magic=1) + good[24:], "another protocol"),
            ("version", header(version=2, count=2, size=3) + good[24:], "another protocol"),
            ("type", header(kind=2, count=2, size=3) + good[24:], "type 2 where 1"),
            ("count", header(count=254, size=0) + struct.pack("=254I", *[0] * 254), "over 253"),
            ("size", good + b"x", "where its header says"),
            ("cut", good[:-1], "where its header says"),
            ("state", header(count=1, size=too_long) + struct.pack("=I", too_long) + b"s" * too_long, "over 16384"),
            ("longer", header(count=2, size=3) + struct.pack("=2I", 2, 2) + b"abc", "longer than the frame"),
            ("shorter", header(count=2, size=3) + struct.pack("=2I", 1, 1) + b"abc", "shorter than the frame"),
        ]
        for name, frame, why in table:
            with self.subTest(name):
                with self.assertRaisesRegex(_frames.FrameError, why):
                    _frames.decode_connections(frame)

    def test_malformed_acks(self):
        table = [
            ("type", _frames.encode_connections(1, [b"a"]), 0, "type 1 where 2"),
            ("bytes", header(kind=2, count=0, size=4) + b"abcd", 0, "acknowledgement of 28 bytes"),
            ("size", _frames.encode_ack(1, [1])[:-1], 0, "acknowledgement of 27 bytes"),
            ("index", _frames.encode_ack(1, [0, 3]), 3, "refused index 3 of a frame of 3"),
            ("253", _frames.encode_ack(1, [253]), 0, "refused index 253"),
            ("order", _frames.encode_ack(1, [2, 1]), 0, "out of order"),
            ("twice", _frames.encode_ack(1, [1, 1]), 0, "out of order or repeated"),
        ]
        for name, frame, count, why in table:
            with self.subTest(name):
                with self.assertRaisesRegex(_frames.FrameError, why):
                    _frames.decode_ack(frame, count)

    def test_frame_fit(self):
        def items(n, size):
            return [Item(-1, b"x" * size) for _ in range(n)]
        self.assertEqual(_frames.frame_fit(items(300, 0), 1000), 253)
        self.assertEqual(_frames.frame_fit(items(300, 0), 10), 10, "the window's room")
        self.assertEqual(_frames.frame_fit(items(10, _limits.MAX_HANDOFF_STATE), 253), 3, "64 KiB a frame")
        self.assertEqual(_frames.frame_fit(items(2, 70000), 253), 1, "always one")
        n = _frames.frame_fit(items(10, 20000), 253)
        self.assertLessEqual(len(_frames.encode_connections(1, [b"x" * 20000] * n)), _limits.MAX_FRAME_BYTES)


class OnTheSocket(unittest.TestCase):
    def setUp(self):
        self.a, self.b = pair()

    def tearDown(self):
        self.a.close()
        self.b.close()

    def test_a_frame_with_its_fds(self):
        fds = [dev_null() for _ in range(3)]
        frame = _frames.encode_connections(5, [b"1", b"22", b"333"])
        self.assertEqual(_frames.send_frame(self.a, frame, fds), 0)
        r, got = _frames.receive_frame(self.b)
        self.assertEqual((r, bytes(got.data), len(got.fds), got.truncated, got.fds_cut), (1, frame, 3, False, False))
        self.assertTrue(all(not os.get_inheritable(fd) for fd in got.fds), "received CLOEXEC")
        got.close()
        for fd in fds:
            os.close(fd)
        self.assertEqual(_frames.receive_frame(self.b)[0], -11, "nothing waits: -EAGAIN")
        self.a.close()
        self.assertEqual(_frames.receive_frame(self.b), (0, None), "the end")

    def test_a_frame_over_64_kib_is_truncated(self):
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.assertEqual(_frames.send_frame(self.a, b"x" * (_limits.MAX_FRAME_BYTES + 1)), 0)
        r, got = _frames.receive_frame(self.b)
        self.assertEqual((r, len(got.data), got.truncated), (1, _limits.MAX_FRAME_BYTES, True))

    def test_fds_cut_by_the_fd_limit(self):
        fds = [dev_null() for _ in range(4)]
        self.assertEqual(_frames.send_frame(self.a, _frames.encode_connections(1, [b""] * 4), fds), 0)
        for fd in fds:
            os.close(fd)
        with fd_limit(room_for(2)):
            r, got = _frames.receive_frame(self.b)
        self.assertEqual((r, got.fds_cut), (1, True))
        self.assertLess(len(got.fds), 4)
        got.close()


class Channels(unittest.TestCase):
    """A Client's channel ends, brokerd's events given by hand: no brokerd, no link."""

    def setUp(self):
        self.client = Client()
        self.client._epoll = select.epoll()
        self.back, self.taken, self.done = [], [], []
        self.client.on_returned(lambda sock, state: self.back.append((sock, state)))
        self.client.on_connection(lambda sock, state: self.taken.append((sock, state)))
        self.client.on_handoff_done(self.done.append)
        self.ends = []

    def tearDown(self):
        for sock, _ in self.back + self.taken:
            sock.close()
        for s in self.ends:
            s.close()
        self.client.close()

    def channel(self, event):
        """A channel whose far end the test holds, given to the Client as brokerd would."""
        mine, theirs = pair()
        self.ends.append(mine)
        entry = {"instance": "web/2/0", "pid": 1, "fd": 0}
        if event == "peers":
            self.client._path = Path.ASKED
            self.client._dispatch({"parameters": {"event": "peers", "peers": [entry]}}, [theirs.detach()])
        else:
            self.client._dispatch({"parameters": {"event": "peer", "peer": entry}}, [theirs.detach()])
        return mine

    def hand(self, n):
        items = [Item(dev_null(), b"s%d" % i) for i in range(n)]
        for item in items:
            self.client._sender.add(item)
        self.client.summary.handed += n
        return items

    def test_a_sender_closes_the_landed_and_gives_back_the_refused(self):
        items = self.hand(3)
        receiver = self.channel("peers")
        self.assertIs(self.client._path, Path.DIRECT)
        r, got = _frames.receive_frame(receiver)
        ident, states = _frames.decode_connections(got.data)
        self.assertEqual((states, len(got.fds)), ([b"s0", b"s1", b"s2"], 3))
        got.close()
        self.assertTrue(all(is_open(i.fd) for i in items), "held until acknowledged")
        self.assertEqual(self.client.handoff_pending(), 3)
        self.assertEqual(_frames.send_frame(receiver, _frames.encode_ack(ident, [1])), 0)
        self.client.process()
        self.assertEqual([is_open(i.fd) for i in items], [False, True, False])
        self.assertEqual([state for _, state in self.back], [b"s1"])
        self.assertEqual(self.back[0][0].fileno(), items[1].fd)
        self.assertEqual((self.client.summary.landed, self.client.summary.returned), (2, 1))
        self.assertEqual(len(self.done), 1, "on_handoff_done once all settled")
        self.assertEqual(self.client._peers, [], "the sending channel closes then")
        self.assertIs(self.client._path, Path.UNASKED, "the next handoff asks again")

    def test_a_channel_that_ends_gives_back_what_it_never_acknowledged(self):
        items = self.hand(2)
        receiver = self.channel("peers")
        receiver.close()
        self.client.process()
        self.assertEqual(sorted(s.fileno() for s, _ in self.back), sorted(i.fd for i in items))
        self.assertEqual(self.client.handoff_pending(), 0)
        self.assertEqual(len(self.done), 1)

    def test_an_ack_for_a_frame_never_sent_ends_the_channel(self):
        self.hand(1)
        receiver = self.channel("peers")
        _frames.receive_frame(receiver)[1].close()
        _frames.send_frame(receiver, _frames.encode_ack(99))
        self.client.process()
        self.assertEqual([state for _, state in self.back], [b"s0"])
        self.assertEqual(receiver.recv(1), b"", "the channel closed")

    def test_without_a_channel_the_connections_go_brokerds_way(self):
        mine, brokerd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        mine.setblocking(False)
        brokerd.setblocking(False)
        self.client._stream = _wire.Stream(mine)
        self.client._peer_handoff = True
        heard = _wire.Stream(brokerd)
        self.ends.append(brokerd)

        def calls():
            heard.receive()
            out = []
            while True:
                n, message = heard.next()
                if n <= 0:
                    return out
                out.append(message)
        self.hand(2)
        self.client._pump()  # as handoff() does
        self.assertEqual([body["method"] for body, _ in calls()], ["io.brokerd.Worker.Peers"])
        self.assertIs(self.client._path, Path.ASKED)
        self.client._dispatch({"parameters": {"event": "peers", "peers": []}}, [])
        [(body, fds)] = calls()
        self.assertEqual((body["method"], len(body["parameters"]["connections"]), len(fds)),
                         ("io.brokerd.Worker.Handoff", 2, 2))
        self.assertIs(self.client._path, Path.BROKERED)
        self.assertEqual(self.client.handoff_pending(), 2, "held until brokerd's handoff event")
        heard.sock = None  # closed with self.ends
        for fd in fds:
            os.close(fd)

    def test_a_receiver_takes_the_frame_then_acknowledges(self):
        sender = self.channel("peer")
        fds = [dev_null() for _ in range(2)]
        _frames.send_frame(sender, _frames.encode_connections(4, [b"a", b"bb"]), fds)
        self.assertIn(self.client.fileno(), select.select([self.client.fileno()], [], [], 5)[0], "the epoll fd wakes")
        self.client.process()
        self.assertEqual([state for _, state in self.taken], [b"a", b"bb"])
        r, got = _frames.receive_frame(sender)
        self.assertEqual(_frames.decode_ack(got.data), (4, []))
        for fd in fds:
            os.close(fd)

    def test_the_first_connections_grow_the_fd_table_in_one_step(self):
        # In a process of its own: tables never shrink, so this one's may be grown already.
        for event in ("peer", "connections"):
            child = (
                "import resource, select, socket\n"
                "from broker_client import Client\n"
                "def size():\n"
                "    with open('/proc/self/status') as f:\n"
                "        return next(int(l.split()[1]) for l in f if l.startswith('FDSize:'))\n"
                "c = Client()\n"
                "c._epoll = select.epoll()\n"
                "c.on_connection(lambda sock, state: sock.close())\n"
                "before = size()\n"
                "mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
                "if %r == 'peer':\n"
                "    c._dispatch({'parameters': {'event': 'peer', 'peer': {'instance': 'web/1/0', 'pid': 1,\n"
                "                                                          'fd': 0}}}, [theirs.detach()])\n"
                "else:\n"
                "    try:  # its acknowledgement has no brokerd to go to\n"
                "        c._dispatch({'parameters': {'event': 'connections', 'batch': 1,\n"
                "                                    'connections': [{'fd': 0, 'state': ''}]}}, [theirs.detach()])\n"
                "    except Exception:\n"
                "        pass\n"
                "print(before, size(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n") % event
            out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
            self.assertEqual(out.returncode, 0, out.stderr)
            before, after, soft = map(int, out.stdout.split())
            want = min(soft, 65536)
            self.assertLess(before, want, event)
            self.assertGreaterEqual(after, want, event)

    def test_a_receiver_refuses_all_without_a_handler(self):
        self.client.on_connection(None)
        sender = self.channel("peer")
        fds = [dev_null() for _ in range(3)]
        _frames.send_frame(sender, _frames.encode_connections(2, [b""] * 3), fds)
        for fd in fds:
            os.close(fd)
        before = set(os.listdir("/proc/self/fd"))
        self.client.process()
        self.assertEqual(_frames.decode_ack(_frames.receive_frame(sender)[1].data), (2, [0, 1, 2]))
        self.assertEqual(set(os.listdir("/proc/self/fd")) - before, set(), "the refused closed")

    def test_a_bad_frame_closes_the_channel_and_its_fds(self):
        bad = [
            ("more fds than states", _frames.encode_connections(1, [b""]), 2),
            ("fewer fds than states", _frames.encode_connections(1, [b""] * 3), 2),
            ("not a frame", b"hello", 1),
            ("an acknowledgement", _frames.encode_ack(1), 1),
        ]
        for name, frame, nfds in bad:
            with self.subTest(name):
                sender = self.channel("peer")
                fds = [dev_null() for _ in range(nfds)]
                _frames.send_frame(sender, frame, fds)
                for fd in fds:
                    os.close(fd)
                before = set(os.listdir("/proc/self/fd"))
                self.client.process()
                self.assertEqual(self.taken, [])
                self.assertEqual(sender.recv(64), b"", "the channel closed, nothing acknowledged")
                self.assertEqual(set(os.listdir("/proc/self/fd")) - before, set(), "its fds closed")
                self.assertEqual(self.client._peers, [])


if __name__ == "__main__":
    unittest.main()
