"""The front end's view of its back ends, and the connections it keeps to them.

RemoteBackend: a tcpha-be on another host, reached over `connperbe` persistent, authenticated
control connections (ControlLink). Handoffs are spread round-robin over the links that are up;
a link that drops is reconnected with a growing delay (0.1 s .. 5 s), and the handoffs waiting
on it are failed at once so that their connections fall through to the next back end.

LocalBackend: a tcpha-be on this host (`server = unix:/PATH`); accepted sockets are passed to it
with SCM_RIGHTS over a persistent UNIX stream connection (no TCP state transfer, no steering).

build_backends makes both from the config's `server` lines, for a worker starting and for a reload.
Which handoffs are open on a control link is the worker's FrontEndHandoffs' to say
(tcpha.control.handoff), not the link's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from tcpha import control, fdpass, steering
from tcpha.fdpass import FDPASS_MAGIC
from tcpha.loglevels import NOTICE

if TYPE_CHECKING:  # pragma: no cover
    from tcpha.fe.host import BackendHost

log = logging.getLogger("tcpha.fe.backends")

RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0


class ControlLink(asyncio.Protocol):
    """One persistent control connection to a back end (client side)."""

    def __init__(self, backend: "RemoteBackend", index: int):
        self.backend = backend
        self.worker = backend.worker
        self.index = index
        self.conn: Any = None
        self.transport: asyncio.Transport | None = None
        self.up = False
        self.closing = False
        self.delay = RECONNECT_MIN
        self._timer: asyncio.TimerHandle | None = None
        self._connecting = False
        self._out: list[bytes] = []             # frames queued this loop iteration (see send)
        self.gone: asyncio.Future[None] | None = None   # set by close(): done at connection_lost
        self._eof_sent = False                  # half-closed: nothing more can be written

    # -- connection management -------------------------------------------------------------------
    def connect(self) -> None:
        if self.closing or self._connecting or self.up:
            return
        self._connecting = True
        self.worker.loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self.worker.loop
        local = None
        raddr = self.worker.config.raddr
        if raddr and raddr != "0.0.0.0":
            local = (raddr, 0)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, self.backend.host, self.backend.port, local_addr=local),
                timeout=max(1.0, self.worker.handofftimeout))
        except (OSError, asyncio.TimeoutError) as e:
            self._connecting = False
            if self.index == 0 and self.delay == RECONNECT_MIN:
                log.warning("back end %s: control connection failed: %s", self.backend.name,
                            e if str(e) else type(e).__name__)
            self._retry()
            return
        self._connecting = False

    def _retry(self) -> None:
        if self.closing:
            return
        self._timer = self.worker.loop.call_later(self.delay, self.connect)
        self.delay = min(self.delay * 2, RECONNECT_MAX)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = control.ControlConnection(self.worker.authkey, role="fe")
        self.transport.write(self.conn.send(control.Hello(
            node_id=f"tcpha-fe {self.worker.name} pid {os.getpid()}", addr=self.worker.config.raddr,
            vaddr=self.worker.vip)))

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.conn.feed(data)
        except control.ControlError as e:
            log.error("back end %s: control connection dropped: %s", self.backend.name, e)
            self.worker.stats.control_errors += 1
            self.worker.ledger.metrics.control_error(self.backend.name)
            if self.transport is not None:
                self.transport.abort()
            return
        for msg in messages:
            if isinstance(msg, control.Hello):
                if msg.vaddr not in ("0.0.0.0", self.worker.vip):
                    log.error("back end %s serves VIP %s, not ours (%s): control connection dropped",
                              self.backend.name, msg.vaddr, self.worker.vip)
                    if self.transport is not None:
                        self.transport.abort()
                    return
                self.up = True
                self.delay = RECONNECT_MIN
                self.backend.link_up(self, msg)
                continue
            try:
                self.worker.on_control_message(self, msg)
            except Exception:                                        # never crash the worker
                log.exception("back end %s: handling %s failed", self.backend.name, type(msg).__name__)

    def send(self, msg: Any) -> None:
        """Queue msg's frame; the frames queued in one loop iteration leave in one write.

        Every write on a control connection is a trip through the TCP stack (~40 us of FE CPU on
        the lab, most of the kernel time of a handoff): the Handoffs of one freeze batch and the
        Steereds of one forward batch share one (Worker.flush_links). The frame is built (MAC'd,
        sequence-numbered) here, so encoding errors still raise to the caller.
        """
        if not self.can_send:
            raise ConnectionError(f"control connection {self.index} to {self.backend.name} is closed")
        frame = self.conn.send(msg)
        out = self._out
        out.append(frame)
        if len(out) == 1:
            self.worker.queue_flush(self)

    def flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.transport is not None:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        was_up = self.up
        self.up = False
        self.transport = None
        self._out.clear()                       # the handoffs waiting on it fail below
        self.backend.link_down(self)
        if was_up and not self.closing:
            log.warning("back end %s: control connection %d lost%s", self.backend.name, self.index,
                        f": {exc}" if exc else "")
        for d in self.worker.handoffs.link_lost(self):
            d.refused("control connection lost")
        self._retry()

    @property
    def can_send(self) -> bool:
        """Frames can still be written (a closing link takes no new handoff but finishes its own)."""
        return self.transport is not None and not self._eof_sent

    def handoff_over(self) -> None:
        """A handoff sent on this link is over (Steered sent, refused or failed): a close waiting for
        the link's handoffs to finish goes on when it was the last."""
        if self.gone is not None and not self._eof_sent and not self.worker.handoffs.open_on(self):
            self._half_close()

    def _half_close(self) -> None:
        self.flush()
        self._eof_sent = True
        if self.transport is None:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def close(self) -> "asyncio.Future[None] | None":
        """Close gracefully: write what is queued, then half-close (FIN) and go on reading until the
        back end closes its side (it does once it has read our FIN: tcpha.be.handoff.ControlSession.
        eof_received). Closing outright while the back end's FlowClosed reports sit unread in our
        receive queue would make the kernel answer with RST (RFC 1122 4.2.2.13: close with unread
        data), and an RST may destroy our last frames, a Steered among them, before the back end has
        read them. Handoffs already sent on the link finish first (their Restored is read, their Steered
        written: handoff_over); no new one starts on it. Returns a future done when the connection is
        gone (None if it is already)."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self.up:
            self.up = False
            self.backend.link_down(self)
        if self.transport is None:
            return None
        if self.gone is None:
            self.gone = self.worker.loop.create_future()
            if not self.worker.handoffs.open_on(self):
                self._half_close()
        return self.gone

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class RemoteBackend:
    kind = "tcp"

    def __init__(self, worker: "BackendHost", host: str, port: int, connperbe: int):
        self.worker = worker
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.links = [ControlLink(self, i) for i in range(connperbe)]
        self.ready: list[ControlLink] = []
        self._rr = 0
        self.mac: str | None = None
        self.hello_mac: str | None = None
        self.handoffs = 0
        self.refused = 0

    def start(self) -> None:
        for link in self.links:
            link.connect()

    def close(self) -> list["asyncio.Future[None]"]:
        """Close every control connection gracefully (ControlLink.close); the futures say when they are gone."""
        return [f for f in (link.close() for link in self.links) if f is not None]

    def link_up(self, link: ControlLink, hello: Any) -> None:
        self.hello_mac = getattr(hello, "mac", "") or None
        if self.mac is None:
            # Netlink (pyroute2) refuses to run inside the event loop: resolve in a thread, and
            # count the link as ready once the back end's MAC is known.
            self.worker.loop.create_task(self._resolve_then_ready(link, hello))
            return
        self._ready(link, hello)

    async def _resolve_then_ready(self, link: ControlLink, hello: Any) -> None:
        if self.mac is None:
            await self.worker.loop.run_in_executor(None, self.resolve_mac)
        if self.mac is None:
            if link.transport is not None:
                link.transport.abort()
            return
        if link.up:
            self._ready(link, hello)

    def _ready(self, link: ControlLink, hello: Any) -> None:
        if link not in self.ready:
            self.ready.append(link)
        if self.worker.rehandoff:
            link.send(self.worker.rules_message(self))
        log.log(NOTICE, "back end %s: control connection %d up (%s, mac %s)", self.name, link.index,
                getattr(hello, "node_id", "?"), self.mac)

    def link_down(self, link: ControlLink) -> None:
        if link in self.ready:
            self.ready.remove(link)

    def resolve_mac(self) -> str | None:
        """The back end's MAC on the LAN (the control connection made the kernel resolve it). In routed
        mode (`tunnel = vxlan|ipip`) flows go to the back end's address instead, which may be behind a
        router: then this is its IPv4 address (what the steering entries hold)."""
        if self.worker.config.tunnel != "none":
            try:
                self.mac = socket.gethostbyname(self.host)
            except OSError as e:
                log.error("back end %s: no IPv4 address for the tunnel: %s", self.name, e)
                self.mac = None
            return self.mac
        try:
            self.mac = steering.neighbour_mac(self.host, self.worker.ifname)
        except Exception as e:
            if self.hello_mac:
                log.warning("back end %s: no neighbour entry on %s (%s); using the MAC it announced, %s",
                            self.name, self.worker.ifname, e, self.hello_mac)
                self.mac = self.hello_mac
            else:
                log.error("back end %s: no MAC address on %s: %s", self.name, self.worker.ifname, e)
                self.mac = None
        return self.mac

    def pick_link(self) -> ControlLink | None:
        ready = self.ready
        if not ready:
            return None
        self._rr = (self._rr + 1) % len(ready)
        return ready[self._rr]

    @property
    def available(self) -> bool:
        return bool(self.ready)


class LocalBackend:
    """A tcpha-be on this host that takes accepted sockets over a UNIX socket (SCM_RIGHTS)."""

    kind = "unix"

    def __init__(self, worker: "BackendHost", path: str):
        self.worker = worker
        self.path = path
        self.name = f"unix:{path}"
        self.sock: socket.socket | None = None
        self.handoffs = 0
        self._next_try = 0.0

    def start(self) -> None:
        self._connect()

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            self._next_try = now + 1.0
            log.warning("back end %s: cannot connect: %s", self.name, e.strerror or e)
            return False
        s.setblocking(False)
        self.sock = s
        # The back end never writes on this socket; readability means it closed the connection.
        self.worker.loop.add_reader(s.fileno(), self._readable)
        log.log(NOTICE, "back end %s: connected", self.name)
        return True

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.warning("back end %s: connection closed", self.name)
            self._drop()

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.worker.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()
            self.sock = None

    @property
    def available(self) -> bool:
        return self.sock is not None or time.monotonic() >= self._next_try

    def pass_socket(self, client: socket.socket, lport: int) -> bool:
        """Send the client socket to the local back end; True when it has left this process."""
        if self.sock is None and not self._connect():
            return False
        assert self.sock is not None
        try:
            fdpass.send_fds(self.sock, FDPASS_MAGIC + lport.to_bytes(2, "big"), [client.fileno()])
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                log.warning("back end %s: busy (socket buffer full)", self.name)
                return False
            log.warning("back end %s: passing a socket failed: %s", self.name, e.strerror or e)
            self._drop()
            return False
        self.handoffs += 1
        return True

    def close(self) -> None:
        self._drop()


def backend_keys(spec: Any) -> list[str]:
    """The names rules may give a `server` line: HOST:PORT (or unix:/PATH), and HOST alone."""
    return [spec.name] if spec.kind == "unix" else [spec.name, spec.host]


def build_backends(worker: "BackendHost", specs: list[Any], connperbe: int,
                   known: dict[str, Any] | None = None) -> dict[str, Any]:
    """Back ends for the config's `server` lines, by each of their names (backend_keys). One `known`
    already under one of its names (a reload) is kept; a new one is made and, when `known` is given,
    started (a worker starts its back ends itself when it starts serving)."""
    table: dict[str, Any] = {}
    for spec in specs:
        keys = backend_keys(spec)
        be = next((known[k] for k in keys if known is not None and k in known), None)
        if be is None:
            be = (LocalBackend(worker, spec.path) if spec.kind == "unix"
                  else RemoteBackend(worker, spec.host, spec.port, connperbe))
            if known is not None:
                be.start()
        for key in keys:
            table.setdefault(key, be)
    return table
