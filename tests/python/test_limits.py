#!/usr/bin/env python3
"""broker_client's limits are proto/limits.hpp's and proto/handoff.hpp's: parsed from the headers,
so that a change there fails here until the Python library follows."""

import os
import re
import unittest

from broker_client import _limits

SOURCE_ROOT = os.environ.get("SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))

# Python name -> (header, C++ name).
MIRRORED = {
    "MAX_MESSAGE_SIZE": ("proto/limits.hpp", "kMaxMessageSize"),
    "MAX_FDS_PER_MESSAGE": ("proto/limits.hpp", "kMaxFdsPerMessage"),
    "MAX_QUEUED_FDS": ("proto/limits.hpp", "kMaxQueuedFds"),
    "MAX_WRITE_QUEUE": ("proto/limits.hpp", "kMaxWriteQueue"),
    "MAX_JSON_DEPTH": ("proto/limits.hpp", "kMaxJsonDepth"),
    "MAX_STATUS_TEXT": ("proto/limits.hpp", "kMaxStatusText"),
    "MAX_SOCKETS_PER_SERVICE": ("proto/limits.hpp", "kMaxSocketsPerService"),
    "MAX_RESUME_RECEIPTS": ("proto/limits.hpp", "kMaxResumeReceipts"),
    "DEFAULT_CALL_TIMEOUT": ("proto/limits.hpp", "kDefaultCallTimeout"),
    "MAX_HANDOFF_STATE": ("proto/handoff.hpp", "kMaxState"),
    "HANDOFF_WINDOW": ("proto/handoff.hpp", "kWindow"),
    "HANDOFF_BATCH_BYTES": ("proto/handoff.hpp", "kBatchBytes"),
    "MAX_FRAME_BYTES": ("proto/handoff_channel.hpp", "kMaxFrameBytes"),
}


def constants(header):
    """name -> value of each `inline constexpr ... kName = expr;`, expr evaluated in order."""
    with open(os.path.join(SOURCE_ROOT, header)) as f:
        text = f.read()
    values = {}
    for name, expr in re.findall(r"inline constexpr [\w:]+ (k\w+) = ([^;]+);", text):
        expr = re.sub(r"(\d+)u\b", r"\1", expr)       # 8u << 20
        expr = re.sub(r"\b(\d+)s\b", r"\1", expr)     # 30s, in seconds
        expr = re.sub(r"\b(\d+)ms\b", r"(\1 / 1000)", expr)
        expr = re.sub(r"static_cast<[^>]+>", "", expr)
        values[name] = eval(expr, {}, dict(values))   # noqa: S307 - our own header
    return values


class Limits(unittest.TestCase):
    def test_each_limit_is_the_headers(self):
        headers = {h: constants(h) for h, _ in MIRRORED.values()}
        for py, (header, cpp) in MIRRORED.items():
            with self.subTest(py=py):
                self.assertIn(cpp, headers[header], "%s no longer defines %s" % (header, cpp))
                self.assertEqual(getattr(_limits, py), headers[header][cpp], "%s vs %s's %s" % (py, header, cpp))

    def test_every_python_limit_is_checked(self):
        names = {n for n in vars(_limits) if n.isupper()}
        self.assertEqual(names, set(MIRRORED))


if __name__ == "__main__":
    unittest.main()
