"""Dynamic registration (``dregister = 1`` on a back end): the front end's listener on raddr:registerport.

A back end connects, both sides exchange Hellos on an authenticated control connection (same key,
HMAC and replay rules as every control message: tcpha.control), and the back end sends
``Register(addr, port, mac, rules, weight, app_port)``. The front end checks it (the address must be
the connection's source, the rules must compile, the name must not be a static ``server``), adds the
back end live — health table, control files, prober, every worker (control links + its rules, after
the static rules) — and answers ``Registered``. The connection stays open: ``Unregister`` or its loss
(the back end unloads, dies, or misses three keep-alive Pings) removes the back end again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from tcpha import control
from tcpha.loglevels import NOTICE
from tcpha.config import compile_rule
from tcpha.fe.health import CheckTarget

log = logging.getLogger("tcpha.fe.registry")
KEEPALIVE_MISSES = 3


class RegistrationSession(asyncio.Protocol):
    def __init__(self, listener: "RegistrationListener"):
        self.listener = listener
        rt = listener.runtime
        self.conn = control.ControlConnection(rt.config.authkey, role="fe")
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.name: str | None = None
        self.last_heard = time.monotonic()
        self._keepalive: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_ip = peer[0]
        rt = self.listener.runtime
        self.send(control.Hello(node_id=f"tcpha-fe registry pid {os.getpid()}", addr=rt.config.raddr,
                                vaddr=rt.config.vaddr))
        self._keepalive = asyncio.ensure_future(self._keep_alive())

    def send(self, msg: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.send(msg))

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.conn.feed(data)
        except control.ControlError as e:
            log.warning("registration from %s dropped: %s", self.peer_ip, e)
            self.abort()
            return
        self.last_heard = time.monotonic()
        for msg in messages:
            if isinstance(msg, control.Hello):
                if msg.vaddr not in ("0.0.0.0", self.listener.runtime.config.vaddr):
                    log.warning("registration from %s dropped: it serves VIP %s, not ours", self.peer_ip, msg.vaddr)
                    self.abort()
                    return
            elif isinstance(msg, control.Register):
                ok, reason = self.listener.register(self, msg)
                self.send(control.Registered(accepted=ok, reason=reason))
            elif isinstance(msg, control.Unregister):
                if self.name is not None:
                    self.listener.remove(self.name, f"unregistered ({msg.reason or 'back end stopping'})")
                    self.name = None
            elif isinstance(msg, control.Ping):
                self.send(control.Pong(token=msg.token))

    async def _keep_alive(self) -> None:
        token = 0
        while self.transport is not None and not self.transport.is_closing():
            interval = max(1.0, float(self.listener.runtime.dtcinterval or 2.0))
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_heard > KEEPALIVE_MISSES * interval:
                log.warning("registered back end %s: silent for %.0f s; removed", self.name or self.peer_ip,
                            time.monotonic() - self.last_heard)
                self.abort()
                return
            token += 1
            self.send(control.Ping(token=token))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.name is not None:
            self.listener.remove(self.name, "registration connection closed")
            self.name = None
        self.transport = None


class RegistrationListener:
    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.backends: dict[str, dict[str, Any]] = {}     # name -> add_backend request for workers
        self.sessions: dict[str, RegistrationSession] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        c = self.runtime.config
        self._server = await asyncio.get_running_loop().create_server(
            lambda: RegistrationSession(self), c.raddr, c.registerport, reuse_address=True)
        log.info("accepting dregister back ends on %s:%d", c.raddr, c.registerport)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions.values()):
            s.abort()

    def register(self, session: RegistrationSession, msg: Any) -> tuple[bool, str]:
        rt = self.runtime
        name = f"{msg.addr}:{msg.port}"
        if msg.addr != session.peer_ip:
            return self._refuse(name, f"address {msg.addr} is not the connection's source {session.peer_ip}")
        if rt.config.server(name) is not None:
            return self._refuse(name, "already a static server of this front end")
        try:
            for f, p in msg.rules:
                compile_rule(name, f, p)
        except ValueError as e:
            return self._refuse(name, f"rule: {e}")
        if not msg.rules:
            return self._refuse(name, "no rules: nothing would reach it")
        old = self.sessions.get(name)
        if old is not None and old is not session:
            old.name = None
            old.abort()
        session.name = name
        self.sessions[name] = session
        info = {"name": name, "host": msg.addr, "port": int(msg.port), "rules": [list(r) for r in msg.rules]}
        self.backends[name] = info
        be = rt.health.add(name, int(msg.weight) if msg.weight else 1, dynamic=True)
        be.up = True
        rt.add_backend_files(name)
        if rt.prober is not None:
            rt.prober.add(CheckTarget(name, "tcp", msg.addr, int(msg.port), None, int(msg.app_port or 0)))

        async def tell() -> None:
            await rt.ask_all("add_backend", **info)
            await rt.ask_all("gate", gate=rt.health.available(), weights=rt.health.weights())
        asyncio.ensure_future(tell())
        log.log(NOTICE, "back end %s registered (%d rules: %s)", name, len(msg.rules),
                ", ".join(f"{f}:{p}" for f, p in msg.rules))
        return True, ""

    def _refuse(self, name: str, why: str) -> tuple[bool, str]:
        log.warning("registration of %s refused: %s", name, why)
        return False, why

    def remove(self, name: str, why: str) -> None:
        rt = self.runtime
        self.sessions.pop(name, None)
        if self.backends.pop(name, None) is None:
            return
        rt.health.remove(name)
        rt.remove_backend_files(name)
        if rt.prober is not None:
            rt.prober.remove(name)
        asyncio.ensure_future(rt.ask_all("remove_backend", name=name))
        log.log(NOTICE, "back end %s removed: %s", name, why)
