"""A front-end worker's record of its connections: what is being dispatched, what was handed off and
not yet reported closed, the counters behind the metrics, and the back ends it may hand off to now.

The worker calls it at each step (Dispatch.start / handed_off / answered / dispatch_done, FlowClosed);
the control plane reads it through the worker's runtime link (tcpha.fe.agent) for ``conn``, the
metrics and ``dbglevel``, and writes ``gate`` there when health, weights or drain change.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tcpha.control.handoff import flow_closed_applies
from tcpha.fe.balance import SmoothWRR
from tcpha.fe.rules import RuleTable
from tcpha.fe.status import printable_head
from tcpha.metrics import WorkerMetrics

if TYPE_CHECKING:  # pragma: no cover
    from tcpha.fe.dispatch import Dispatch

log = logging.getLogger("tcpha.fe.handoff")


@dataclass(slots=True)
class FlowRecord:
    client_ip: str
    client_port: int
    vport: int
    backend: str
    rule: str
    since: float                 # time.time() of the handoff
    state: str = "handed-off"    # or "local" (relayed to the local node by this worker)
    bytes_in: int = 0
    bytes_out: int = 0
    relay: Any = None            # local node: the SpliceRelay (bytes known live)
    xid: int = 0                 # the handoff's id (echoed in the back end's FlowClosed)
    moves: int = 0               # rehandoff: times the connection moved between back ends so far


def rule_text(rule: Any) -> str:
    return f"{rule.field}:{rule.pattern}"


class ConnectionLedger:
    def __init__(self, rules: list[Any], flow_timeout: float = 3600.0):
        self.metrics = WorkerMetrics()
        self.flows: dict[tuple[str, int, int], FlowRecord] = {}
        self.dispatching: dict[int, Dispatch] = {}
        self.gate: dict[str, bool] = {}          # back end name -> accepts new connections (absent: yes)
        self.weights: dict[str, int] = {}        # back end name -> weight (absent: 1), for rule pools
        self.balancer = SmoothWRR()              # this worker's smooth WRR state, per pool
        self.flow_timeout = flow_timeout
        self._added = 0
        self.answers: deque[dict[str, Any]] = deque(maxlen=10)   # the last answers written here (status page)
        self.set_rules(rules)

    def prune(self) -> None:
        """Forget handed-off flows older than the steering timeout whose FlowClosed never came (the
        kernel entry is gone by then too): the table stays bounded even when no one reads `conn`."""
        cutoff = time.time() - self.flow_timeout
        for key in [k for k, f in self.flows.items() if f.state != "local" and f.since < cutoff]:
            del self.flows[key]

    def set_rules(self, rules: list[Any]) -> None:
        by_target: dict[str, list[tuple[Any, Any, str]]] = {}
        for rule in rules:
            by_target.setdefault(rule.target, []).append((rule, RuleTable([rule]), rule_text(rule)))
        self._by_target = by_target

    # -- questions the dispatcher asks ----------------------------------------------------------
    def accepts(self, name: str) -> bool:
        return self.gate.get(name, True)

    def weight_of(self, name: str) -> int:
        """The weight a pool pick uses: 0 when the back end takes no new connections now."""
        if not self.gate.get(name, True):
            return 0
        return self.weights.get(name, 1)

    def order_pool(self, members: list[str]) -> list[str]:
        """A pool's members (a rule naming several back ends), the smooth-WRR pick first."""
        return self.balancer.order(members, self.weight_of)

    def rule_for(self, facts: Any, target: str, candidates: list[str] | None = None) -> str:
        """The first rule naming `target` that matches these facts ('-' when none: a fallback)."""
        entries = self._by_target.get(target)
        if facts is None or not entries or (candidates is not None and target not in candidates):
            return "-"
        if len(entries) == 1 and candidates is not None:
            return entries[0][2]           # the target is a candidate: its only rule matched
        for _rule, single, text in entries:
            try:
                if single.candidates(facts):
                    return text
            except Exception:
                break
        return "-"

    # -- events ---------------------------------------------------------------------------------
    def started(self, d: Dispatch) -> None:
        self.dispatching[id(d)] = d

    def ended(self, d: Dispatch) -> None:
        self.dispatching.pop(id(d), None)

    def handed_off(self, d: Dispatch, backend: str, *, target: str | None = None, outcome: str = "handed_off",
                   relay: Any = None) -> None:
        seconds = time.perf_counter() - d.t0
        rule = self.rule_for(d.facts, target or backend, d.candidates)
        self.metrics.handoff(backend, rule, outcome, seconds)
        if outcome in ("handed_off", "local"):
            self._added += 1
            if self._added % 4096 == 0:
                self.prune()
            self.flows[(d.peer[0], d.peer[1], d.lport)] = FlowRecord(
                d.peer[0], d.peer[1], d.lport, backend, rule, time.time(),
                state="local" if outcome == "local" else "handed-off", relay=relay, xid=d.handoff.xid,
                moves=d.moves)
        if log.isEnabledFor(logging.INFO):
            log.info("%s:%d -> %s rule %s %s in %.0f us", d.peer[0], d.peer[1], backend, rule,
                     "relayed locally" if outcome == "local" else "handed off", seconds * 1e6)

    def refused(self, d: Dispatch, backend: str, target: str) -> None:
        self.metrics.handoff(backend, self.rule_for(d.facts, target, d.candidates), "refused")

    def answered(self, d: Dispatch, status: int, why: str = "") -> None:
        self.metrics.answered[status] = self.metrics.answered.get(status, 0) + 1
        self.answers.append({"time": round(time.time(), 3), "client": f"{d.peer[0]}:{d.peer[1]}", "status": status,
                             "why": why, "head": _peek_head(d)})
        if status == 503:
            self.metrics.handoff("none", "-", "unavailable" if d.candidates else "no_match")

    def flow_closed(self, client_ip: str, client_port: int, vport: int, bytes_in: int = 0,
                    bytes_out: int = 0, xid: int = 0) -> None:
        """The back end reports the flow ended; a report for another handoff than the one recorded for
        this 4-tuple (the client reused its port) is stale and leaves the newer record alone."""
        key = (client_ip, client_port, vport)
        record = self.flows.get(key)
        if record is not None and flow_closed_applies(record.xid, xid):
            del self.flows[key]

    def local_closed(self, key: tuple[str, int, int]) -> None:
        self.flows.pop(key, None)

    # -- what the control plane reads ------------------------------------------------------------
    def conn_rows(self) -> list[dict[str, Any]]:
        now = time.time()
        mono = time.perf_counter()
        rows = []
        for d in list(self.dispatching.values()):
            state = d.handoff.table_state          # tcpha.control.handoff: reading / handing-off
            be = d.backend
            rows.append({"client": f"{d.peer[0]}:{d.peer[1]}", "vport": d.lport,
                         "backend": be.name if be is not None else "-", "rule": "-", "state": state,
                         "age": round(mono - d.t0, 3), "bytes_in": d.peeked, "bytes_out": None,
                         "moves": d.moves})
        stale = []
        for key, f in self.flows.items():
            age = now - f.since
            if f.state != "local" and age > self.flow_timeout:
                stale.append(key)
                continue
            state = f.state
            if state == "handed-off" and not self.accepts(f.backend):
                state = "draining"
            bytes_in, bytes_out = f.bytes_in or None, f.bytes_out or None
            if f.relay is not None:
                bytes_in, bytes_out = f.relay.bytes_up, f.relay.bytes_down
            rows.append({"client": f"{f.client_ip}:{f.client_port}", "vport": f.vport, "backend": f.backend,
                         "rule": f.rule, "state": state, "age": round(age, 3),
                         "bytes_in": bytes_in, "bytes_out": bytes_out, "moves": f.moves})
        for key in stale:
            self.flows.pop(key, None)
        return rows


def _peek_head(d: Dispatch) -> str:
    """The start of what the client sent (still in the socket: it was only peeked), as printable text."""
    try:
        return printable_head(d.sock.recv(512, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (OSError, AttributeError):
        return ""
