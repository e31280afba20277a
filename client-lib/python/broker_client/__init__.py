"""broker_client: the worker's side of brokerd, in Python's standard library.

A worker makes one Client with Client.from_env(), serves its listeners(), says ready(), and runs
the Client in its own loop: with selectors (fileno(), events(), timeout(), process(), or the
register() helper) or with asyncio (broker_client.aio.attach). On drain it may hand its
established connections, with state, to the next generation (handoff()), on a direct channel to
each receiver where brokerd makes one; the library closes a handed connection only once its
receiver acknowledged it, gives back those that come back
(on_returned), and across a restart of brokerd tells the new one what was in doubt (Resume).
docs/python.md is the guide; docs/protocol.md the wire.
"""

from .client import Client, DrainRequest, Error, HandoffSummary, Link, Listener, check_status_text

__all__ = ["Client", "DrainRequest", "Error", "HandoffSummary", "Link", "Listener", "check_status_text"]
