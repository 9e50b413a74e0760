"""The back end's control directory (RUNDIR, default /run/tcpha/be), and the SIGHUP reloader it starts.

    sys/unload     write 1: stop like SIGTERM
    sys/dbglevel   0-6
    conn           the connections relayed now: client, application, state, age, bytes each way
    status         pid, registration state, counters
    settings       the value of every option in force (what a reload applied)

Served by tcpha.runtime.plane (FUSE, else plain files) in a thread; reads of the back end's own
objects are made in its event loop (``run_coroutine_threadsafe``), never from the plane's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

from tcpha.be.reload import BackEndReloader
from tcpha.config.settings import in_force_form, settings_for
from tcpha.loglevels import NOTICE, dbglevel_to_logging
from tcpha.runtime.plane import ControlPlane
from tcpha.runtime.tree import ControlFile, ControlTree, bool_setter, int_setter

__all__ = ["BackEndRuntime", "start_be_runtime"]

log = logging.getLogger("tcpha.be.runtime")


class BackEndRuntime:
    def __init__(self, be: Any):
        self.be = be
        self.dbglevel = be.config.dbglevel
        self.started = time.time()
        self.tree = ControlTree()
        t = self.tree
        t.add(ControlFile("sys/unload", lambda: "0", bool_setter(self.unload, "unload"), "write 1 to stop"))
        t.add(ControlFile("sys/dbglevel", lambda: str(self.dbglevel),
                          int_setter(self.set_dbglevel, 0, 6, "dbglevel"), "log level 0-6", data=lambda: self.dbglevel))
        t.add(ControlFile("conn", self.conn_text, None, "connections relayed now", data=self.conn_rows))
        t.add(ControlFile("status", self.status_text, None, "state and counters", data=self.status_data))
        t.add(ControlFile("settings", self.settings_text, None, "options in force", data=self.settings_in_force))
        self.plane = ControlPlane(rundir=be.config.rundir, tree=t, name="tcpha-be",
                                  use_fuse=be.config.usefuse)

    def start(self) -> None:
        self.plane.start()

    def stop(self) -> None:
        self.plane.stop()

    def _in_loop(self, fn: Any) -> Any:
        """fn() run in the back end's event loop. Called from that loop itself (the plain-file mirror's
        first refresh runs inside `serve`, when the plane starts), it runs at once: waiting for the
        loop from its own thread would block it until the timeout."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self.be.loop:
            return fn()

        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.be.loop).result(5)

    def set_dbglevel(self, level: int) -> None:
        self.dbglevel = level
        logging.getLogger().setLevel(dbglevel_to_logging(level))
        log.log(NOTICE, "dbglevel set to %d", level)

    def unload(self, value: bool) -> None:
        if value:
            log.log(NOTICE, "unload requested through the control directory")
            os.kill(os.getpid(), signal.SIGTERM)

    def conn_rows(self) -> list[dict]:
        def rows() -> list[dict]:
            now = time.monotonic()
            out = []
            for r in list(self.be.relays):
                try:
                    app = r.app.getpeername()
                    app_text = f"{app[0]}:{app[1]}"
                except (OSError, AttributeError):
                    app_text = "-"
                out.append({"client": r.describe() if hasattr(r, "describe") else "?", "app": app_text,
                            "state": "closing" if getattr(r, "closed", False) else "relaying",
                            "age": round(now - getattr(r, "started", now), 3),
                            "bytes_in": getattr(r, "bytes_up", None), "bytes_out": getattr(r, "bytes_down", None)})
            return out
        return self._in_loop(rows)

    def conn_text(self) -> str:
        lines = [f"{'client':<22} {'app':<22} {'state':<9} {'age':>9} {'bytes_in':>10} {'bytes_out':>10}"]
        for r in sorted(self.conn_rows(), key=lambda r: -r["age"]):
            lines.append(f"{r['client']:<22} {r['app']:<22} {r['state']:<9} {r['age']:>9.3f} "
                         f"{r['bytes_in'] if r['bytes_in'] is not None else '-':>10} "
                         f"{r['bytes_out'] if r['bytes_out'] is not None else '-':>10}")
        return "\n".join(lines)

    def status_data(self) -> dict:
        s = self.be.stats
        reg = None
        registrar = self.be.registrar
        if registrar is not None:
            reg = {"frontend": registrar.fe_name, "registered": registrar.registered}
        return {"pid": os.getpid(), "uptime": round(time.time() - self.started, 1), "handoffs": s.handoffs,
                "refused": s.refused, "fdpassed": s.fdpassed, "control_errors": s.control_errors,
                "active": s.active, "registration": reg, "appsource": self.be.appsource.mode,
                "appsource_fallbacks": self.be.appsource.fallbacks,
                "tls": dataclasses.asdict(self.be.tls.stats) if self.be.tls is not None else None}

    def settings_in_force(self) -> dict[str, Any]:
        """Every option's value in force, in tcpha.config.settings.in_force_form: read from the objects that
        use it where there is one (the listening socket, the application address, the registrar, the TLS
        termination, the control plane, the metrics endpoint); else from the running config, which the back
        end reads at use (grace, sessiontimeout) and in which a reload keeps a restart-only option's value."""

        def read() -> dict[str, Any]:
            be = self.be
            c = be.config
            values = {s.name: getattr(c, s.attr) for s in settings_for("be")}
            values.update({"maxclients": be.maxclients, "authkey": be.authkey, "vaddr": be.vip,
                           "unixpath": be.unix_path, "dbglevel": self.dbglevel, "rundir": self.plane.rundir,
                           "usefuse": self.plane.use_fuse,
                           # the application address as used (0.0.0.0 means this host: 127.0.0.1)
                           "redirectaddr": be.app_addr[0], "redirectport": be.app_addr[1],
                           "metrics": be.metrics_server.addr if be.metrics_server is not None else None,
                           "tlsports": sorted(be.tls.ports) if getattr(be.tls, "ports", None) else values["tlsports"]})
            server = getattr(be, "_server", None)
            if server is not None and server.sockets:
                values["raddr"], values["port"] = server.sockets[0].getsockname()[:2]
            registrar = be.registrar
            values["dregister"] = registrar is not None
            if registrar is not None:
                values["feaddr"], _, feport = registrar.fe_name.rpartition(":")
                values["feport"] = int(feport)
                values["rule"] = [_RegisteredRule(f, p) for f, p in registrar.rules]
                values["registerretry"] = registrar.config.registerretry
            table = {s.name: s for s in settings_for("be")}
            return {name: in_force_form(table[name], value) for name, value in values.items()}
        return self._in_loop(read)

    def settings_text(self) -> str:
        return "\n".join(f"{name} = {json.dumps(value)}" for name, value in self.settings_in_force().items())

    def status_text(self) -> str:
        d = self.status_data()
        reg = d["registration"]
        regtext = "off" if reg is None else f"{'registered with' if reg['registered'] else 'registering with'} {reg['frontend']}"
        text = (f"tcpha-be pid {d['pid']} up {d['uptime']:.0f} s; {d['active']} connections; {d['handoffs']} handoffs, "
                f"{d['refused']} refused, {d['fdpassed']} passed, {d['control_errors']} control errors; dregister {regtext}")
        tls = d["tls"]
        if tls is not None:
            text += (f"; TLS {tls['handshakes']} handshakes, {tls['resumed']} resumed, {tls['failed']} failed, "
                     f"{tls['store_waits']} waited for the session cache ({tls['store_unconfirmed']} unconfirmed)")
        return text


class _RegisteredRule:
    """A rule as the registrar sends it (field, pattern), shaped for in_force_form."""

    def __init__(self, field: str, pattern: str):
        self.field, self.pattern = field, pattern


def start_be_runtime(be: Any) -> BackEndRuntime | None:
    """The SIGHUP reloader and the control directory; control-directory problems are logged, never fatal."""
    try:   # SIGHUP: re-read the file and apply what can change live (tcpha.be.reload)
        be.reloader = BackEndReloader(be)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, be.reloader.on_sighup)
    except (RuntimeError, ValueError):
        pass
    rt = BackEndRuntime(be)
    try:
        rt.start()
    except Exception as e:
        log.error("control directory %s not available: %s (running without control files)", be.config.rundir, e)
        rt = None  # type: ignore[assignment]
    return rt
