"""The worker's side of connection handoff, as proto/handoff.cpp has it: batching, the window of
batches in flight, matching brokerd's answers to the connections still held, and the receipts a
receiver keeps for a brokerd that restarts. No I/O here but closing the fds that are done."""

import base64
import binascii
import collections
import json

from . import _limits
from ._wire import close_all


def encode_state(state):
    return base64.b64encode(state).decode("ascii")


def decode_state(text):
    """Standard base64 with padding, or None."""
    if not isinstance(text, str) or len(text) % 4:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class Item:
    __slots__ = ("fd", "state")

    def __init__(self, fd, state):
        self.fd = fd        # owned here until it lands, or goes back to the caller
        self.state = state  # raw bytes


class Completion:
    def __init__(self):
        self.landed = 0
        self.returned = []  # Items, the caller's again
        self.abandoned = 0  # closed here: nobody could tell where they went


class Sender:
    """Connections queued, sent in batches of at most 253 and under the message limit, then held
    until brokerd says which landed (closed here) and which came back (given to the caller)."""

    def __init__(self):
        self.queue = collections.deque()
        self._in_flight = {}  # batch id -> [Item], in the order sent
        self._next_id = 1
        self.window = _limits.HANDOFF_WINDOW

    def add(self, item):
        self.queue.append(item)

    def fds(self):
        """Each fd held here, queued or in flight."""
        held = [item.fd for item in self.queue]
        held.extend(item.fd for items in self._in_flight.values() for item in items)
        return held

    def set_window(self, batches):
        self.window = max(1, min(_limits.HANDOFF_WINDOW, batches))

    def next(self):
        """(batch id, Handoff's parameters, fds) while fewer than the window are in flight and
        any are queued, else None. The fds stay open here until the batch completes."""
        if not self.queue or len(self._in_flight) >= self.window:
            return None
        batch = self._next_id
        self._next_id += 1
        conns, held, size = [], [], 0
        while self.queue and len(held) < _limits.MAX_FDS_PER_MESSAGE:
            item = self.queue[0]
            cost = 32 + (len(item.state) + 2) // 3 * 4  # {"fd":252,"state":"..."}, with room to spare
            if held and size + cost > _limits.HANDOFF_BATCH_BYTES:
                break
            size += cost
            conn = {"fd": len(held)}
            if item.state:
                conn["state"] = encode_state(item.state)
            conns.append(conn)
            held.append(self.queue.popleft())
        self._in_flight[batch] = held
        params = {"batch": batch, "connections": conns, "remaining": len(self.queue)}
        return batch, params, [i.fd for i in held]

    def complete(self, batch, landed, returned, abandoned):
        """brokerd's "handoff" event for a batch: a Completion, or None, changing nothing, for an
        unknown batch or counts that do not add up to it."""
        items = self._in_flight.get(batch)
        if items is None or landed + len(returned) + len(abandoned) != len(items):
            return None
        back = {}
        for indices, is_returned in ((returned, True), (abandoned, False)):
            for i in indices:
                if i >= len(items) or i in back:
                    return None
                back[i] = is_returned
        done = Completion()
        done.landed = landed
        done.abandoned = len(abandoned)
        done.returned = [item for i, item in enumerate(items) if back.get(i)]
        # The landed ones close here: the successor holds them now; so do the abandoned ones.
        close_all(item.fd for i, item in enumerate(items) if not back.get(i))
        del self._in_flight[batch]
        return done

    def requeue(self, batch):
        """A batch that could not be queued for sending goes back to the front of the queue."""
        items = self._in_flight.pop(batch, None)
        if items:
            self.queue.extendleft(reversed(items))

    def requeue_newest(self, n):
        """The newest n batches in flight never left (their messages were still queued)."""
        for batch in sorted(self._in_flight)[::-1][:n]:
            self.requeue(batch)

    def take_unsent(self):
        """When brokerd has gone: the connections never sent, which are the caller's again."""
        items = list(self.queue)
        self.queue.clear()
        return items

    def drop_in_flight(self):
        """Closes those in flight, which may have landed at a receiver whose acknowledgement was
        lost with brokerd, so that no socket is ever served twice. Returns how many."""
        n = 0
        for items in self._in_flight.values():
            close_all(item.fd for item in items)
            n += len(items)
        self._in_flight.clear()
        return n

    def in_flight(self):
        """(batch, count) of the batches in flight: after a restart of brokerd, those in doubt."""
        return [(batch, len(items)) for batch, items in self._in_flight.items()]

    def in_flight_batches(self):
        return len(self._in_flight)

    def pending(self):
        return len(self.queue) + sum(len(items) for items in self._in_flight.values())


class Receipts:
    """The chunks a receiver got, as their "connections" events named their origin: the newest
    MAX_RESUME_RECEIPTS, told to a brokerd that restarted (Worker.Resume)."""

    def __init__(self):
        self._list = collections.deque(maxlen=_limits.MAX_RESUME_RECEIPTS)

    def add(self, origin, count, refused):
        """Ignored unless origin is well formed (a brokerd that predates it sends none)."""
        if not isinstance(origin, dict) or not isinstance(origin.get("instance"), str):
            return
        if not all(type(origin.get(k)) is int and origin[k] >= 0 for k in ("pid", "batch", "first")):
            return
        r = {"instance": origin["instance"], "pid": origin["pid"], "batch": origin["batch"],
             "first": origin["first"], "count": count}
        if refused:
            r["refused"] = list(refused)
        self._list.append(r)

    def list(self, max_bytes):
        """Resume's "received", newest last, the oldest left out beyond max_bytes."""
        kept, size = [], 0
        for r in reversed(self._list):
            size += len(json.dumps(r, separators=(",", ":"))) + 1
            if size > max_bytes:
                break
            kept.append(r)
        return kept[::-1]

    def __len__(self):
        return len(self._list)
