"""The front end's run-time state and control surface, living in the arbiter (tcpha.runtime.plane):

* the health table and prober (tcpha.fe.health) and the operator's weights and drains; every change
  is pushed to the workers as a *gate* (back end -> may take new connections);
* the control files (RUNDIR, default /run/tcpha/fe):

      sys/unload        write 1: stop like SIGTERM (stop accepting, finish, wait for flows / grace)
      sys/dbglevel      0-6, applied to the arbiter and every worker at once
      sys/dtcinterval   seconds between health checks, 0 = off; a new value applies within 1 s
      sys/rise sys/fall health damping
      backends/NAME/{status,weight,drain}   NAME is HOST:PORT (unix:/a/b shows as unix:_a_b)
      conn              live connection table (every worker's dispatching + handed-off flows)
      status            one line per back end, workers, flows
      metrics           the Prometheus text (also on `metrics = [ADDR:]PORT` when set)
      settings          the value of every option in force (what a reload applied), arbiter and workers

* the runtime links to the workers (tcpha.fe.agent), the registration listener for dregister back
  ends (tcpha.fe.registry), and the HTTP endpoint on `metrics = [ADDR:]PORT`: Prometheus text and the
  status page (tcpha.fe.status), whose document is also the `status` file's JSON; a sampler takes the
  workers' counters once a second for its rates and chart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from tcpha.fe.health import CheckTarget, HealthProber, HealthTable
from tcpha.runtime.plane import ControlPlane
from tcpha.runtime.tree import ControlFile, ControlTree, WriteRefused, bool_setter, float_setter, int_setter
from tcpha.loglevels import NOTICE

log = logging.getLogger("tcpha.fe.runtime")
HANDOVER_WAIT = 5.0     # seconds a handed-over front end waits for its successor's control socket


def file_name(backend: str) -> str:
    return backend.replace("/", "_")


class WorkerLink:
    """The control plane's end of one worker's runtime link (asyncio, in the plane's loop)."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()
        self.next_id = 0
        self.last_metrics: dict[str, Any] = {}
        self.alive = True

    async def open(self) -> None:
        self.sock.setblocking(False)
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=16 * 1024 * 1024)

    async def ask(self, op: str, timeout: float = 2.0, **kw: Any) -> dict:
        if not self.alive or self.writer is None or self.reader is None:
            raise ConnectionError(f"worker {self.pid}: link closed")
        async with self.lock:
            self.next_id += 1
            rid = self.next_id
            self.writer.write(json.dumps({"id": rid, "op": op, **kw}).encode() + b"\n")
            try:
                await self.writer.drain()
                while True:
                    line = await asyncio.wait_for(self.reader.readline(), timeout)
                    if not line:
                        raise ConnectionError(f"worker {self.pid}: link closed")
                    reply = json.loads(line)
                    if reply.get("id") == rid:
                        return reply
            except (ConnectionError, OSError):
                self.alive = False
                raise

    def close(self) -> None:
        self.alive = False
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()


class FrontEndRuntime:
    def __init__(self, fe: Any):
        self.fe = fe
        self.config = config = fe.config
        self.health = HealthTable(config.rise, config.fall)
        for spec in config.servers:
            self.health.add(spec.name, spec.weight)
        self.dbglevel = config.dbglevel
        self.dtcinterval = config.dtcinterval
        self.links: dict[int, WorkerLink] = {}
        self.retired: list[dict[str, Any]] = []
        self.prober: HealthProber | None = None
        self.registry: Any = None
        self.metrics_server: Any = None
        self.started = time.time()
        from tcpha.fe.status import StatusHistory
        self.history = StatusHistory()
        self._sampler: asyncio.Task | None = None
        self._steering_size: tuple[float, int | None] = (0.0, None)
        from tcpha.fe.orphans import KernelFlows, OrphanTable
        self.orphans = OrphanTable()
        self.kernel_flows = KernelFlows(
            lambda: fe.make_steering() if getattr(fe, "steering", None) is not None else None)
        self.tree = ControlTree()
        self._build_tree()
        self.plane = ControlPlane(rundir=config.rundir, tree=self.tree, name="tcpha-fe",
                                  use_fuse=config.usefuse,
                                  extra_ops={"takeover": self._op_takeover,
                                             "control_socket_taken": self._op_control_socket_taken})
        # A seamless upgrade: set when the successor's control socket has replaced ours (stop waits
        # for it, so that there is never a moment without one).
        self.control_socket_taken = threading.Event()
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
        if getattr(self.fe, "handed_over", False) and not self.control_socket_taken.wait(HANDOVER_WAIT):
            log.warning("upgrade: the new tcpha-fe did not confirm it took over the control socket within %g s",
                        HANDOVER_WAIT)
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
            from tcpha.fe.status import StatusHttpServer
            self.metrics_server = StatusHttpServer(
                tuple(c.metrics), metrics=self.metrics_text_async, status=self.status_document_async,
                admin=self.page_admin,       # statsadmin is read at each request: a reload turns it on/off
                key=lambda: self.config.authkey if getattr(self.config, "statsadmin", False) else None)
            try:
                await self.metrics_server.start()
            except OSError as e:
                log.error("metrics endpoint %s:%d: %s", c.metrics[0], c.metrics[1], e.strerror or e)
                self.metrics_server = None
        if c.raddr != "0.0.0.0" and c.registerport:
            from tcpha.fe.registry import RegistrationListener
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
            self.prober.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.registry is not None:
            await self.registry.close()
        for link in self.links.values():
            link.close()
        self.kernel_flows.close()

    # -- workers ---------------------------------------------------------------------------------
    @staticmethod
    def worker_socketpair() -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def attach_worker(self, pid: int, sock: socket.socket) -> None:
        self.plane.call_soon(lambda: asyncio.ensure_future(self._attach(pid, sock)))

    async def _attach(self, pid: int, sock: socket.socket) -> None:
        link = WorkerLink(pid, sock)
        await link.open()
        self.links[pid] = link
        try:
            await link.ask("gate", gate=self.health.available(), weights=self.health.weights())
            await link.ask("dbglevel", level=self.dbglevel)
            for name, info in (self.registry.backends.items() if self.registry else []):
                await link.ask("add_backend", **info)
        except (ConnectionError, OSError, asyncio.TimeoutError) as e:
            log.warning("worker %d: runtime link: %s", pid, e)

    def detach_worker(self, pid: int) -> None:
        self.plane.call_soon(self._detach, pid)

    def _detach(self, pid: int) -> None:
        link = self.links.pop(pid, None)
        if link is not None:
            if link.last_metrics:
                self.retired.append(link.last_metrics)
            link.close()

    async def ask_all(self, op: str, **kw: Any) -> list[dict]:
        links = list(self.links.values())
        results = await asyncio.gather(*(link.ask(op, **kw) for link in links), return_exceptions=True)
        out = []
        for link, r in zip(links, results):
            if isinstance(r, BaseException):
                log.debug("worker %d: %s: %s", link.pid, op, r)
                continue
            if op == "metrics":
                link.last_metrics = r.get("metrics", {})
            out.append(r)
        return out

    def push_gate(self) -> None:
        """Tell every worker which back ends may take new connections (from any thread)."""
        async def push() -> None:
            await self.ask_all("gate", gate=self.health.available(), weights=self.health.weights())
        self.plane.call_soon(lambda: asyncio.ensure_future(push()))

    # -- knobs -----------------------------------------------------------------------------------
    def set_dbglevel(self, level: int) -> None:
        from tcpha.config import dbglevel_to_logging
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
        from tcpha.steering import FlowKey
        flow = FlowKey(msg.client_ip, msg.client_port, msg.vip, msg.vport)
        asyncio.get_running_loop().run_in_executor(None, self.kernel_flows.unforward, flow, msg.xid)

    def conn_rows(self) -> list[dict]:
        return self.plane.run(self.conn_rows_async())

    def conn_text(self) -> str:
        rows = self.conn_rows()
        head = f"{'client':<22} {'port':>5} {'backend':<22} {'state':<12} {'age':>9} {'bytes_in':>10} {'bytes_out':>10} rule"
        lines = [head]
        for r in sorted(rows, key=lambda r: -(r["age"] if r["age"] is not None else -1)):
            age = "-" if r["age"] is None else f"{r['age']:.3f}"
            lines.append(f"{r['client']:<22} {r['vport']:>5} {r['backend']:<22} {r['state']:<12} "
                         f"{age:>9} {_num(r['bytes_in']):>10} {_num(r['bytes_out']):>10} {r['rule']}")
        return "\n".join(lines)

    async def metrics_text_async(self) -> str:
        from tcpha.metrics import WorkerMetrics, exposition
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
        from tcpha.fe.status import sample_of
        from tcpha.metrics import WorkerMetrics
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
        from tcpha.fe.status import build_status
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
        from tcpha.config.settings import in_force_form, settings_for
        c = self.fe.config
        values = {s.name: getattr(c, s.attr) for s in settings_for("fe")}
        values.update({"rise": self.health.rise, "fall": self.health.fall, "dbglevel": self.dbglevel,
                       "dtcinterval": self.dtcinterval, "rundir": self.plane.rundir, "usefuse": self.plane.use_fuse,
                       "server": [name for name, be in self.health.backends.items() if not be.dynamic],
                       "port": [port for _, port in getattr(self.fe, "listeners", [])] or values["port"]})
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

    # -- reload (SIGHUP) -------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the config file and apply it to the running front end (from any thread)."""
        self.plane.call_soon(lambda: asyncio.ensure_future(self._reload()))

    async def _reload(self) -> None:
        from tcpha.config import ConfigError, load_fe_config
        from tcpha.config.settings import reload_plan
        notify = getattr(self.fe, "notify", lambda state: None)
        notify("RELOADING=1")
        try:
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load_fe_config, self.config.path)
            except ConfigError as e:
                log.error("reload refused, configuration unchanged: %s", e)
                return
            for line in new.warnings:
                log.warning("%s", line)
            # What each changed option does is declared once, in the settings table (reload = LIVE|RESTART).
            live, restart = reload_plan("fe", self.config, new)
            if not live and not restart:
                log.log(NOTICE, "reload: configuration unchanged")
                return
            if restart:
                log.warning("reload: %s changed; applied at the next restart (or upgrade)",
                            ", ".join(s.name for s in restart))
            changed = {s.attr for s in live}
            # Back ends: new servers in, removed ones out, weights as written.
            old_names = {s.name for s in self.config.servers}
            new_names = {s.name for s in new.servers}
            for spec in new.servers:
                be = self.health.add(spec.name, spec.weight)
                if spec.name not in old_names:
                    self.add_backend_files(spec.name)
                    if self.prober is not None:
                        self.prober.add(CheckTarget(spec.name, spec.kind, spec.host, spec.port, spec.path))
                be.dynamic = False
            for name in old_names - new_names:
                self.health.remove(name)
                self.remove_backend_files(name)
                if self.prober is not None:
                    self.prober.remove(name)
            self.health.set_damping(new.rise, new.fall)
            if "dtcinterval" in changed:
                self.set_dtcinterval(new.dtcinterval)
            if self.prober is not None:
                self.prober.timeout = new.healthtimeout
                self.prober.kind, self.prober.path = new.healthcheck, new.healthpath
                self.prober.app_port = new.healthport
                # New probe connections use the new key (established ones are already authenticated).
                self.prober.key = new.authkey
            keep = [s.attr for s in restart]
            for k in keep:
                setattr(new, k, getattr(self.config, k))
            self.config = new
            self.fe.config = new                         # the registration port reads the key from here
            await self.ask_all("reload", path=new.path, keep=keep)
            await self.ask_all("gate", gate=self.health.available(), weights=self.health.weights())
            if "dbglevel" in changed:
                from tcpha.config import dbglevel_to_logging
                self.dbglevel = new.dbglevel
                logging.getLogger().setLevel(dbglevel_to_logging(self.dbglevel))
                await self.ask_all("dbglevel", level=self.dbglevel)
            if live:
                log.log(NOTICE, "reloaded %s: %s", new.path, ", ".join(s.name for s in live))
        except Exception:
            log.exception("reload failed")
        finally:
            notify("READY=1")

    # -- worker pool -----------------------------------------------------------------------------
    def busy_per_worker(self) -> dict[int, int]:
        """pid -> connections being dispatched (for the arbiter's spare-worker policy)."""
        async def ask() -> dict[int, int]:
            links = list(self.links.values())
            res = await asyncio.gather(*(l.ask("metrics", timeout=1.0) for l in links), return_exceptions=True)
            out = {}
            for l, r in zip(links, res):
                if not isinstance(r, BaseException):
                    l.last_metrics = r.get("metrics", {})
                    out[l.pid] = int(r.get("inflight", 0))
            return out
        return self.plane.run(ask(), timeout=3.0)

    def stop_worker(self, pid: int) -> bool:
        """Stop a surplus worker: finish what it dispatches, no wait for handed-off flows. False if its
        link does not answer (the caller then signals it)."""
        link = self.links.get(pid)
        if link is None:
            return False
        try:
            self.plane.run(link.ask("stop", wait_flows=False), timeout=3.0)
            return True
        except Exception:
            return False

    # -- upgrade ---------------------------------------------------------------------------------
    async def _op_takeover(self, request: dict, writer: Any) -> dict:
        """A new tcpha-fe asks for our listening sockets (seamless upgrade): they travel over the
        control socket with SCM_RIGHTS; then we stop like on unload, leaving the kernel state to it."""
        from tcpha import fdpass
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


def _num(v: Any) -> str:
    return "-" if v is None else str(v)


def start_runtime(fe: Any, *, wait_free: float = 0.0, predecessor: Any = None) -> FrontEndRuntime | None:
    """The front end's runtime, started; None (and one error line) when the control directory cannot
    be served: the front end keeps serving clients without it."""
    try:
        rt = FrontEndRuntime(fe)
        rt.start(wait_free=wait_free, predecessor=predecessor)
        return rt
    except Exception as e:
        log.error("control directory %s not available: %s (running without control files, health checks "
                  "and metrics)", getattr(fe.config, "rundir", "?"), e)
        return None
