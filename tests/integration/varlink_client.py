#!/usr/bin/env python3
"""A Varlink client written from the spec (varlink.org), stdlib only, run against a real brokerd.

It starts its own brokerd ($BROKERD) with a Python example worker ($EXAMPLE_PYTHON), waits for
READY=1 on a notify socket it owns, and checks org.varlink.service and io.brokerd.Control the way
any third-party Varlink client would see them: one JSON object per message, NUL-terminated.
"""

import json
import re
import socket
import struct
import sys
import threading

from checks import check, failures, passes, run_with_brokerd

TIMEOUT = 10.0


class VarlinkConnection:
    """One connection: calls are JSON objects terminated by NUL, replies likewise."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, method, parameters=None, **flags):
        msg = {"method": method}
        if parameters is not None:
            msg["parameters"] = parameters
        msg.update(flags)
        self.send_raw(json.dumps(msg).encode() + b"\0")

    def send_raw(self, data):
        self.sock.sendall(data)

    def receive(self):
        while b"\0" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the service")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        reply = json.loads(raw)
        if not isinstance(reply, dict):
            raise ValueError("reply is not a JSON object: %r" % raw)
        return reply

    def call(self, method, parameters=None):
        self.send(method, parameters if parameters is not None else {})
        return self.receive()


# Interface names and members per the Varlink IDL grammar.
INTERFACE_RE = re.compile(r"^[A-Za-z]([-]*[A-Za-z0-9])*(\.[A-Za-z0-9]([-]*[A-Za-z0-9])*)+$")
MEMBER_RE = re.compile(r"^\s*(method|type|error)\s+[A-Z][A-Za-z0-9]*\b", re.M)


def check_description(conn, interface):
    reply = conn.call("org.varlink.service.GetInterfaceDescription", {"interface": interface})
    check("error" not in reply, "GetInterfaceDescription(%s) succeeds: %s" % (interface, reply.get("error")))
    desc = reply.get("parameters", {}).get("description", "")
    lines = [l for l in desc.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    check(bool(lines) and lines[0].strip() == "interface " + interface,
          "description of %s starts with 'interface %s'" % (interface, interface))
    check(bool(lines) and lines[0].startswith("interface io.brokerd."),
          "description of %s is an io.brokerd interface" % interface)
    check(bool(MEMBER_RE.search(desc)), "description of %s declares methods/types/errors" % interface)
    check(desc.count("(") == desc.count(")"), "description of %s has balanced parentheses" % interface)
    return desc


def run_checks(control):
    conn = VarlinkConnection(control)

    info = conn.call("org.varlink.service.GetInfo")
    params = info.get("parameters", {})
    check("error" not in info, "GetInfo succeeds")
    for key in ("vendor", "product", "version", "url", "interfaces"):
        check(key in params, "GetInfo has %r" % key)
    interfaces = params.get("interfaces", [])
    for name in ("org.varlink.service", "io.brokerd.Control", "io.brokerd.Worker"):
        check(name in interfaces, "GetInfo lists %s" % name)
    check(all(INTERFACE_RE.match(i) for i in interfaces), "interface names are valid: %r" % interfaces)

    check_description(conn, "io.brokerd.Control")
    check_description(conn, "io.brokerd.Worker")

    status = conn.call("io.brokerd.Control.Status")
    check("error" not in status, "Status succeeds: %s" % status.get("error"))
    sp = status.get("parameters", {})
    # The control socket's listener is brokerd's: its pid is the connection's peer.
    peer_pid = struct.unpack("3i", conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    check(sp.get("pid") == peer_pid, "Status has brokerd's pid (%r, the peer is %d)" % (sp.get("pid"), peer_pid))
    socks = {s["name"]: s for s in sp.get("sockets", [])}
    check("http" in socks and socks["http"]["address"].startswith("tcp://127.0.0.1:"),
          "Status lists socket http with its address")
    services = {s["name"]: s for s in sp.get("services", [])}
    check("web" in services, "Status lists service web")
    insts = [i for g in services.get("web", {}).get("generations", []) for i in g.get("instances", [])]
    check(len(insts) == 1 and insts[0].get("state") == "ready", "web has one ready instance: %r" % insts)
    check(bool(insts) and insts[0].get("id", "").startswith("web/"), "instance id looks like web/G/I")

    # "parameters": null is no parameters, as varlink-go sends it and sd-varlink reads it.
    for method in ("org.varlink.service.GetInfo", "io.brokerd.Control.Sockets"):
        conn.send_raw(json.dumps({"method": method, "parameters": None}).encode() + b"\0")
        r = conn.receive()
        check("error" not in r, "%s with \"parameters\": null succeeds (got %r)" % (method, r))

    # Unknown method of a known interface, and an unknown interface.
    r = conn.call("io.brokerd.Control.NoSuchMethod")
    check(r.get("error") == "org.varlink.service.MethodNotFound",
          "unknown method gets MethodNotFound (got %r)" % r)
    r = conn.call("org.example.nosuch.Method")
    check(r.get("error") == "org.varlink.service.InterfaceNotFound",
          "unknown interface gets InterfaceNotFound (got %r)" % r)
    r = conn.call("org.varlink.service.GetInterfaceDescription", {"interface": "org.example.nosuch"})
    check(r.get("error") == "org.varlink.service.InterfaceNotFound",
          "GetInterfaceDescription of an unknown interface gets InterfaceNotFound (got %r)" % r)

    # Pipelined calls in one write are answered in order; a oneway call gets no reply.
    conn.send_raw(b"".join(json.dumps(m).encode() + b"\0" for m in (
        {"method": "org.varlink.service.GetInfo", "oneway": True},
        {"method": "io.brokerd.Control.Sockets", "parameters": {}},
        {"method": "org.varlink.service.GetInfo"},
    )))
    first, second = conn.receive(), conn.receive()
    check("sockets" in first.get("parameters", {}), "pipelined: the first reply answers Sockets (oneway skipped)")
    check("interfaces" in second.get("parameters", {}), "pipelined: the second reply answers GetInfo")
    conn.close()

    # Many more pipelined calls than brokerd buffers (about 1.2 MB against its 1 MiB limit),
    # written while the replies are read: every one is answered, at the pace the client reads.
    # Written in pieces: sendall's timeout covers a whole call, and brokerd takes its time.
    conn = VarlinkConnection(control)
    count = 30000
    calls = b'{"method":"org.varlink.service.GetInfo"}\0' * count
    piece = 64 * 1024

    def write_calls():
        for at in range(0, len(calls), piece):
            conn.send_raw(calls[at:at + piece])

    writer = threading.Thread(target=write_calls)
    writer.start()
    answered = 0
    try:
        while answered < count:
            if "interfaces" not in conn.receive().get("parameters", {}):
                break
            answered += 1
    except (ConnectionError, OSError) as e:
        print("pipelined: %r" % e)
    writer.join()
    check(answered == count, "pipelined: %d of %d calls answered" % (answered, count))
    conn.close()

    # The connection still works after an error, and a fresh connection works too.
    conn = VarlinkConnection(control)
    r = conn.call("io.brokerd.Control.Status", {"service": "nosuch"})
    check(r.get("error") == "io.brokerd.Control.NoSuchService", "Status(nosuch) gets NoSuchService (got %r)" % r)
    r = conn.call("io.brokerd.Control.Status", {"service": "web"})
    check([s["name"] for s in r.get("parameters", {}).get("services", [])] == ["web"],
          "Status(web) after an error on the same connection")
    conn.close()


def main():
    return run_with_brokerd("brokerd-varlink.", run_checks)


if __name__ == "__main__":
    sys.exit(main())
