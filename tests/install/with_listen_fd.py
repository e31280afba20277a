#!/usr/bin/env python3
"""with_listen_fd.py SOCKET NAME PROGRAM [ARG...]: runs PROGRAM as plain systemd socket
activation would, with a unix stream socket listening at SOCKET as fd 3, LISTEN_FDS=1,
LISTEN_FDNAMES=NAME and LISTEN_PID set to PROGRAM's pid (exec keeps ours)."""
import os
import socket
import sys

if len(sys.argv) < 4:
    sys.exit("usage: with_listen_fd.py SOCKET NAME PROGRAM [ARG...]")
path, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
sock.listen(16)
# Our socket may already be fd 3, where dup2 changes nothing: inheritable is set either way.
# Every other fd of ours stays close-on-exec.
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
    sock.close()
os.set_inheritable(3, True)

env = {k: v for k, v in os.environ.items()
       if not k.startswith(("LISTEN_", "BROKER_")) and k != "NOTIFY_SOCKET"}
env.update(LISTEN_FDS="1", LISTEN_FDNAMES=name, LISTEN_PID=str(os.getpid()))
os.execve(argv[0], argv, env)
