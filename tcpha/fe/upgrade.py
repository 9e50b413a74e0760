"""Seamless upgrade: a new tcpha-fe started while the old one runs takes over from it.

1. The new process finds a live front end on its control socket (same ``rundir``) and sends
   ``{"op": "takeover"}``; the old one answers with its *listening sockets* attached (SCM_RIGHTS).
   The very same sockets change hands, so connections waiting in the accept queue are not lost (a
   second socket bound with SO_REUSEPORT would own its own queue, and closing the old one would reset
   the connections queued on it).
2. The old process stops accepting, finishes the connections it is dispatching, and exits *without*
   removing the kernel state (it is ``handed_over``).
3. The new process adopts the kernel state (FlowSteering.install and VipAddress.add adopt what is
   there: the flows handed off by the old one keep their entries) and starts accepting at once; the
   control directory, socket, metrics and registration port follow once the old one has released
   them (tcpha.runtime.plane.ControlPlane.start with wait_free). The control *socket* changes hands
   at once: the new process binds its own and renames it over the old one's path (an atomic
   replacement), so `tcpha-ctl` always finds a front end that answers.

A control socket whose listener was created by a process that is gone (the arbiter was killed and
processes it left behind still hold the socket) is no predecessor: the new process starts afresh
instead of waiting for an answer that never comes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from tcpha.loglevels import NOTICE
from tcpha import fdpass
from tcpha.runtime.ctlsock import listener_pid, prepare_socket, process_alive
from tcpha.runtime.plane import socket_path

log = logging.getLogger("tcpha.fe.upgrade")


@dataclass
class Takeover:
    """What a seamless upgrade got from its predecessor."""
    listeners: list[tuple[socket.socket, int]]
    pid: int                 # the predecessor (its control directory is ours once it has exited)
    control_socket: Any      # ours, renamed over the predecessor's (tcpha.runtime.ctlsock.PreparedSocket)


def take_over(config: Any, timeout: float = 5.0) -> Takeover | None:
    """The listening sockets of a running front end on the same rundir, or None when there is none."""
    rundir = config.rundir.rstrip("/")
    for path in (socket_path(rundir), os.path.join(rundir, "ctl.sock")):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            s.close()
            continue
        try:
            owner = listener_pid(s)
            if not process_alive(owner):
                log.warning("control socket %s: its tcpha-fe (pid %d) is gone, processes it left hold the "
                            "socket: starting afresh (no takeover)", path, owner)
                continue
            try:
                same = _same_front_end(s, config)
            except OSError as e:
                if not process_alive(owner):
                    log.warning("control socket %s: its tcpha-fe (pid %d) died while asked: starting afresh",
                                path, owner)
                    continue
                raise RuntimeError(f"the front end pid {owner} on {path} does not answer ({e}); stop it "
                                   f"or set another rundir") from None
            if not same:
                s.close()
                return None
            # Our control socket, ready before the predecessor starts to stop: it replaces the
            # predecessor's the moment the listening sockets are ours, and the predecessor closes its
            # own only once told so (no moment without a control socket).
            control = prepare_socket(path)
            try:
                s.sendall(b'{"op": "takeover"}\n')
                data, fds = fdpass.recv_fds(s, 4096, 16)
            except BaseException:
                control.discard()
                raise
            try:
                reply = json.loads(data.split(b"\n", 1)[0] or b"{}")
            except ValueError:
                reply = {}
            if not reply.get("ok") or not fds:
                control.discard()
                for fd in fds:
                    os.close(fd)
                raise RuntimeError(f"takeover from the front end on {path} failed: {reply.get('error', 'no sockets')}")
            try:
                control.install()
                s.sendall(b'{"op": "control_socket_taken"}\n')
            except OSError as e:
                log.warning("upgrade: control socket %s not taken over (%s): served once the predecessor has "
                            "stopped", path, e)
                control.discard()
                control = None
        finally:
            s.close()
        ports = list(reply.get("ports", []))
        socks = []
        for fd, port in zip(fds, ports):
            ls = socket.socket(fileno=fd)
            ls.setblocking(False)
            socks.append((ls, int(port)))
        want = sorted(int(p) for p in config.ports)
        if sorted(p for _, p in socks) != want:
            log.warning("upgrade: the predecessor listened on %s, this configuration says %s; using its sockets "
                        "for the ports both have", [p for _, p in socks], want)
            socks = [(ls, p) for ls, p in socks if p in want] or socks
        log.log(NOTICE, "upgrade: took over the listening sockets of tcpha-fe pid %s (ports %s)",
                reply.get("pid"), " ".join(str(p) for _, p in socks))
        return Takeover(socks, int(reply.get("pid") or owner), control)
    return None


def _netns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _same_front_end(s: socket.socket, config: Any) -> bool:
    """Only a front end for the same VIP in the same network namespace is a predecessor (several labs
    or test runs may share a file system, hence a rundir, while each has its own namespace)."""
    s.sendall(b'{"op": "read", "path": "status"}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk
    try:
        data = json.loads(buf).get("data") or {}
        pid = int(data["pid"])
        same_ns = _netns(pid) == _netns("self")
    except (ValueError, KeyError, TypeError, OSError):
        return False
    if not same_ns or data.get("vaddr", config.vaddr) != config.vaddr:
        log.warning("rundir %s is served by tcpha-fe pid %d of another network namespace or VIP: no takeover",
                    config.rundir, pid)
        return False
    return True
