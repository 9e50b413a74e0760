"""The arbiter's links to its workers: one socketpair per worker, JSON lines in both directions.

Each worker (tcpha.fe.agent) answers requests on its end of the link: ``gate`` (which back ends may
take new connections, with their weights), ``dbglevel``, ``add_backend``/``remove_backend`` (dregister
back ends), ``conn``, ``metrics``, ``settings``, ``reload``, ``stop``. The control plane's end lives in
the plane's asyncio loop (tcpha.runtime.plane); the arbiter's process thread reaches it through
`attach_worker`, `detach_worker`, `push_gate`, `busy_per_worker` and `stop_worker`, which are safe to
call from any thread.

`WorkerLinks` is one of the parts FrontEndRuntime (tcpha.fe.runtime) is composed of.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

from tcpha.fe.health import HealthTable
from tcpha.runtime.plane import ControlPlane

log = logging.getLogger("tcpha.fe.runtime")


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


class WorkerLinks:
    """The links to every live worker, and the counters of the workers gone (so that the totals keep
    counting what they did). Uses the runtime's plane, health table, registry and dbglevel."""

    plane: ControlPlane
    health: HealthTable
    registry: Any                       # tcpha.fe.registry.RegistrationListener, or None
    dbglevel: int
    fe: Any = None                      # the arbiter: its `config` is the one new workers are forked with
    reload_args: dict[str, Any] | None = None   # the last reload's ask (tcpha.fe.reload), for late workers

    def __init__(self) -> None:
        self.links: dict[int, WorkerLink] = {}
        self.retired: list[dict[str, Any]] = []

    @staticmethod
    def worker_socketpair() -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def attach_worker(self, pid: int, sock: socket.socket, config: Any = None) -> None:
        """Link a worker forked with `config` (the arbiter's at the fork), from any thread."""
        self.plane.call_soon(lambda: asyncio.ensure_future(self._attach(pid, sock, config)))

    async def _attach(self, pid: int, sock: socket.socket, config: Any = None) -> None:
        link = WorkerLink(pid, sock)
        await link.open()
        self.links[pid] = link
        # A worker forked before a reload replaced the arbiter's config, and linked only after the reload
        # had asked every linked worker, runs the old rules: it is asked now. (Checked with no await since
        # the link went in: a reload that comes later finds it among the links.) Seen under load: one
        # worker of 3 routing by the rules of before the reload, for good.
        stale = config is not None and self.fe is not None and config is not self.fe.config
        try:
            if stale and self.reload_args is not None:
                await link.ask("reload", **self.reload_args)
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

    def close_links(self) -> None:
        for link in self.links.values():
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
        """Tell every worker which back ends may take new connections, with their weights.

        From any thread but the plane's (a control-file write), this returns once every live worker has
        answered: a write of ``drain`` or ``weight`` that has returned is in force for the next
        connection, as an operator who drains a back end and then sends a request expects. From the
        plane's own loop (the health prober's verdicts) it can only be scheduled: waiting there would
        wait on itself."""
        loop = self.plane.loop
        if loop is None or loop.is_closed():
            return                          # not started, or stopped: no worker to tell
        gate, weights = self.health.available(), self.health.weights()
        if self.plane.in_loop_thread():
            asyncio.ensure_future(self.ask_all("gate", gate=gate, weights=weights))
            return
        try:
            # each link's own ask times out at 2 s; the plane answers within that unless it is stuck
            self.plane.run(self.ask_all("gate", gate=gate, weights=weights), timeout=5.0)
        except (TimeoutError, RuntimeError) as e:     # RuntimeError: the loop closed meanwhile (a stop)
            log.warning("the workers did not confirm the new gate: %s; they take it when they can", e)

    # -- the worker pool (tcpha.fe.arbiter asks, tcpha.fe.pool decides) -----------------------------
    def linked_workers(self) -> set[int]:
        """The workers whose runtime link is attached (a just-started one is not yet)."""
        return set(self.links.copy())        # copy: atomic, while the plane thread attaches others

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
