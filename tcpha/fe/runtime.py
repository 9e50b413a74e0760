"""The front end's run-time state and control surface, living in the arbiter (tcpha.runtime.plane).

FrontEndRuntime is the small object that holds the shared state (config, the health table and prober
of tcpha.fe.health with the operator's weights and drains, the control plane, the registration
listener for dregister back ends of tcpha.fe.registry, the HTTP endpoint on `metrics = [ADDR:]PORT`
of tcpha.fe.status) and its life cycle, composed of four parts, one module each:

* tcpha.fe.controlfiles  the control files under RUNDIR (knobs, reads, the status document, the
                         settings in force, the tree);
* tcpha.fe.workerlinks   the runtime links to the workers (tcpha.fe.agent): attach/detach, every
                         change of the health table pushed to them as a *gate* (back end -> may take
                         new connections), the busy count per worker for the pool, stopping a worker;
* tcpha.fe.reload        reload (SIGHUP): the config file re-read and applied;
* tcpha.fe.upgrade       the old process's side of a seamless upgrade (Handover).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from tcpha.fe.controlfiles import ControlFiles
from tcpha.fe.health import PROBE_LINGER, CheckTarget, HealthProber, HealthTable
from tcpha.fe.registry import RegistrationListener
from tcpha.fe.reload import Reload
from tcpha.fe.status import StatusHttpServer
from tcpha.fe.upgrade import Handover
from tcpha.fe.workerlinks import WorkerLinks
from tcpha.runtime.plane import ControlPlane

if TYPE_CHECKING:
    from tcpha.fe.arbiter import FrontEnd     # for types only: the arbiter imports the runtime

log = logging.getLogger("tcpha.fe.runtime")


class FrontEndRuntime(ControlFiles, WorkerLinks, Reload, Handover):
    def __init__(self, fe: FrontEnd):
        self.fe = fe
        self.config = config = fe.config
        self.health = HealthTable(config.rise, config.fall)
        for spec in config.servers:
            self.health.add(spec.name, spec.weight)
        self.dbglevel = config.dbglevel
        self.dtcinterval = config.dtcinterval
        WorkerLinks.__init__(self)
        self.prober: HealthProber | None = None
        self.registry: Any = None
        self.metrics_server: Any = None
        self.started = time.time()
        ControlFiles.__init__(self)
        Handover.__init__(self)
        self.plane = ControlPlane(rundir=config.rundir, tree=self.tree, name="tcpha-fe",
                                  use_fuse=config.usefuse, extra_ops=self.handover_ops())
        self.plane.on_start(self._start_async)
        self.plane.on_stop(self._stop_async)

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, wait_free: float = 0.0, predecessor: Any = None) -> None:
        if predecessor is not None:
            self.plane.start(wait_free=wait_free, predecessor_pid=predecessor.pid,
                             control_socket=predecessor.control_socket)
        else:
            self.plane.start(wait_free=wait_free)

    def stop(self) -> None:
        self.wait_for_successor()
        self.plane.stop()

    async def _start_async(self) -> None:
        c = self.config
        self.prober = HealthProber(self.health, key=c.authkey, raddr=c.raddr, vip=c.vaddr,
                                   interval=self.dtcinterval, timeout=c.healthtimeout,
                                   kind=c.healthcheck, path=c.healthpath, app_port=c.healthport,
                                   on_change=lambda name, change, why: self.push_gate(),
                                   on_flow_closed=self.flow_closed)
        for spec in c.servers:
            self.prober.add(CheckTarget(spec.name, spec.kind, spec.host, spec.port, spec.path))
        self._sampler = asyncio.ensure_future(self._sample_loop())
        if c.metrics is not None:
            self.metrics_server = StatusHttpServer(
                tuple(c.metrics), metrics=self.metrics_text_async, status=self.status_document_async,
                admin=self.page_admin,       # statsadmin is read at each request: a reload turns it on/off
                key=lambda: self.config.authkey if self.config.statsadmin else None)
            try:
                await self.metrics_server.start()
            except OSError as e:
                log.error("metrics endpoint %s:%d: %s", c.metrics[0], c.metrics[1], e.strerror or e)
                self.metrics_server = None
        if c.raddr != "0.0.0.0" and c.registerport:
            self.registry = RegistrationListener(self)
            try:
                await self.registry.start()
            except OSError as e:
                log.error("registration port %s:%d: %s (dregister back ends cannot register)", c.raddr,
                          c.registerport, e.strerror or e)
                self.registry = None

    async def _stop_async(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self.prober is not None:
            gone = self.prober.close()      # each probe: FIN, then what the back end still sends, read
            if gone:
                await asyncio.wait(gone, timeout=PROBE_LINGER + 0.5)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.registry is not None:
            await self.registry.close()
        self.close_links()
        self.kernel_flows.close()


def start_runtime(fe: FrontEnd, *, wait_free: float = 0.0, predecessor: Any = None) -> FrontEndRuntime | None:
    """The front end's runtime, started; None (and one error line) when the control directory cannot
    be served: the front end keeps serving clients without it."""
    try:
        rt = FrontEndRuntime(fe)
        rt.start(wait_free=wait_free, predecessor=predecessor)
        return rt
    except Exception as e:
        log.error("control directory %s not available: %s (running without control files, health checks "
                  "and metrics)", fe.config.rundir, e)
        return None
