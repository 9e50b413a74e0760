"""Back-end health: which back ends may take new connections (sans-I/O state + an asyncio prober).

State per back end (``BackendHealth``), driven by check results and by the operator:

* ``up``: the damped result of the checks. A back end starts up (the control connections decide at
  once whether handoffs can go there; checks only take it *out*). ``fall`` consecutive failed
  checks take it out, ``rise`` consecutive good checks put it back (HAProxy's rise/fall): a
  flapping back end that alternates good and bad checks never goes back in while ``rise > 1``.
* ``weight`` (0-256, from ``server = ... weight=N`` or the control files) and ``drain``: weight 0 or
  drain stops *new* handoffs; flows already handed off keep their steering entries until they end.

``accepts_new`` = up and not drain and weight > 0: what the dispatcher asks per candidate.

The prober (``HealthProber``) checks each back end every ``dtcinterval`` seconds (0: off, state
frozen as it is) with two checks, both must pass:

1. control channel: a persistent authenticated control connection (its own, separate from the
   workers' handoff links) carries a ``Ping``; the matching ``Pong`` must come within ``healthtimeout``;
2. application: a TCP connect to the back end's application port (``healthport``, else the
   ``app_port`` the back end announced in its Hello, i.e. its redirectport), or with
   ``healthcheck = http`` a ``GET healthpath`` answered 2xx/3xx.

A dead back end is therefore taken out at most ``dtcinterval + healthtimeout`` after it died
(with fall = 1; ``healthtimeout <= dtcinterval`` is enforced by the config), i.e. within one interval
plus one second with the default timeout of 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tcpha.loglevels import NOTICE
from tcpha import control

log = logging.getLogger("tcpha.fe.health")
MAX_WEIGHT = 256
PROBE_LINGER = 1.0     # a closing probe connection waits at most this long for the back end's FIN


@dataclass
class BackendHealth:
    """Health and operator state of one back end (no I/O)."""
    name: str
    rise: int = 2
    fall: int = 1
    weight: int = 1
    drain: bool = False
    up: bool = True
    dynamic: bool = False            # added by a Register (dregister) rather than a server line
    good_in_row: int = 0
    bad_in_row: int = 0
    checks: int = 0
    failures: int = 0
    last_error: str = ""
    last_check: float = 0.0          # time.time() of the last result
    changed: float = field(default_factory=time.time)
    rtt: float | None = None         # seconds, control channel Ping -> Pong
    session_lookups: int = 0         # its TLS session cache's lookups and hits, from its last Pong
    session_hits: int = 0

    @property
    def accepts_new(self) -> bool:
        return self.up and not self.drain and self.weight > 0

    @property
    def status(self) -> str:
        """One word for tables: up, down, drain (up but weight 0 or drain)."""
        if not self.up:
            return "down"
        if self.drain or self.weight <= 0:
            return "drain"
        return "up"

    def record(self, ok: bool, error: str = "", now: float | None = None) -> str | None:
        """Feed one check result; returns 'up' or 'down' when the damped state changed, else None."""
        self.checks += 1
        self.last_check = time.time() if now is None else now
        if ok:
            self.good_in_row += 1
            self.bad_in_row = 0
            self.last_error = ""
            if not self.up and self.good_in_row >= self.rise:
                self.up = True
                self.changed = self.last_check
                return "up"
            return None
        self.failures += 1
        self.bad_in_row += 1
        self.good_in_row = 0
        self.last_error = error or "check failed"
        if self.up and self.bad_in_row >= self.fall:
            self.up = False
            self.changed = self.last_check
            return "down"
        return None

    def set_weight(self, weight: int) -> None:
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be 0-{MAX_WEIGHT}, not {weight}")
        self.weight = weight

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "up": self.up, "weight": self.weight,
                "drain": self.drain, "dynamic": self.dynamic, "checks": self.checks,
                "failures": self.failures, "last_error": self.last_error,
                "since": round(self.changed, 3), "last_check": round(self.last_check, 3),
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
                "session_lookups": self.session_lookups, "session_hits": self.session_hits}


class HealthTable:
    """Every back end's BackendHealth, by name (``HOST:PORT`` or ``unix:/PATH``)."""

    def __init__(self, rise: int = 2, fall: int = 1):
        self.rise = rise
        self.fall = fall
        self.backends: dict[str, BackendHealth] = {}

    def add(self, name: str, weight: int = 1, *, dynamic: bool = False) -> BackendHealth:
        be = self.backends.get(name)
        if be is None:
            be = self.backends[name] = BackendHealth(name, rise=self.rise, fall=self.fall, weight=weight,
                                                      dynamic=dynamic)
        else:
            be.weight = weight
            be.dynamic = dynamic
        return be

    def remove(self, name: str) -> None:
        self.backends.pop(name, None)

    def get(self, name: str) -> BackendHealth | None:
        return self.backends.get(name)

    def set_damping(self, rise: int, fall: int) -> None:
        self.rise, self.fall = rise, fall
        for be in self.backends.values():
            be.rise, be.fall = rise, fall

    def available(self) -> dict[str, bool]:
        """name -> accepts new connections (what the workers are told)."""
        return {name: be.accepts_new for name, be in self.backends.items()}

    def weights(self) -> dict[str, int]:
        """name -> weight (what the workers split rule pools by)."""
        return {name: be.weight for name, be in self.backends.items()}

    def snapshot(self) -> list[dict[str, Any]]:
        return [be.snapshot() for be in self.backends.values()]


# -- I/O: the prober --------------------------------------------------------------------------------

@dataclass
class CheckTarget:
    """Where to check one back end."""
    name: str
    kind: str                      # 'tcp' | 'unix'
    host: str | None = None
    port: int | None = None        # control port
    path: str | None = None        # unix: the back end's socket
    app_port: int = 0              # learnt from the back end's Hello unless healthport is set


class _ControlProbe(asyncio.Protocol):
    """A persistent control connection used only for Ping/Pong."""

    def __init__(self, key: bytes, raddr: str, vip: str, on_flow_closed: Callable[[Any], None] | None = None):
        self.on_flow_closed = on_flow_closed
        self.control = control
        self.conn = control.ControlConnection(key, role="fe")
        self.raddr = raddr
        self.vip = vip
        self.transport: asyncio.Transport | None = None
        self.hello: Any = None
        self.ready = asyncio.get_running_loop().create_future()
        self.waiting: dict[int, asyncio.Future] = {}
        self.lost = False
        self.error = ""
        self.gone: asyncio.Future | None = None        # close(): done once the connection is gone
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.conn.send(self.control.Hello(
            node_id=f"tcpha-fe health pid {os.getpid()}", addr=self.raddr, vaddr=self.vip)))

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.conn.feed(data)
        except self.control.ControlError as e:
            self.error = f"control channel error: {e}"
            if self.transport is not None:
                self.transport.abort()
            return
        for msg in messages:
            if isinstance(msg, self.control.Hello):
                self.hello = msg
                if not self.ready.done():
                    self.ready.set_result(msg)
            elif isinstance(msg, self.control.Pong):
                fut = self.waiting.pop(msg.token, None)
                if fut is not None and not fut.done():
                    fut.set_result((time.monotonic(), msg))
            elif isinstance(msg, self.control.Ping):
                self.send(self.control.Pong(token=msg.token))
            elif isinstance(msg, self.control.FlowClosed) and self.on_flow_closed is not None:
                # a back end whose flow's worker is gone reports the end here (tcpha.fe.orphans)
                self.on_flow_closed(msg)

    def send(self, msg: Any) -> None:
        if self.transport is not None and not self.lost and self.gone is None:   # nothing after our FIN
            self.transport.write(self.conn.send(msg))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger is not None:
            self._linger.cancel()
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        why = self.error or (f"control connection lost: {exc}" if exc else "control connection closed")
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self.waiting.clear()

    def close(self) -> "asyncio.Future[None] | None":
        """Close gracefully: half-close (FIN) and read on until the back end closes its side (it does
        once it has read our FIN), as the workers' control links do (tcpha.fe.backends.ControlLink.close).
        Closing outright would make the kernel answer anything still on its way, a Pong or a FlowClosed
        for an orphaned flow (tcpha.fe.orphans), with RST (RFC 1122 4.2.2.13), and that FlowClosed would
        be lost. PROBE_LINGER bounds the wait. Returns a future done when the connection is gone (None
        if it is already)."""
        if self.transport is None or self.lost:
            return None
        if self.gone is None:
            loop = asyncio.get_running_loop()
            self.gone = loop.create_future()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
            self._linger = loop.call_later(PROBE_LINGER, self.abort)
        return self.gone

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class HealthProber:
    """Checks every back end every `interval` seconds and feeds the HealthTable.

    `on_change(name, 'up'|'down', reason)` is called on every damped transition (the control plane
    then tells the workers). `interval` may change at run time (``set_interval``): the running
    sleeps are woken so that a new value takes effect within a second.
    """

    def __init__(self, table: HealthTable, *, key: bytes, raddr: str, vip: str, interval: float,
                 timeout: float, kind: str = "tcp", path: str = "/", app_port: int = 0,
                 on_change: Callable[[str, str, str], None] | None = None,
                 on_flow_closed: Callable[[Any], None] | None = None):
        self.table = table
        self.key = key
        self.raddr = raddr if raddr and raddr != "0.0.0.0" else None
        self.vip = vip
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.kind = kind
        self.path = path
        self.app_port = int(app_port)
        self.on_change = on_change
        self.on_flow_closed = on_flow_closed
        self.targets: dict[str, CheckTarget] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._probes: dict[str, _ControlProbe] = {}
        self._wake = asyncio.Event()
        self._token = 0

    # -- targets ---------------------------------------------------------------------------------
    def add(self, target: CheckTarget) -> None:
        self.targets[target.name] = target
        if target.name not in self._tasks:
            self._tasks[target.name] = asyncio.get_running_loop().create_task(self._run(target.name))

    def remove(self, name: str) -> "asyncio.Future[None] | None":
        """Stop checking `name`; its probe connection closes gracefully (the future: it is gone)."""
        self.targets.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        probe = self._probes.pop(name, None)
        return probe.close() if probe is not None else None

    def set_interval(self, interval: float) -> None:
        self.interval = float(interval)
        if self.interval > 0:
            self.timeout = min(self.timeout, self.interval)
        self._wake.set()
        self._wake = asyncio.Event()

    def close(self) -> list["asyncio.Future[None]"]:
        """Stop every check; the futures say when the probe connections are gone (within PROBE_LINGER)."""
        return [f for f in (self.remove(name) for name in list(self._tasks)) if f is not None]

    # -- the loop per back end -------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        wake = self._wake
        try:
            await asyncio.wait_for(wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _run(self, name: str) -> None:
        while name in self.targets:
            interval = self.interval
            if interval <= 0:                      # off: state frozen; look again within a second
                await self._sleep(1.0)
                continue
            started = time.monotonic()
            target = self.targets.get(name)
            if target is None:
                return
            ok, error = await self.check(target)
            be = self.table.get(name)
            if be is not None:
                change = be.record(ok, error)
                if change is not None:
                    reason = error if change == "down" else f"{be.rise} good check(s) in a row"
                    log.log(NOTICE if change == "up" else logging.WARNING, "back end %s is %s: %s",
                            name, change.upper(), reason)
                    if self.on_change is not None:
                        self.on_change(name, change, reason)
                elif not ok:
                    log.info("back end %s: check failed (%d/%d): %s", name, be.bad_in_row, be.fall, error)
            # Sleep at most a second at a time: a new dtcinterval takes effect within one second.
            while name in self.targets:
                left = started + self.interval - time.monotonic()
                if left <= 0 or self.interval <= 0:
                    break
                await self._sleep(min(left, 1.0))

    async def check(self, target: CheckTarget) -> tuple[bool, str]:
        """Both checks of one back end: (ok, why not)."""
        try:
            if target.kind == "unix":
                return await asyncio.wait_for(self._check_unix(target), self.timeout)
            return await asyncio.wait_for(self._check_tcp(target), self.timeout)
        except asyncio.TimeoutError:
            return False, f"no answer within {self.timeout:g} s"
        except (OSError, ConnectionError) as e:
            return False, str(e) or type(e).__name__

    async def _check_unix(self, target: CheckTarget) -> tuple[bool, str]:
        # A same-host back end: its UNIX socket accepts connections (SEQPACKET, no control protocol).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, target.path)
        except OSError as e:
            return False, f"unix:{target.path}: {e.strerror or e}"
        finally:
            s.close()
        return True, ""

    async def _probe(self, target: CheckTarget) -> _ControlProbe:
        probe = self._probes.get(target.name)
        if probe is not None and not probe.lost:
            return probe
        loop = asyncio.get_running_loop()
        local = (self.raddr, 0) if self.raddr else None
        try:
            _, probe = await loop.create_connection(
                lambda: _ControlProbe(self.key, self.raddr or "0.0.0.0", self.vip, self.on_flow_closed),
                target.host, target.port, local_addr=local)
        except OSError as e:
            raise ConnectionError(f"control port {target.host}:{target.port}: {e.strerror or e}") from None
        self._probes[target.name] = probe
        try:
            hello = await probe.ready
        except BaseException:
            self._probes.pop(target.name, None)
            probe.close()
            raise
        if hello.app_port:   # on every (re)connect: a reloaded back end may announce a new one
            target.app_port = int(hello.app_port)
        return probe

    async def _check_tcp(self, target: CheckTarget) -> tuple[bool, str]:
        probe = await self._probe(target)
        self._token = (self._token + 1) & 0xFFFFFFFF
        token = self._token
        fut = asyncio.get_running_loop().create_future()
        probe.waiting[token] = fut
        t0 = time.monotonic()
        probe.send(probe.control.Ping(token=token))
        t1, pong = await fut
        be = self.table.get(target.name)
        if be is not None:
            be.rtt = t1 - t0
            be.session_lookups, be.session_hits = pong.session_lookups, pong.session_hits
        port = self.app_port or target.app_port
        if not port:
            return True, ""                       # no application port known: the channel is enough
        if self.kind == "http":
            return await self._check_http(target.host or "", port)
        return await self._check_connect(target.host or "", port)

    async def _check_connect(self, host: str, port: int) -> tuple[bool, str]:
        try:
            _, writer = await asyncio.open_connection(host, port,
                                                      local_addr=(self.raddr, 0) if self.raddr else None)
        except OSError as e:
            return False, f"application {host}:{port}: {e.strerror or e}"
        writer.transport.abort()
        return True, ""

    async def _check_http(self, host: str, port: int) -> tuple[bool, str]:
        try:
            reader, writer = await asyncio.open_connection(
                host, port, local_addr=(self.raddr, 0) if self.raddr else None)
        except OSError as e:
            return False, f"application {host}:{port}: {e.strerror or e}"
        try:
            writer.write(f"GET {self.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: tcpha-fe-health\r\n"
                         f"Connection: close\r\n\r\n".encode("latin-1"))
            line = await reader.readline()
        finally:
            writer.transport.abort()
        return http_status_ok(line, host, port, self.path)


def http_status_ok(status_line: bytes, host: str = "", port: int = 0, path: str = "/") -> tuple[bool, str]:
    """(ok, why): a status line 2xx or 3xx is healthy (HAProxy's httpchk default)."""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, f"GET {path} on {host}:{port}: not an HTTP answer ({status_line[:40]!r})"
    status = int(parts[1])
    if 200 <= status < 400:
        return True, ""
    return False, f"GET {path} on {host}:{port}: status {status}"
