"""The limits of proto/limits.hpp and proto/handoff.hpp that a worker meets, mirrored.

tests/python/test_limits.py parses those headers and holds these values to them.
"""

# Varlink framing.
MAX_MESSAGE_SIZE = 1 << 20          # one JSON message, without its NUL
MAX_FDS_PER_MESSAGE = 253           # SCM_MAX_FD: one sendmsg, one message
MAX_QUEUED_FDS = 2 * MAX_FDS_PER_MESSAGE  # received, not yet claimed
MAX_WRITE_QUEUE = 8 << 20           # bytes queued to brokerd, past which nothing more is queued
MAX_JSON_DEPTH = 64                 # nesting of objects and arrays

# A worker's status text.
MAX_STATUS_TEXT = 512

# A service's sockets: all of them fit in one Hello reply.
MAX_SOCKETS_PER_SERVICE = MAX_FDS_PER_MESSAGE

# Handoff: chunks a worker remembers having received, and may list in a Resume.
MAX_RESUME_RECEIPTS = 4096

# The Hello call at start, and a new connection's Hello after a loss: seconds.
DEFAULT_CALL_TIMEOUT = 30.0

# proto/handoff.hpp
MAX_HANDOFF_STATE = 16384           # bytes of one connection's state
HANDOFF_WINDOW = 8                  # batches in flight, of brokerd's 16
HANDOFF_BATCH_BYTES = (1 << 20) - 4096  # a batch stops short of the message limit

# proto/handoff_channel.hpp: one frame on a direct handoff channel, header included.
MAX_FRAME_BYTES = 64 << 10
