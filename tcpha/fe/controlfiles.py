"""The front end's control files and what they show (served by tcpha.runtime.plane under RUNDIR, default
/run/tcpha/fe, as files with FUSE or through the control socket, `tcpha-ctl`):

    sys/unload        write 1: stop like SIGTERM (stop accepting, finish, wait for flows / grace)
    sys/dbglevel      0-6, applied to the arbiter and every worker at once
    sys/dtcinterval   seconds between health checks, 0 = off; a new value applies within 1 s
    sys/rise sys/fall health damping
    backends/NAME/{status,weight,drain}   NAME is HOST:PORT (unix:/a/b shows as unix:_a_b)
    conn              live connection table (every worker's dispatching + handed-off flows)
    status            one line per back end, workers, flows
    metrics           the Prometheus text (also on `metrics = [ADDR:]PORT` when set)
    settings          the value of every option in force (what a reload applied), arbiter and workers

Here are the knobs (what a write does), the reads (connection table, metrics), the status document
(tcpha.fe.status: the `status` file's JSON and the status page, with a sampler of the workers'
counters once a second for its rates and chart), the settings in force, and the tree that names them.

`ControlFiles` is one of the parts FrontEndRuntime (tcpha.fe.runtime) is composed of.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tcpha.config.settings import in_force_form, settings_for
from tcpha.fe.health import HealthProber, HealthTable
from tcpha.fe.orphans import KernelFlows, OrphanTable
from tcpha.fe.status import StatusHistory, build_status, sample_of
from tcpha.fe.workerlinks import WorkerLink
from tcpha.loglevels import NOTICE, dbglevel_to_logging
from tcpha.metrics import WorkerMetrics, exposition
from tcpha.runtime.plane import ControlPlane
from tcpha.runtime.tree import ControlFile, ControlTree, WriteRefused, bool_setter, float_setter, int_setter
from tcpha.steering import FlowKey

if TYPE_CHECKING:
    from tcpha.fe.arbiter import FrontEnd     # for types only: the arbiter imports the runtime

log = logging.getLogger("tcpha.fe.runtime")


def file_name(backend: str) -> str:
    return backend.replace("/", "_")


class ControlFiles:
    """The control tree, its knobs and its reads. Uses the runtime's front end (tcpha.fe.arbiter), its
    config, health table and prober, plane, worker links, registry and metrics endpoint."""

    fe: FrontEnd
    config: Any
    health: HealthTable
    prober: HealthProber | None
    plane: ControlPlane
    registry: Any                       # tcpha.fe.registry.RegistrationListener, or None
    metrics_server: Any                 # tcpha.fe.status.StatusHttpServer, or None
    links: dict[int, WorkerLink]
    retired: list[dict[str, Any]]
    dbglevel: int
    dtcinterval: float
    started: float
    ask_all: Callable[..., Awaitable[list[dict]]]      # tcpha.fe.workerlinks.WorkerLinks
    push_gate: Callable[[], None]

    def __init__(self) -> None:
        fe = self.fe
        self.history = StatusHistory()
        self._sampler: asyncio.Task | None = None
        self._steering_size: tuple[float, int | None] = (0.0, None)
        self.orphans = OrphanTable()
        self.kernel_flows = KernelFlows(
            lambda: fe.make_steering() if fe.steering is not None else None)
        self.tree = ControlTree()
        self._build_tree()

    # -- knobs -----------------------------------------------------------------------------------
    def set_dbglevel(self, level: int) -> None:
        self.dbglevel = level
        logging.getLogger().setLevel(dbglevel_to_logging(level))
        log.log(NOTICE, "dbglevel set to %d", level)
        self.plane.run(self.ask_all("dbglevel", level=level))

    def set_dtcinterval(self, seconds: float) -> None:
        self.dtcinterval = seconds
        if seconds > 0 and self.config.healthtimeout > seconds and self.prober is not None:
            self.prober.timeout = seconds
        if self.prober is not None:
            self.plane.call_soon(self.prober.set_interval, seconds)
        log.log(NOTICE, "dtcinterval set to %g s%s", seconds, " (health checks off)" if seconds == 0 else "")

    def set_damping(self, rise: int | None = None, fall: int | None = None) -> None:
        self.health.set_damping(rise or self.health.rise, fall or self.health.fall)

    def set_weight(self, name: str, weight: int) -> None:
        be = self.health.get(name)
        if be is None:
            raise WriteRefused(f"no back end {name}")
        be.set_weight(weight)
        log.log(NOTICE, "back end %s: weight %d%s", name, weight, " (draining)" if weight == 0 else "")
        self.push_gate()

    def set_drain(self, name: str, drain: bool) -> None:
        be = self.health.get(name)
        if be is None:
            raise WriteRefused(f"no back end {name}")
        be.drain = drain
        log.log(NOTICE, "back end %s: %s", name, "draining: no new connections" if drain else "drain off")
        self.push_gate()

    def unload(self, value: bool) -> None:
        if value:
            log.log(NOTICE, "unload requested through the control directory")
            os.kill(os.getpid(), signal.SIGTERM)

    # -- reads -----------------------------------------------------------------------------------
    async def conn_rows_async(self) -> list[dict]:
        # The kernel's map first, then the workers: a flow forwarded in between is claimed by its worker
        # (tcpha.fe.orphans). Flows no live worker claims (its worker died, a predecessor's) are listed too.
        kernel = await asyncio.get_running_loop().run_in_executor(None, self.kernel_flows.forwarded)
        rows: list[dict] = []
        macs: dict[str, str] = {}
        for r in await self.ask_all("conn"):
            rows.extend(r.get("rows", []))
            macs.update(r.get("macs", {}))
        self.orphans.learn(rows, macs)
        if kernel is not None:
            orphaned = self.orphans.rows(rows, kernel, vip=self.config.vaddr)
            if orphaned:
                # A flow that ended while the workers were asked is in the first read but in no
                # worker's answer: only entries still in the map after the answers are orphans.
                again = await asyncio.get_running_loop().run_in_executor(None, self.kernel_flows.forwarded)
                still = {(f"{k.client_ip}:{k.client_port}", k.vport) for k in (again or {})}
                orphaned = [r for r in orphaned if (r["client"], r["vport"]) in still]
            rows.extend(orphaned)
        return rows

    def flow_closed(self, msg: Any) -> None:
        """FlowClosed on the health prober's control connection (a back end whose flow's worker is gone
        sends it on any connection it has to us): remove the steering entry, as a worker would."""
        flow = FlowKey(msg.client_ip, msg.client_port, msg.vip, msg.vport)
        asyncio.get_running_loop().run_in_executor(None, self.kernel_flows.unforward, flow, msg.xid)

    def conn_rows(self) -> list[dict]:
        return self.plane.run(self.conn_rows_async())

    def conn_text(self) -> str:
        rows = self.conn_rows()
        head = f"{'client':<22} {'port':>5} {'backend':<22} {'state':<12} {'age':>9} {'bytes_in':>10} {'bytes_out':>10} {'moves':>5} rule"
        lines = [head]
        for r in sorted(rows, key=lambda r: -(r["age"] if r["age"] is not None else -1)):
            age = "-" if r["age"] is None else f"{r['age']:.3f}"
            lines.append(f"{r['client']:<22} {r['vport']:>5} {r['backend']:<22} {r['state']:<12} "
                         f"{age:>9} {_num(r['bytes_in']):>10} {_num(r['bytes_out']):>10} {r.get('moves') or 0:>5} "
                         f"{r['rule']}")
        return "\n".join(lines)

    async def metrics_text_async(self) -> str:
        parts = await self.ask_all("metrics")
        merged = WorkerMetrics.merge([p.get("metrics", {}) for p in parts] + self.retired)
        flows = sum(int(p.get("flows", 0)) for p in parts)
        dispatching = sum(int(p.get("dispatching", 0)) for p in parts)
        return exposition(merged, health=self.health.snapshot(), active_flows=flows, dispatching=dispatching,
                          workers=len(self.links))

    # -- the status document (tcpha.fe.status) ---------------------------------------------------
    async def worker_details(self) -> list[dict]:
        """Every live worker's counters with the status page's detail, its pid added."""
        links = list(self.links.values())
        results = await asyncio.gather(*(link.ask("metrics", detail=True) for link in links),
                                       return_exceptions=True)
        out = []
        for link, r in zip(links, results):
            if isinstance(r, BaseException):
                log.debug("worker %d: metrics: %s", link.pid, r)
                continue
            link.last_metrics = r.get("metrics", {})
            out.append({**r, "pid": link.pid})
        return out

    async def _sample_loop(self) -> None:
        failing = False
        while True:
            try:
                parts = await self.ask_all("metrics")     # counters only: no per-flow work in the workers
                merged = WorkerMetrics.merge([p.get("metrics", {}) for p in parts] + self.retired)
                self.history.add(sample_of(merged, time.time()))
                failing = False
            except Exception:                     # never let the sampler die; say why once, not each second
                if not failing:
                    log.exception("status page sampler failed (rates and chart not updated)")
                failing = True
            await asyncio.sleep(1.0)

    async def steering_entries(self) -> int | None:
        """The steering map's size, read from the kernel at most every 5 s (a dump costs ~1 s per 100k)."""
        t, size = self._steering_size
        if time.monotonic() - t >= 5.0:
            flows = await asyncio.get_running_loop().run_in_executor(None, self.kernel_flows.forwarded)
            size = None if flows is None else len(flows)
            self._steering_size = (time.monotonic(), size)
        return size

    def rule_list(self) -> list[dict[str, str]]:
        rules = [{"target": r.target, "field": r.field, "pattern": r.pattern} for r in self.config.rules]
        for name, info in (self.registry.backends.items() if self.registry else []):
            rules += [{"target": name, "field": f, "pattern": p} for f, p in info.get("rules", [])]
        return rules

    async def status_document_async(self) -> dict:
        workers = await self.worker_details()
        try:
            steering = await self.steering_entries()
        except Exception as e:
            log.debug("steering map size: %s", e)
            steering = None
        return build_status(pid=os.getpid(), started=self.started, config=self.config,
                            health=self.health.snapshot(), workers=workers, history=self.history,
                            rules=self.rule_list(), steering_entries=steering, dtcinterval=self.dtcinterval,
                            dbglevel=self.dbglevel)

    def page_admin(self, backend: str, action: str, peer: str) -> None:
        """A write from the status page (statsadmin = on), already authenticated."""
        self.set_drain(backend, action == "drain")

    def settings_in_force(self) -> dict[str, Any]:
        """Every option's value in force in the arbiter, in tcpha.config.settings.in_force_form: read from
        the objects that use it where there is one (health table, prober, listeners, control plane,
        metrics endpoint); else from the running config, which the arbiter reads at use (pool limits,
        grace) and in which a reload keeps the running value of a restart-only option."""
        c = self.fe.config
        values = {s.name: getattr(c, s.attr) for s in settings_for("fe")}
        values.update({"rise": self.health.rise, "fall": self.health.fall, "dbglevel": self.dbglevel,
                       "dtcinterval": self.dtcinterval, "rundir": self.plane.rundir, "usefuse": self.plane.use_fuse,
                       "server": [name for name, be in self.health.backends.items() if not be.dynamic],
                       "port": [port for _, port in self.fe.listeners] or values["port"]})
        if self.prober is not None:
            p = self.prober
            values.update({"dtcinterval": p.interval, "healthtimeout": p.timeout, "healthcheck": p.kind,
                           "healthpath": p.path, "healthport": p.app_port, "authkey": p.key})
        if self.metrics_server is not None:
            values["metrics"] = self.metrics_server.addr
        table = {s.name: s for s in settings_for("fe")}
        return {name: in_force_form(table[name], value) for name, value in values.items()}

    def settings_data(self) -> dict[str, Any]:
        async def workers() -> list[dict]:
            links = list(self.links.values())
            answers = await asyncio.gather(*(l.ask("settings") for l in links), return_exceptions=True)
            return [{"pid": l.pid, "settings": a.get("settings", {})} for l, a in zip(links, answers)
                    if not isinstance(a, BaseException)]
        return {"arbiter": self.settings_in_force(), "workers": self.plane.run(workers())}

    def settings_text(self) -> str:
        data = self.settings_data()
        lines = []
        for name, value in data["arbiter"].items():
            per_worker = {json.dumps(w["settings"][name]) for w in data["workers"] if name in w["settings"]}
            differs = per_worker - {json.dumps(value)}
            lines.append(f"{name} = {json.dumps(value)}" + (f"   (workers: {', '.join(sorted(differs))})"
                                                            if differs else ""))
        return "\n".join(lines)

    def status_text(self) -> str:
        lines = [f"tcpha-fe pid {os.getpid()} up {time.time() - self.started:.0f} s, {len(self.links)} workers, "
                 f"dtcinterval {self.dtcinterval:g} s, dbglevel {self.dbglevel}"]
        for h in self.health.snapshot():
            extra = f" ({h['last_error']})" if h["last_error"] else ""
            lines.append(f"{h['name']:<28} {h['status']:<6} weight {h['weight']:<3} "
                         f"{'dynamic' if h['dynamic'] else 'static ':<7} checks {h['checks']} failed "
                         f"{h['failures']}{extra}")
        return "\n".join(lines)

    # -- the tree --------------------------------------------------------------------------------
    def _build_tree(self) -> None:
        t = self.tree
        t.add(ControlFile("sys/unload", lambda: "0", bool_setter(self.unload, "unload"),
                          "write 1 to stop the front end cleanly"))
        t.add(ControlFile("sys/dbglevel", lambda: str(self.dbglevel),
                          int_setter(self.set_dbglevel, 0, 6, "dbglevel"), "log level 0-6",
                          data=lambda: self.dbglevel))
        t.add(ControlFile("sys/dtcinterval", lambda: f"{self.dtcinterval:g}",
                          float_setter(self.set_dtcinterval, 0, 3600, "dtcinterval"),
                          "seconds between health checks; 0 = off", data=lambda: self.dtcinterval))
        t.add(ControlFile("sys/rise", lambda: str(self.health.rise),
                          int_setter(lambda v: self.set_damping(rise=v), 1, 100, "rise"),
                          "good checks in a row to put a back end back", data=lambda: self.health.rise))
        t.add(ControlFile("sys/fall", lambda: str(self.health.fall),
                          int_setter(lambda v: self.set_damping(fall=v), 1, 100, "fall"),
                          "failed checks in a row to take a back end out", data=lambda: self.health.fall))
        t.add(ControlFile("conn", self.conn_text, None, "live connection table", data=self.conn_rows))
        t.add(ControlFile("status", self.status_text, None, "back ends and workers",
                          data=lambda: self.plane.run(self.status_document_async())))
        t.add(ControlFile("metrics", lambda: self.plane.run(self.metrics_text_async()), None,
                          "Prometheus text exposition"))
        t.add(ControlFile("settings", self.settings_text, None, "options in force (arbiter and workers)",
                          data=self.settings_data))
        for name in list(self.health.backends):
            self.add_backend_files(name)

    def add_backend_files(self, name: str) -> None:
        d = f"backends/{file_name(name)}"
        t = self.tree

        def health() -> Any:
            be = self.health.get(name)
            if be is None:
                raise FileNotFoundError(name)
            return be

        t.add(ControlFile(f"{d}/status", lambda: health().status + (f" {health().last_error}" if health().last_error else ""),
                          None, "up, down or drain", data=lambda: health().snapshot()))
        t.add(ControlFile(f"{d}/weight", lambda: str(health().weight),
                          int_setter(lambda v: self.set_weight(name, v), 0, 256, f"{name} weight"),
                          "0-256; 0 stops new connections", data=lambda: health().weight))
        t.add(ControlFile(f"{d}/drain", lambda: "1" if health().drain else "0",
                          bool_setter(lambda v: self.set_drain(name, v), f"{name} drain"),
                          "1: no new connections, handed-off flows continue", data=lambda: health().drain))

    def remove_backend_files(self, name: str) -> None:
        self.tree.remove_prefix(f"backends/{file_name(name)}")


def _num(v: Any) -> str:
    return "-" if v is None else str(v)
