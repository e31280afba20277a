#!/usr/bin/env python3
"""A listener from a socket unit stays the socket unit's: brokerd never pushes it into the fd store.

Plays systemd's part as fdstore_harness.py does, with one socket unit besides: the harness holds a
listening socket, as a socket unit does, and passes it to every start of brokerd in LISTEN_FDS
under its FileDescriptorName ("web"), after the stored fds. brokerd.json names it `"systemd":
"web"` and binds "http" itself. brokerd must push "http" (and the control socket) with FDSTORE=1
and never "web"; across a restart with the store both serve, "web" is still the unit's very socket
(same inode) and a connection made while brokerd was down waits in its queue.
"""

import json
import os
import select
import socket
import sys

from checks import check
from fdstore_harness import (HTTP_TIMEOUT, Brokerd, check_answered, events_since, free_port, http_connect_and_send,
                             http_get, main, process_socket_inodes, served_by, socket_inode, socket_origin, stop,
                             varlink_status, sockets, check_kept, workers_of)


def write_config(path, control, port):
    with open(path, "w") as f:
        json.dump({"control": {"path": control},
                   "sockets": {"http": {"listen": "tcp://127.0.0.1:%d" % port}, "web": {"systemd": "web"}},
                   "services": {"web": {"exec": [os.environ["EXAMPLE_HTTP"]], "sockets": ["http", "web"],
                                        "instances": 1, "ready": "broker"}}}, f)


def check_running(b, manager, port, unit, label):
    """Both listeners serve from brokerd's worker, brokerd holds the unit's very socket, Status
    says where each came from, and the store holds http and control and never the unit's socket."""
    unit_port = unit.getsockname()[1]
    workers = set(workers_of(b.pid))
    check(len(workers) == 1, "%s: brokerd runs its one worker (%s)" % (label, sorted(workers)))
    check(sockets(manager.names()) == ["control", "http"],
          "%s: the store holds exactly the sockets http and control (%s)" % (label, manager.names()))
    check_kept(manager, workers, label)
    unit_ino = socket_inode(unit.fileno())
    stored = [n for n, fd in manager.store if socket_inode(fd) == unit_ino]
    check(stored == [], "%s: the socket unit's socket is in the store under no name (%s)" % (label, stored))
    check(unit_ino in process_socket_inodes(b.pid), "%s: brokerd holds the socket unit's very socket" % label)
    for name, p in (("http", port), ("web", unit_port)):
        status, body = http_get(p)
        check(status == 200 and served_by(body, workers), "%s: %s on port %d serves 200 from brokerd's worker (%s %r)" %
              (label, name, p, status, body.strip()))
    params, err = varlink_status(b.control)
    check(params is not None, "%s: Status on the control socket answers (%s)" % (label, err))
    origin, _ = socket_origin(params or {}, "web")
    check(origin == "systemd", "%s: Status shows web with origin systemd (%r)" % (label, origin))
    return workers, params or {}


def run(tmp, manager, runs, strays, unit):
    brokerd = os.environ["BROKERD"]
    control = os.path.join(tmp, "control.sock")
    config = os.path.join(tmp, "brokerd.json")
    port = free_port()
    write_config(config, control, port)
    unit_ino = socket_inode(unit.fileno())

    def start(label):
        b = Brokerd(brokerd, config, manager, os.path.join(tmp, "brokerd-%d.log" % (len(runs) + 1)),
                    unit=[("web", unit.fileno())])
        b.control = control
        runs.append((label, b))
        return b

    # 1. A first start: brokerd binds http and the control socket and stores them; web is adopted.
    b = start("first start")
    b.wait_ready()
    stored = events_since(manager, 0, "STORE")
    check(sockets(stored) == ["control", "http"],
          "first start: brokerd pushed FDSTORE=1 for http and control, and not for web (%s)" % stored)
    check("socket web: adopted " in b.log(), "first start: the log says web was adopted from systemd")
    workers, params = check_running(b, manager, port, unit, "first start")
    origin, _ = socket_origin(params, "http")
    check(origin == "bound", "first start: Status shows http with origin bound (%r)" % origin)

    # 2. Down: the socket unit still holds web, so a client's connection waits in its queue.
    stop(b, "first stop", workers, strays)
    removed = events_since(manager, 0, "REMOVE")
    check(sockets(removed) == [], "first stop: no socket released from the store (%s)" % removed)
    try:
        queued = http_connect_and_send(unit.getsockname()[1])
    except OSError as e:
        queued = None
        check(False, "while brokerd is down, a client connects to the socket unit's port (%s)" % e)
    if queued is not None:
        waiting = select.select([unit], [], [], HTTP_TIMEOUT)[0] != []
        check(waiting, "while brokerd is down, a client's connection waits in the socket unit's queue")

    # 3. Started again with the store and the unit's socket, as systemctl restart does.
    seen = len(manager.events)
    b = start("restart")
    b.wait_ready()
    log = b.log()
    check("socket http: kept by the service manager" in log, "restart: the log says http was kept by the service manager")
    check("socket web: adopted " in log, "restart: the log says web was adopted from systemd")
    stored = events_since(manager, seen, "STORE")
    check("web" not in stored, "restart: brokerd did not push web into the store (%s)" % stored)
    check(sockets(events_since(manager, seen, "REMOVE")) == ["control"],
          "restart: of the sockets, only the stored control released (%s)" % events_since(manager, seen, "REMOVE"))
    check(socket_inode(unit.fileno()) == unit_ino, "restart: the socket unit's socket is the same inode")
    workers, params = check_running(b, manager, port, unit, "restart")
    origin, _ = socket_origin(params, "http")
    check(origin == "fdstore", "restart: Status shows http with origin fdstore (%r)" % origin)
    check_answered(queued, workers, "restart: the request queued on web while brokerd was down is answered 200 by the new worker")
    stop(b, "last stop", workers, strays)

    check(events_since(manager, 0, "DUPLICATE") == [],
          "no run pushed a socket the store already held (%s)" % events_since(manager, 0, "DUPLICATE"))
    check(manager.foreign == 0, "only brokerd's own pid wrote to the notify socket (%d others)" % manager.foreign)
    check(not manager.errors, "every notify message was well-formed (%s)" % manager.errors)


def run_with_unit(tmp, manager, runs, strays):
    # The socket unit's listener: the harness holds it for the whole test, as systemd holds it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as unit:
        unit.bind(("127.0.0.1", 0))
        unit.listen(16)
        run(tmp, manager, runs, strays, unit)


if __name__ == "__main__":
    sys.exit(main(run_with_unit, "brokerd-fdstore-units."))
