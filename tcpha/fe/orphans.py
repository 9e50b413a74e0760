"""Handed-off flows no live worker knows: the `conn` rows for them, and their FlowClosed cleanup.

A worker records its handoffs in its own ledger (tcpha.fe.ledger). When it dies (``kill -9``, a crash), its
handed-off flows keep working, since the kernel steers them (tcpha.steering.flows), but their ledger is
gone. A predecessor's flows after a seamless upgrade are the same case. The control plane (arbiter) lists
them from the kernel's forward map:

* a flow in the map that no live worker's `conn` answer claims is a row ``forwarded (orphaned)``;
* its back end is what the dead worker last reported for it (any `conn` read while it lived leaves a
  hint: back end, rule, start time, so the age is known) or else the back end whose MAC the map holds
  (live workers report their back ends' MACs), or the MAC itself;
* the row goes when the map entry goes: FlowClosed from the back end reaches another worker or the
  health prober's control connection (both share the steering table) and removes it, or the idle
  timeout (`flowtimeout`) expires it.

:class:`OrphanTable` holds no I/O; :class:`KernelFlows` is the arbiter's own netlink handle on the map.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from tcpha.loglevels import NOTICE

log = logging.getLogger("tcpha.fe.runtime")

ORPHANED = "forwarded (orphaned)"
_CLAIMING = ("handed-off", "draining")


def _row_key(client: str, vport: int) -> tuple[str, int]:
    return (client, int(vport))


class OrphanTable:
    """Which forward-map entries no worker claims, as `conn` rows (sans-I/O)."""

    def __init__(self) -> None:
        self.hints: dict[tuple[str, int], tuple[float, str, str]] = {}   # (client, vport) -> since, backend, rule
        self.macs: dict[str, str] = {}                                  # back end MAC -> name

    def learn(self, worker_rows: list[dict[str, Any]], macs: dict[str, str], now: float | None = None) -> None:
        """Remember what the live workers said: their handed-off flows (for after they die) and MACs."""
        now = time.time() if now is None else now
        for mac, name in macs.items():
            self.macs[str(mac).lower()] = str(name)
        for r in worker_rows:
            if r.get("state") in _CLAIMING and r.get("age") is not None:
                key = _row_key(r["client"], r["vport"])
                self.hints[key] = (now - float(r["age"]), str(r["backend"]), str(r.get("rule", "-")))

    def rows(self, worker_rows: list[dict[str, Any]], kernel: dict[Any, str], vip: str | None = None,
             now: float | None = None) -> list[dict[str, Any]]:
        """Rows for the entries of `kernel` ({FlowKey: MAC}) that no row of `worker_rows` claims."""
        now = time.time() if now is None else now
        claimed = {_row_key(r["client"], r["vport"]) for r in worker_rows}
        present: set[tuple[str, int]] = set()
        out = []
        for flow, mac in kernel.items():
            if vip is not None and flow.vip != vip:
                continue
            key = _row_key(f"{flow.client_ip}:{flow.client_port}", flow.vport)
            present.add(key)
            if key in claimed:
                continue
            hint = self.hints.get(key)
            mac = (mac or "").lower()
            backend = hint[1] if hint is not None else self.macs.get(mac, mac or "-")
            out.append({"client": key[0], "vport": key[1], "backend": backend,
                        "rule": hint[2] if hint is not None else "-", "state": ORPHANED,
                        "age": round(now - hint[0], 3) if hint is not None else None,
                        "bytes_in": None, "bytes_out": None})
        # hints of flows the kernel no longer steers are done with
        for key in [k for k in self.hints if k not in present]:
            del self.hints[key]
        return out


class KernelFlows:
    """The control plane's own handle on the steering table (a netlink socket of its own: the workers'
    and the arbiter's main thread's are never shared). Calls block: run them in an executor."""

    def __init__(self, make_steering: Callable[[], Any]) -> None:
        self._make = make_steering
        self._steering: Any = None
        self._lock = threading.Lock()

    def _handle(self) -> Any:
        if self._steering is None:
            self._steering = self._make()
        return self._steering

    def forwarded(self) -> dict[Any, str] | None:
        """{FlowKey: back end MAC}, or None when the table cannot be read (not installed yet, removed)."""
        with self._lock:
            try:
                handle = self._handle()
                return None if handle is None else handle.forwarded()
            except Exception as e:
                log.debug("reading the steering table: %s", e)
                return None

    def unforward(self, flow: Any, xid: int = 0) -> bool:
        """Remove a closed flow's entry, unless it holds another handoff than `xid` (0: any)."""
        with self._lock:
            try:
                handle = self._handle()
                if handle is None:
                    return False
                if handle.unforward_closed([(flow, xid)]):
                    log.log(NOTICE, "FlowClosed for %s:%d ignored: its entry belongs to a newer connection from the "
                             "same port", flow.client_ip, flow.client_port)
                return True
            except Exception as e:
                log.warning("removing the steering entry of %s:%d: %s", flow.client_ip, flow.client_port, e)
                return False

    def close(self) -> None:
        with self._lock:
            if self._steering is not None:
                try:
                    self._steering.close()
                except Exception:
                    pass
                self._steering = None
