"""``dregister = 1``: the back end registers itself with the front end at feaddr:feport, with its rules.

An authenticated control connection (tcpha.control, role be): Hello both ways, then
``Register(raddr, port, mac, rules, weight, app_port)``; the front end answers ``Registered``. The
connection is kept open (Pings answered) and its loss makes the back end register again every
``registerretry`` seconds, so a front end started after the back end picks it up, and so does a
restarted one. On stop the back end sends ``Unregister`` first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tcpha import control
from tcpha.be.handoff import backend_hello
from tcpha.config import register_rules
from tcpha.loglevels import NOTICE

log = logging.getLogger("tcpha.be.registrar")


class _Session(asyncio.Protocol):
    def __init__(self, registrar: "Registrar"):
        self.registrar = registrar
        self.conn = control.ControlConnection(registrar.authkey, role="be")
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        r = self.registrar
        self.send(backend_hello(r.config, mac=r.mac(), app_port=r.app_port))
        # Register goes once the front end's Hello is in (the frame keys need both nonces).

    def send(self, msg: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.send(msg))

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.conn.feed(data)
        except control.ControlError as e:
            log.error("registration with %s dropped: %s", self.registrar.fe_name, e)
            self.transport.abort()  # type: ignore[union-attr]
            return
        for msg in messages:
            if isinstance(msg, control.Hello):
                self.send(self.registrar.register_message())
            elif isinstance(msg, control.Registered) and not self.answer.done():
                self.answer.set_result(msg)
            elif isinstance(msg, control.Ping):
                self.send(control.Pong(token=msg.token))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("connection closed before an answer"))
        if not self.closed.done():
            self.closed.set_result(None)


class Registrar:
    def __init__(self, config: Any, *, app_port: int, mac: Any):
        self.config = config
        self.authkey = config.authkey
        self.app_port = app_port
        self.mac = mac
        self.rules = register_rules(config)
        self.fe_name = f"{config.feaddr}:{config.feport}"
        self.session: _Session | None = None
        self._task: asyncio.Task | None = None
        self.registered = False

    def register_message(self) -> Any:
        return control.Register(addr=self.config.raddr, port=self.config.port, mac=self.mac() or "",
                                rules=tuple(self.rules), weight=1, app_port=self.app_port)

    def update(self, config: Any, *, app_port: int) -> bool:
        """A reloaded config: new rules / application port, sent again on the live registration (the front
        end replaces what it had); True if sent now, else the next registration carries them."""
        self.config = config
        self.rules = register_rules(config)
        self.app_port = app_port
        s = self.session
        if self.registered and s is not None and s.transport is not None and not s.transport.is_closing():
            s.send(self.register_message())
            return True
        return False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        complained = False
        while True:
            retry = self.config.registerretry      # read each time: a reload may change it
            try:
                _, session = await asyncio.wait_for(loop.create_connection(
                    lambda: _Session(self), self.config.feaddr, self.config.feport,
                    local_addr=(self.config.raddr, 0)), timeout=max(1.0, retry))
                self.session = session
                answer = await asyncio.wait_for(session.answer, timeout=5.0)
                if answer.accepted:
                    self.registered = True
                    complained = False
                    log.log(NOTICE, "registered with front end %s (%d rules)", self.fe_name, len(self.rules))
                    await session.closed
                    self.registered = False
                    log.warning("registration with front end %s lost; registering again every %g s",
                                self.fe_name, retry)
                else:
                    log.error("front end %s refused the registration: %s", self.fe_name, answer.reason)
                    session.transport.abort()
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                if not complained:
                    log.warning("cannot register with front end %s: %s; retrying every %g s", self.fe_name,
                                e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__),
                                retry)
                    complained = True
            await asyncio.sleep(retry)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        s = self.session
        if s is not None and s.transport is not None and not s.transport.is_closing():
            s.send(control.Unregister(addr=self.config.raddr, port=self.config.port, reason="back end stopping"))
            s.transport.close()
            await asyncio.sleep(0)


def start_registrar(be: Any) -> Registrar | None:
    """The back end's registrar when ``dregister`` is set (started), else None."""
    if not be.config.dregister:
        return None
    r = Registrar(be.config, app_port=be.app_addr[1], mac=lambda: be.lan_mac)
    r.start()
    return r
