"""Runs a broker_client.Client on an asyncio loop: its fd with add_reader/add_writer, its
timeout() with call_at, and process() whenever either fires. Still one thread, no blocking."""

import asyncio
import time


class Handle:
    """What attach() returns: detach() takes the Client off the loop again."""

    def __init__(self, client, loop, on_error):
        self.client = client
        self.loop = loop
        self.on_error = on_error
        self._fd = -1
        self._writing = False
        self._timer = None
        self._attached = True
        self._update()

    def detach(self):
        """Stops watching; the Client is left as it is (close it, or attach it elsewhere)."""
        self._attached = False
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unwatch(self):
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            if self._writing:
                self.loop.remove_writer(self._fd)
        self._fd = -1
        self._writing = False

    def _run(self):
        if not self._attached:
            return
        try:
            self.client.process()
        except Exception as e:  # noqa: B902 - the caller's handler decides; the loop goes on
            if self.on_error is not None:
                self.on_error(e)
            else:
                self.loop.call_exception_handler({"message": "broker_client: process() failed",
                                                  "exception": e})
        if self._attached:
            self._update()

    def _update(self):
        """Watches the Client's fd for what it wants, and wakes at its timeout."""
        fd = self.client.fileno()
        events = self.client.events()
        want_write = bool(events & 2)  # selectors.EVENT_WRITE
        if fd != self._fd:
            self._unwatch()
            if fd >= 0:
                self.loop.add_reader(fd, self._run)
                self._fd = fd
        if fd >= 0 and want_write != self._writing:
            if want_write:
                self.loop.add_writer(fd, self._run)
            else:
                self.loop.remove_writer(fd)
            self._writing = want_write
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.client.timeout()
        if deadline is not None:
            self._timer = self.loop.call_at(self.loop.time() + max(0.0, deadline - time.monotonic()), self._run)


def attach(client, loop=None, on_error=None):
    """Runs client on loop (the running one by default) until detach(). An exception out of
    process() (a handler's, or brokerd's error) goes to on_error(exc), or without one to the
    loop's exception handler; the Client carries on at its next event either way."""
    if loop is None:
        loop = asyncio.get_running_loop()
    return Handle(client, loop, on_error)
