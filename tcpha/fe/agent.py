"""The worker's end of its runtime link to the control plane (a socketpair made before the fork).

Newline-delimited JSON, one request at a time from the control plane, one reply each:

    {"id": N, "op": "gate", "gate": {backend: accepts_new}, "weights": {backend: weight}}
                                                                 health / weight / drain, as decided
    {"id": N, "op": "dbglevel", "level": 0-6}                   log level of this process
    {"id": N, "op": "conn"}      -> {"id": N, "rows": [...], "macs": {mac: backend}}  its connections
    {"id": N, "op": "metrics"}   -> {"id": N, "metrics": {...}, "dispatching": n, "flows": n}
        with "detail": true also "accepted", "flows_by_backend" and "answers" (the status page)
    {"id": N, "op": "stop"}                                      stop accepting, finish, exit
    {"id": N, "op": "add_backend", "name", "host", "port", "rules": [[field, pattern], ...]}
    {"id": N, "op": "remove_backend", "name"}                    dynamic registration
    {"id": N, "op": "settings"}  -> {"id": N, "settings": {name: value}}   the values this worker uses

Runs in the worker's event loop (callbacks only); the control plane never touches worker objects.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING, Any

from tcpha.config import compile_rule, load_fe_config
from tcpha.config.settings import in_force_form, settings_for
from tcpha.fe.backends import RemoteBackend, build_backends
from tcpha.loglevels import DBGLEVELS, dbglevel_to_logging

if TYPE_CHECKING:  # pragma: no cover
    from tcpha.fe.worker import Worker

log = logging.getLogger("tcpha.fe.agent")


class WorkerAgent:
    def __init__(self, worker: "Worker", sock: socket.socket):
        self.worker = worker
        self.sock = sock
        self.buf = b""
        self.closed = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self.worker.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.worker.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The control plane went away (the arbiter died): keep serving; nothing to answer.
            self.close()
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                req = json.loads(line)
                reply = self.handle(req)
            except Exception as e:                      # never crash the worker
                log.exception("runtime request failed")
                reply = {"error": str(e)}
                req = {}
            reply["id"] = req.get("id") if isinstance(req, dict) else None
            out = json.dumps(reply).encode() + b"\n"
            self.worker.loop.create_task(self.worker.loop.sock_sendall(self.sock, out))

    def handle(self, req: dict) -> dict:
        w = self.worker
        ledger = w.ledger
        op = req.get("op")
        if op == "gate":
            ledger.gate = {str(k): bool(v) for k, v in req.get("gate", {}).items()}
            if "weights" in req:
                ledger.weights = {str(k): int(v) for k, v in req["weights"].items()}
            return {"ok": True}
        if op == "dbglevel":
            logging.getLogger().setLevel(dbglevel_to_logging(int(req["level"])))
            w.log_connections = logging.getLogger("tcpha.fe.handoff").isEnabledFor(logging.INFO)
            return {"ok": True}
        if op == "conn":
            # Closed flows wait up to UNFORWARD_DELAY for their steering entries to go, but have left
            # the ledger already: the arbiter, which reads the kernel's map after our answer, would list
            # them as orphans of a dead worker. Their entries go first.
            w.batch.flush_all(wait=True)
            macs = {be.mac: be.name for be in set(w.backends.values()) if getattr(be, "mac", None)}
            return {"rows": ledger.conn_rows(), "macs": macs}
        if op == "metrics":
            reply = {"metrics": ledger.metrics.to_dict(), "dispatching": len(ledger.dispatching),
                     "flows": len(ledger.flows), "inflight": w.inflight}
            if req.get("detail"):                       # a status document being built (page, tcpha-ctl)
                by_backend: dict[str, int] = {}
                for f in ledger.flows.values():
                    by_backend[f.backend] = by_backend.get(f.backend, 0) + 1
                reply.update(accepted=w.stats.accepted, flows_by_backend=by_backend, answers=list(ledger.answers))
            return reply
        if op == "stop":
            if req.get("wait_flows") is False:
                w.wait_flows = False
            w.stop()
            return {"ok": True}
        if op == "reload":
            return self._reload(req["path"], req.get("keep", []))
        if op == "settings":
            return {"settings": self._settings_in_force()}
        if op == "add_backend":
            return self._add_backend(req)
        if op == "remove_backend":
            return self._remove_backend(req["name"])
        return {"error": f"unknown op {op!r}"}

    def _add_backend(self, req: dict) -> dict:
        w = self.worker
        name = req["name"]
        rules = [compile_rule(name, f, p) for f, p in req.get("rules", [])]
        if name not in w.backends:
            be = RemoteBackend(w, req["host"], int(req["port"]), w.config.connperbe)
            w.backends[name] = be
            be.start()
        w.dynamic_rules = [r for r in w.dynamic_rules if r.target != name] + rules
        w.set_rules(w.config.rules)
        return {"ok": True}

    def _remove_backend(self, name: str) -> dict:
        w = self.worker
        w.dynamic_rules = [r for r in w.dynamic_rules if r.target != name]
        w.set_rules(w.config.rules)
        be = w.backends.pop(name, None)
        if be is not None and be not in w.backends.values():
            be.close()
        return {"ok": True}

    def _settings_in_force(self) -> dict[str, Any]:
        """The values of the options this worker applies, read from the objects that use them (not from
        its config), in tcpha.config.settings.in_force_form."""
        w = self.worker
        level = logging.getLogger().getEffectiveLevel()
        dynamic = {r.target for r in w.dynamic_rules}
        values: dict[str, Any] = {
            "peekmax": w.peekmax, "peektimeout": w.peektimeout, "handofftimeout": w.handofftimeout,
            "maxclients": w.maxclients, "grace": w.grace, "authkey": w.authkey, "vaddr": w.vip,
            "server": sorted({be.name for be in w.backends.values()} - dynamic),
            "rule": [r for r in w.rules.rules if r.target not in dynamic],
            "flowtimeout": w.ledger.flow_timeout,
            "dbglevel": next((n for n, (lv, _) in DBGLEVELS.items() if lv == level), None),
            # read from the worker's config where they are used (tcpha.fe.localnode)
            "redirectaddr": w.config.redirectaddr, "redirectport": w.config.redirectport,
        }
        table = {s.name: s for s in settings_for("fe")}
        return {name: in_force_form(table[name], value) for name, value in values.items()}

    def _reload(self, path: str, keep: list[str]) -> dict:
        """Apply a changed config file in place: rules, back ends, timeouts; nothing is dropped
        (connections being dispatched finish with the objects they hold)."""
        w = self.worker
        new = load_fe_config(path)
        for k in keep:
            setattr(new, k, getattr(w.config, k))
        wanted = build_backends(w, new.servers, new.connperbe, known=w.backends)   # new ones started
        dynamic = {r.target for r in w.dynamic_rules}
        for k, be in list(w.backends.items()):
            if k not in wanted and k not in dynamic:
                del w.backends[k]
                if be not in w.backends.values() and be not in wanted.values():
                    be.close()
        w.backends.update(wanted)
        w.apply_config(new)              # authkey: control connections made from now on (reconnects, new back ends)
        w.set_rules(new.rules)
        return {"ok": True}
