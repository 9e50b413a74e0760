"""tcpha-be: restores handed-off connections and relays them to the local application.

One asyncio loop, callbacks only. BackEnd holds the life cycle (run, serve, stop with a grace period),
the connections being relayed, the counters and the metrics endpoint, and composes:
- tcpha.be.handoff: the control listener's sessions from front ends and what a Handoff sets off
  (restore, connect to the application, Restored/Refused, waiting for Steered, FlowClosed);
- tcpha.be.samehost: same-host fd passing (a UNIX listener; sockets arrive by SCM_RIGHTS);
- tcpha.be.kernelstate: the VIP on lo and its ARP filter;
- tcpha.be.runtime / tcpha.be.reload / tcpha.be.registrar: control directory, SIGHUP, dregister.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from tcpha.be.appsource import AppSource
from tcpha.be.handoff import ControlSession, HandoffReceiver
from tcpha.be.kernelstate import KernelState, vip_held_elsewhere
from tcpha.be.registrar import Registrar, start_registrar
from tcpha.be.reload import BackEndReloader
from tcpha.be.runtime import BackEndRuntime, start_be_runtime
from tcpha.be.samehost import SameHostListener
from tcpha.be.tls import TlsTermination
from tcpha.loglevels import NOTICE
from tcpha.metrics import MetricsServer, backend_exposition
from tcpha.bpf.relay import choose_relay, relay_class
from tcpha.relay import SpliceRelay

log = logging.getLogger("tcpha.be")



@dataclass
class BackEndStats:
    handoffs: int = 0
    refused: int = 0
    fdpassed: int = 0
    control_errors: int = 0
    active: int = 0
    moved_away: int = 0      # rehandoff: connections moved on at a request for another back end


class BackEnd:
    """The back-end daemon. `kernel=False` skips VIP/ARP installation (tests that install it themselves)."""

    def __init__(self, config: Any, *, kernel: bool = True):
        self.config = config
        self.authkey: bytes = config.authkey
        self.vip: str = config.vaddr
        self.app_addr = config.app_address
        self.maxclients: int = config.maxclients
        self.unix_path: str | None = config.unixpath
        self.kernel = kernel
        self.loop: asyncio.AbstractEventLoop | None = None  # type: ignore[assignment]
        self.handoffs = HandoffReceiver(self)     # control sessions, handoffs, FlowClosed (tcpha.be.handoff)
        self.relays: set[SpliceRelay] = set()
        self.relay_kind = "splice"                # relay = auto|bpf|splice, chosen in serve()
        self.stats = BackEndStats()
        self._server: asyncio.AbstractServer | None = None
        self.samehost: SameHostListener | None = None
        self._stop: asyncio.Event | None = None
        self.kernel_state = KernelState(self.vip, config.interface, config.raddr, config.tunnel)
        self.on_ready: Callable[[], None] | None = None
        # tlscert set: connections to a VIP port in tlsports are TLS-terminated here (tcpha.be.tls).
        self.tls: TlsTermination | None = None
        self.stopping = False                     # SIGTERM: handoffs refused, relays given `grace`
        self.stop_asked = False                   # stop() before serve() made its event: serve() stops at once
        self.metrics_server: Any = None
        self.runtime: BackEndRuntime | None = None      # control directory (tcpha.be.runtime)
        self.registrar: Registrar | None = None         # dregister (tcpha.be.registrar)
        self.reloader: BackEndReloader | None = None    # SIGHUP (tcpha.be.reload)
        # Where application connections come from (appsource; tcpha.be.appsource): set up by run().
        self.appsource = AppSource()

    def start_relay(self, client: socket.socket, app: socket.socket,
                    on_done: Callable[[SpliceRelay], None], *, hold_down: bool = False,
                    make: Callable[..., Any] | None = None) -> SpliceRelay:
        """Relay `client` to `app` (TLS-terminated when tlsports says so; `make(loop, client, app, on_done)`
        when given: rehandoff); `on_done` calls relay_ended."""
        if make is not None:
            relay: Any = make(self.loop, client, app, on_done)
        elif self.tls is not None and self.tls.wants(client):
            relay: Any = self.tls.relay(self.loop, client, app, on_done)
        else:
            relay = relay_class(self.relay_kind)(self.loop, client, app, on_done)
        relay.started = time.monotonic()     # for the conn table's age  # type: ignore[attr-defined]
        self.relays.add(relay)
        self.stats.active = len(self.relays)
        relay.start(hold_down=hold_down)
        return relay

    def relay_ended(self, relay: SpliceRelay) -> None:
        self.relays.discard(relay)
        self.stats.active = len(self.relays)

    @property
    def sessions(self) -> set[ControlSession]:
        """The control sessions from front ends now open."""
        return self.handoffs.sessions

    @property
    def lan_mac(self) -> str | None:
        """The LAN interface's MAC once the kernel state is installed (Hello, dregister)."""
        return self.kernel_state.lan_mac

    # -- life cycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """Install the kernel state, serve until SIGTERM/SIGINT, remove the kernel state.

        Netlink work (pyroute2) happens outside the event loop: pyroute2 0.9's synchronous API
        refuses to run inside a running asyncio loop.
        """
        if self.kernel and (self.unix_path or vip_held_elsewhere(self.vip)):
            # A back end with a UNIX socket shares its host with a front end (that is what the
            # socket is for), which holds the VIP on its LAN interface: the passed sockets are
            # already bound to it. Adding the VIP to lo and filtering its ARP here would break
            # that front end, whichever of the two starts first.
            log.log(NOTICE, "a front end shares this host (unixpath set, or the VIP %s on a LAN "
                    "interface): VIP and ARP filtering left to it", self.vip)
            self.kernel = False
        self.tls = TlsTermination.from_config(self.config)     # before any kernel state: may fail
        if self.kernel:
            self.kernel_state.install()
        try:
            self.appsource = AppSource.start(self.config.appsource, self.app_addr)
            proxy = self.config.appproxy
            log.log(NOTICE, "application connections %s%s", self.appsource.describe(),
                    f"; PROXY protocol {proxy} header first" if proxy != "off" else "")
            profile = os.environ.get("TCPHA_PROFILE")       # bench/handoff: where the CPU goes
            if profile:
                prof = cProfile.Profile()
                try:
                    prof.runcall(asyncio.run, self.serve())
                finally:
                    prof.dump_stats(f"{profile}.be.{os.getpid()}")
            else:
                asyncio.run(self.serve())
        finally:
            self.appsource.stop()
            if self.kernel:
                self.kernel_state.remove()

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # The loop takes SIGTERM/SIGINT over before anything else (until now tcpha.cli.be's handler
        # remembered them in stop_asked), so that a stop at any point of the start-up is a clean stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop)
        if self.stop_asked:
            self._stop.set()
        try:
            host = self.config.raddr
            self._server = await self.loop.create_server(lambda: ControlSession(self.handoffs), host,
                                                         self.config.port, reuse_address=True,
                                                         backlog=1024)
            log.info("listening for front ends on %s:%d; application at %s:%d; VIP %s",
                     host, self.config.port, *self.app_addr, self.vip)
            self.relay_kind, why = choose_relay(self.config.relay)
            log.log(NOTICE, "relay: %s (%s)", self.relay_kind, why)
            if self.unix_path:
                self.samehost = SameHostListener(self, self.unix_path)
                self.samehost.listen()
            # Control directory (sys/unload, sys/dbglevel, conn) and dregister (docs/operations.md).
            self.runtime = start_be_runtime(self)
            self.registrar = start_registrar(self)
            await self._start_metrics()
            if self.on_ready is not None:
                self.on_ready()
            await self._stop.wait()
            await self._finish_relays()
        finally:
            await self._shutdown()

    async def _start_metrics(self) -> None:
        """``metrics = [ADDR:]PORT``: a Prometheus endpoint with this back end's counters (as the front end's)."""
        if self.config.metrics is None:
            return
        self.metrics_server = MetricsServer(tuple(self.config.metrics), self.metrics_text)
        try:
            await self.metrics_server.start()
        except OSError as e:
            log.error("metrics endpoint %s:%d: %s", *self.config.metrics, e.strerror or e)
            self.metrics_server = None

    def metrics_text(self) -> str:
        s = self.stats
        registrar = self.registrar
        return backend_exposition(handoffs=s.handoffs, refused=s.refused, fdpassed=s.fdpassed,
                                  control_errors=s.control_errors, relayed=len(self.relays),
                                  front_ends=len(self.sessions), appsource_fallbacks=self.appsource.fallbacks,
                                  registered=None if registrar is None else bool(registrar.registered),
                                  tls=self.tls.stats if self.tls is not None else None)

    async def _finish_relays(self) -> None:
        """SIGTERM / unload: take no new connections (unregistered, the control port closed, a Handoff on a
        connection still open refused so that the front end tries its next back end, its health checks
        disconnected so that it marks us down), and let the connections being relayed end by themselves
        for up to ``grace`` seconds; a second SIGTERM ends the wait. What is left is then closed."""
        self.stopping = True
        if self.registrar is not None:
            await self.registrar.stop()               # Unregister: the front end stops sending at once
            self.registrar = None
        if self._server is not None:
            self._server.close()
        self.handoffs.close_health_sessions()
        grace = self.config.grace
        if not self.relays or grace <= 0:
            log.info("stopping: %d connections relayed still open", len(self.relays))
            return
        log.log(NOTICE, "stopping: waiting up to %g s for %d relayed connections to end", grace, len(self.relays))
        self._stop = asyncio.Event()                  # set again by a second SIGTERM
        deadline = self.loop.time() + grace
        while self.relays and not self._stop.is_set():
            left = deadline - self.loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._stop.wait(), min(0.1, left))
            except asyncio.TimeoutError:
                pass
        if self.relays:
            log.warning("stopping: %d relayed connections still open after %s; closed",
                        len(self.relays), "a second signal" if self._stop.is_set() else f"grace ({grace:g} s)")
        else:
            log.log(NOTICE, "stopping: every relayed connection has ended")

    def stop(self) -> None:
        self.stop_asked = True
        if self._stop is not None:
            self._stop.set()

    async def _shutdown(self) -> None:
        if self.registrar is not None:
            await self.registrar.stop()               # Unregister: the front end stops sending at once
        if self.runtime is not None:
            self.runtime.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.abort()
        if self.samehost is not None:
            self.samehost.close()
        for r in list(self.relays):
            r.close()

