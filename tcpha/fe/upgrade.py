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

`take_over` is the new process's side; `Handover`, one of the parts FrontEndRuntime
(tcpha.fe.runtime) is composed of, is the old process's: it answers ``takeover`` and
``control_socket_taken`` on its control socket, and its stop waits (HANDOVER_WAIT at most) until the
successor's control socket has replaced its own, so that there is never a moment without one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tcpha import fdpass
from tcpha.loglevels import NOTICE
from tcpha.runtime.ctlsock import listener_pid, prepare_socket, process_alive
from tcpha.runtime.plane import socket_path

if TYPE_CHECKING:
    from tcpha.fe.arbiter import FrontEnd     # for types only: the arbiter imports the runtime

log = logging.getLogger("tcpha.fe.upgrade")
HANDOVER_WAIT = 5.0     # seconds a handed-over front end waits for its successor's control socket


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


class Handover:
    """The old front end's side of a seamless upgrade: the control-socket ops ``takeover`` and
    ``control_socket_taken``. Uses the runtime's front end (its listening sockets; `handed_over` is set
    here) and worker links (tcpha.fe.workerlinks)."""

    fe: FrontEnd
    ask_all: Callable[..., Awaitable[list[dict]]]      # tcpha.fe.workerlinks.WorkerLinks

    def __init__(self) -> None:
        # A seamless upgrade: set when the successor's control socket has replaced ours (stop waits
        # for it, so that there is never a moment without one).
        self.control_socket_taken = threading.Event()

    def handover_ops(self) -> dict[str, Callable[[dict, Any], Awaitable[dict]]]:
        """The control socket's extra ops (tcpha.runtime.plane.ControlPlane extra_ops)."""
        return {"takeover": self._op_takeover, "control_socket_taken": self._op_control_socket_taken}

    def wait_for_successor(self) -> None:
        """Before the control plane stops: after a handover, wait until the successor's control
        socket has replaced ours (HANDOVER_WAIT at most)."""
        if self.fe.handed_over and not self.control_socket_taken.wait(HANDOVER_WAIT):
            log.warning("upgrade: the new tcpha-fe did not confirm it took over the control socket within %g s",
                        HANDOVER_WAIT)

    async def _op_takeover(self, request: dict, writer: Any) -> dict:
        """A new tcpha-fe asks for our listening sockets (seamless upgrade): they travel over the
        control socket with SCM_RIGHTS; then we stop like on unload, leaving the kernel state to it."""
        listeners = list(self.fe.listeners)
        sock = writer.get_extra_info("socket")
        ports = [p for _, p in listeners]
        msg = json.dumps({"ok": True, "ports": ports, "pid": os.getpid()}).encode() + b"\n"
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            raw.setblocking(True)
            fdpass.send_fds(raw, msg, [s.fileno() for s, _ in listeners])
        finally:
            raw.close()
        log.log(NOTICE, "upgrade: listening sockets (ports %s) handed to a new tcpha-fe; stopping and leaving "
                "the kernel state to it", " ".join(map(str, ports)))
        self.fe.handed_over = True
        # Workers stop accepting and finish what they dispatch, without waiting for handed-off flows
        # (the successor's control connections receive their FlowClosed).
        await self.ask_all("stop", wait_flows=False)
        os.kill(os.getpid(), signal.SIGTERM)
        return None  # type: ignore[return-value]

    async def _op_control_socket_taken(self, request: dict, writer: Any) -> dict:
        """The successor of a takeover has renamed its control socket over ours: we may close ours."""
        self.control_socket_taken.set()
        return None  # type: ignore[return-value]
