"""A front-end worker: one asyncio loop (callbacks only) that accepts, peeks, matches and hands off.

Kernel state (VIP, steering table) is installed by the arbiter before workers start; a worker only
adds and removes flow entries in it. Workers share the listening sockets (inherited across fork),
and each keeps its own `connperbe` control connections to every back end.
"""

from __future__ import annotations

import asyncio
import cProfile
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from tcpha import control, repair
from tcpha.control.handoff import FeEvent, FrontEndHandoffs
from tcpha.fe.agent import WorkerAgent
from tcpha.fe.backends import build_backends
from tcpha.fe.dispatch import Dispatch
from tcpha.fe.host import HeadSniffer
from tcpha.fe.ledger import ConnectionLedger
from tcpha.fe.rules import RuleTable
from tcpha.loglevels import NOTICE
from tcpha.steering import FlowKey

log = logging.getLogger("tcpha.fe.worker")


@dataclass
class WorkerStats:
    accepted: int = 0
    handoffs: int = 0
    refused: int = 0
    nomatch: int = 0
    unavailable: int = 0
    flows_closed: int = 0
    flows_closed_stale: int = 0      # FlowClosed of an earlier connection on a reused 4-tuple: entry kept
    control_errors: int = 0
    moved: int = 0                   # rehandoff: connections a back end handed back, dispatched again
    answered: dict[int, int] = field(default_factory=dict)


# The nft transactions run in the loop by default; TCPHA_STEERING_THREAD=1 runs them in the steering
# thread. Measured in the lab (4 alternating runs each, wrk -c32, 1 KiB): in the loop 900-1,500
# handoffs/s at 295-363 us of FE CPU each; in the thread 490-1,240/s at 390-430 us: the thread's
# hand-offs and GIL contention with the Python netlink encoding cost more than the kernel wait saved.
INLINE_STEERING = not os.environ.get("TCPHA_STEERING_THREAD")
# Connections accepted per wake-up of a listener (HAProxy's tune.maxaccept): a wave of thousands (idle
# clients released by TCP_DEFER_ACCEPT together) does not keep the loop from the events of the others.
ACCEPT_BATCH = 64
LINK_CLOSE_WAIT = 2.0   # seconds a back end gets to close its side of a control connection at stop


def heads_budget(maxclients: int) -> int:
    """How many connections waiting for their request head (or lingering after an error answer) one
    worker may hold: its descriptor limit less those of maxclients dispatches (a local-node relay takes
    two) and a reserve for control links, the log and the netlink sockets."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, soft - 2 * maxclients - 256)


class SteeringBatch:
    """Steering operations gathered per loop iteration and sent as one nft transaction each.

    A transaction costs ~50 us of CPU and ~200 us of wall-clock time in the kernel whatever its
    size (measured), so the connections that became ready in one epoll wake-up are frozen together,
    the Restored answers that arrived together are forwarded together, and closed flows are removed
    every UNFORWARD_DELAY. With TCPHA_STEERING_THREAD=1 the transactions run in one steering thread
    instead (at most one per kind in flight, the rest batched into the next, results back through
    call_soon_threadsafe; one thread keeps the operations in order) — slower here, see above.
    """

    UNFORWARD_DELAY = 0.02

    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.freezing: list[Dispatch] = []
        self.forwarding: list[Dispatch] = []
        self.closing: list[Any] = []
        self._freeze_at = self._forward_at = self._close_at = False
        self._busy = {"freeze": False, "forward": False}
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steering")
        self.transactions = 0

    def freeze(self, d: Dispatch) -> None:
        self.freezing.append(d)
        if not self._freeze_at and not self._busy["freeze"]:
            self._freeze_at = True
            self.worker.loop.call_soon(self._flush_freeze)

    def forward(self, d: Dispatch) -> None:
        self.forwarding.append(d)
        if not self._forward_at and not self._busy["forward"]:
            self._forward_at = True
            self.worker.loop.call_soon(self._flush_forward)

    def thaw(self, flow: Any) -> None:
        """Let a frozen flow's packets reach our socket again (at once: the connection is taken back)."""
        self.worker.steering.thaw(flow)

    def unforward(self, flow: Any, xid: int = 0) -> None:
        """Remove a closed flow's entry, unless it now holds another handoff than `xid` (0: any)."""
        self.closing.append((flow, xid))
        if not self._close_at:
            self._close_at = True
            self.worker.loop.call_later(self.UNFORWARD_DELAY, self._flush_unforward)

    # -- in the steering thread ------------------------------------------------------------------
    def _do_freeze(self, flows: list[Any]) -> Exception | None:
        steering = self.worker.steering
        try:
            many = getattr(steering, "freeze_many", None)
            if many is not None:
                many(flows)
            else:
                for flow in flows:
                    steering.freeze(flow)
        except Exception as e:
            return e
        return None

    def _do_forward(self, flows: list[tuple[Any, str, int]]) -> Exception | None:
        try:
            self.worker.steering.forward_many(flows)
        except Exception as e:
            return e
        return None

    def _do_unforward(self, flows: list[tuple[Any, int]]) -> None:
        try:
            stale = self.worker.steering.unforward_closed(flows)
        except Exception as e:
            log.error("removing %d steering entries failed: %s", len(flows), e)
            return
        for flow in stale:
            self.worker.stats.flows_closed_stale += 1
            log.log(NOTICE, "FlowClosed for %s:%d ignored: its entry belongs to a newer connection from the "
                    "same port", flow.client_ip, flow.client_port)

    # -- in the loop -----------------------------------------------------------------------------
    def _submit(self, kind: str, fn: Any, arg: Any, batch: list[Dispatch], deliver: Any) -> None:
        self._busy[kind] = True
        self.transactions += 1
        loop = self.worker.loop
        if INLINE_STEERING:
            self._delivered(kind, batch, deliver, fn(arg))
            return
        future = self.thread.submit(fn, arg)

        def done(f: Any) -> None:          # in the steering thread
            try:
                loop.call_soon_threadsafe(self._delivered, kind, batch, deliver, f.result())
            except RuntimeError:            # loop closed at shutdown
                pass
        future.add_done_callback(done)

    def _delivered(self, kind: str, batch: list[Dispatch], deliver: Any, error: Exception | None,
                   flush: bool = True) -> None:
        self._busy[kind] = False
        for d in batch:
            deliver(d, error)
        if flush:
            self.worker.flush_links()      # the batch's Handoffs / Steereds: one write per control link
        # what arrived while this transaction ran goes in the next one
        if kind == "freeze" and self.freezing and not self._freeze_at:
            self._flush_freeze()
        elif kind == "forward" and self.forwarding and not self._forward_at:
            self._flush_forward()

    def _both_ready(self) -> bool:
        return (INLINE_STEERING and bool(self.freezing) and bool(self.forwarding) and not self._busy["freeze"]
                and not self._busy["forward"] and hasattr(self.worker.steering, "freeze_forward"))

    def _flush_both(self) -> None:
        """Freezes and forwards pending in the same loop iteration: one nft transaction for both.

        Should it fail, nothing of it was applied: the two run apart, so that each connection gets
        the outcome of its own operation, as when they are flushed separately.
        """
        freezing, self.freezing = self.freezing, []
        forwarding, self.forwarding = self.forwarding, []
        self._busy["freeze"] = self._busy["forward"] = True
        self.transactions += 1
        freezes = [d.flow for d in freezing]
        forwards = [(d.flow, d.backend.mac, d.handoff.xid) for d in forwarding]
        try:
            self.worker.steering.freeze_forward(freezes, forwards)
            fwd_error = freeze_error = None
        except Exception:
            self.transactions += 2
            fwd_error = self._do_forward(forwards)
            freeze_error = self._do_freeze(freezes)
        self._delivered("forward", forwarding, Dispatch.forwarded, fwd_error, flush=False)
        self._delivered("freeze", freezing, Dispatch.frozen, freeze_error)

    def _flush_freeze(self) -> None:
        self._freeze_at = False
        if self._busy["freeze"] or not self.freezing:
            return
        if self._both_ready():
            self._flush_both()
            return
        batch, self.freezing = self.freezing, []
        self._submit("freeze", self._do_freeze, [d.flow for d in batch], batch, Dispatch.frozen)

    def _flush_forward(self) -> None:
        self._forward_at = False
        if self._busy["forward"] or not self.forwarding:
            return
        if self._both_ready():
            self._flush_both()
            return
        batch, self.forwarding = self.forwarding, []
        self._submit("forward", self._do_forward, [(d.flow, d.backend.mac, d.handoff.xid) for d in batch], batch,
                     Dispatch.forwarded)

    def _flush_unforward(self) -> Future | None:
        self._close_at = False
        batch, self.closing = self.closing, []
        if not batch:
            return None
        if INLINE_STEERING:
            self._do_unforward(batch)
            return None
        return self.thread.submit(self._do_unforward, batch)

    def flush_all(self, wait: bool = False) -> None:
        """Remove the closed flows' entries now rather than at UNFORWARD_DELAY (with `wait`, also when
        the steering thread does it: returns once they are gone, or after a second)."""
        if self.closing:
            future = self._flush_unforward()
            if wait and future is not None:
                try:
                    future.result(timeout=1.0)
                except Exception:
                    pass

    def close(self) -> None:
        """Send what is pending and wait for the steering thread to finish (at stop)."""
        self.flush_all()
        self.thread.shutdown(wait=True)


class Worker:
    def __init__(self, config: Any, listeners: list[tuple[socket.socket, int]], steering: Any, *,
                 ifname: str, name: str = "worker"):
        self.listeners = listeners
        self.steering = steering
        self.ifname = ifname
        self.name = name
        self.vip: str = config.vaddr
        self.sniffer = HeadSniffer(config.peekmax)
        self.apply_config(config)        # config, authkey, peektimeout, handofftimeout, maxclients, grace
        self.dynamic_rules: list[Any] = []      # rules of back ends registered at run time (tcpha.fe.agent)
        self.rules = RuleTable(config.rules)
        self.backends: dict[str, Any] = build_backends(self, config.servers, config.connperbe)
        self.batch = SteeringBatch(self)
        self.stats = WorkerStats()
        # Connections, flows, counters and the health gate, read and written by the control plane
        # through `runtime_sock` (tcpha.fe.agent).
        self.ledger = ConnectionLedger(list(config.rules), config.flowtimeout)
        self.runtime_sock: socket.socket | None = None
        # The handoffs' states and ids (tcpha.control.handoff): which wait for an answer, which are open
        # on each control link. Ids are unique per worker: the pid in the high bits.
        self.handoffs: FrontEndHandoffs[Dispatch, Any] = FrontEndHandoffs((os.getpid() & 0xFFFF) << 32)
        self._unflushed: list[Any] = []          # control links with queued frames (ControlLink.send)
        # The handoffs' deadlines (handofftimeout after each Handoff), oldest first, and one timer for the
        # oldest still waiting: not a timer per handoff (see handoff_deadline).
        self._deadlines: deque[tuple[float, int]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        self._flush_at = False
        self.lingering: dict[int, Dispatch] = {}
        self.inflight = 0                # connections being dispatched (heads_waiting included)
        # Connections waiting for their request head (idle or slow clients, up to peektimeout) are not
        # counted against maxclients: thousands of them would keep every new connection in the accept
        # queue, and its overflow drops SYNs (a second's retransmission, then three, then seven). They
        # only cost a descriptor, a reader and a timer each; bounded by the descriptors this process has.
        self.heads_waiting = 0
        self.heads_max = heads_budget(self.maxclients)
        self.accepting = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._stopping: asyncio.Event | None = None
        self.stop_asked = False          # stop() before serve() made its event: serve() stops at once
        self.log_connections = log.isEnabledFor(logging.INFO)
        self.on_ready: Callable[[], None] | None = None
        # The arbiter that forked this worker (None: the worker runs in the front end's own process).
        # A worker whose arbiter is gone (kill -9) stops at once: see _arbiter_gone.
        self.arbiter_pid: int | None = None
        self.wait_flows = True
        # rehandoff = on (or a rule's rehandoff=on): the back ends get the rules (Rules) and may hand a
        # connection back at a request the rules send elsewhere (MoveAsk, Moved: docs/kernel.md "Moving a
        # keep-alive connection").
        self.rehandoff = self._any_rule_moves()
        self._moving: dict[int, tuple[Any, Any]] = {}       # xid -> (FlowKey, FlowRecord) frozen for a move
        self._orphan_logged = False
        self._dead_flows_logged = False

    @property
    def peekmax(self) -> int:
        return self.sniffer.peekmax

    def apply_config(self, config: Any) -> None:
        """The config in force and the values the worker copies out of it (at start, and at a reload:
        tcpha.fe.agent); rules and back ends are set apart (set_rules, build_backends)."""
        self.config: Any = config
        self.authkey: bytes = config.authkey     # control connections made from now on
        self.sniffer.peekmax = config.peekmax
        self.peektimeout: float = config.peektimeout
        self.handofftimeout: float = config.handofftimeout
        self.maxclients: int = config.maxclients
        self.grace: float = config.grace

    def set_rules(self, static: list[Any]) -> None:
        """The rules in force: the config file's `static` ones, then those of registered back ends."""
        rules = list(static) + self.dynamic_rules
        self.rules = RuleTable(rules)
        self.ledger.set_rules(rules)
        was, self.rehandoff = self.rehandoff, self._any_rule_moves()
        if self.rehandoff or was:        # off now: an empty Rules, and the back ends stop asking
            for be in set(self.backends.values()):
                for link in getattr(be, "ready", ()):
                    if link.up:
                        link.send(self.rules_message(be))

    def rule_moves(self, rule: Any) -> bool:
        """Whether a keep-alive request this rule matches moves its connection to the rule's back end:
        the rule's own ``rehandoff=``, else the global ``rehandoff``."""
        return (rule.rehandoff or self.config.rehandoff) == "on"

    def _any_rule_moves(self) -> bool:
        return any(self.rule_moves(r) for r in self.rules.rules if r.field in ("uri", "host"))

    def rules_message(self, backend: Any) -> Any:
        """What `backend` needs to know whether a request stays on it (rehandoff): the uri/host rules in
        order, each with whether it names `backend` (a pool rule: whether `backend` is in the pool).

        A rule that does not move connections (its ``rehandoff=off``, or the global one) is sent as
        naming every back end: a request it matches stays where its connection is. With no rule that
        moves, the message is empty: the back end relays without looking at requests, and never asks."""
        if not self.rehandoff:
            return control.Rules(rules=(), here=b"")
        pairs: list[tuple[str, str]] = []
        here = bytearray()
        last_pool: Any = None
        for rule in self.rules.rules:
            if rule.field not in ("uri", "host"):
                continue
            mine = self.backends.get(rule.target) is backend or not self.rule_moves(rule)
            pool = tuple(getattr(rule, "pool", ()) or ())
            if len(pool) > 1 and last_pool == (rule.field, rule.pattern, pool):
                here[-1] |= mine            # the next member of the same pool rule
                continue
            last_pool = (rule.field, rule.pattern, pool) if len(pool) > 1 else None
            pairs.append((rule.field, rule.pattern))
            here.append(1 if mine else 0)
        return control.Rules(rules=tuple(pairs), here=bytes(here))

    # -- handoffs --------------------------------------------------------------------------------
    def flow_key(self, peer: tuple[str, int], lport: int) -> Any:
        return FlowKey(client_ip=peer[0], client_port=peer[1], vip=self.vip, vport=lport)

    def queue_flush(self, link: Any) -> None:
        self._unflushed.append(link)
        if not self._flush_at:
            self._flush_at = True
            self.loop.call_soon(self.flush_links)

    def flush_links(self) -> None:
        """Write what the control links queued (one write each), in the order they queued it."""
        self._flush_at = False
        links, self._unflushed = self._unflushed, []
        for link in links:
            link.flush()

    def fail_handoff(self, xid: int, reason: str, event: FeEvent) -> None:
        """Refused, timed out or link lost (`event`): the connection of `xid`, if it still waits for an
        answer, is taken back."""
        d = self.handoffs.failed(xid, event)
        if d is not None:
            d.refused(reason)

    def handoff_deadline(self, xid: int) -> None:
        """The Handoff `xid` was sent: it fails ("timed out") unless answered within handofftimeout.

        Most handoffs are answered within a millisecond, so rather than a timer each (allocated, pushed
        on the loop's heap, cancelled), the deadlines wait in a queue, in the order they were set, and
        one timer runs at the earliest of those still waiting (_expire_handoffs).
        """
        at = self.loop.time() + self.handofftimeout
        deadlines = self._deadlines
        if deadlines and at < deadlines[-1][0]:
            # handofftimeout was lowered by a reload: keep the queue in deadline order
            i = len(deadlines)
            while i and deadlines[i - 1][0] > at:
                i -= 1
            deadlines.insert(i, (at, xid))
        else:
            deadlines.append((at, xid))
        if self._deadline_timer is None or at < self._deadline_at:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_at = at
            self._deadline_timer = self.loop.call_at(at, self._expire_handoffs)

    def _expire_handoffs(self) -> None:
        """Fail the handoffs whose deadline passed without an answer; forget those answered or over."""
        self._deadline_timer = None
        deadlines = self._deadlines
        is_waiting = self.handoffs.is_waiting
        now = self.loop.time()
        while deadlines:
            at, xid = deadlines[0]
            if not is_waiting(xid):
                deadlines.popleft()
                continue
            if at > now:
                self._deadline_at = at
                self._deadline_timer = self.loop.call_at(at, self._expire_handoffs)
                return
            deadlines.popleft()
            self.fail_handoff(xid, "timed out", FeEvent.TIMEOUT)

    def on_control_message(self, link: Any, msg: Any) -> None:
        if isinstance(msg, control.Restored):
            d = self.handoffs.restored(msg.xid)
            if d is not None:
                d.restored()
            else:
                log.error("back end %s: 'restored' for unknown or timed-out handoff %d", link.backend.name, msg.xid)
        elif isinstance(msg, control.Refused):
            self.fail_handoff(msg.xid, msg.reason, FeEvent.REFUSED)
        elif isinstance(msg, control.FlowClosed):
            self.stats.flows_closed += 1
            self.ledger.flow_closed(msg.client_ip, msg.client_port, msg.vport, msg.bytes_in, msg.bytes_out,
                                    msg.xid)
            self.batch.unforward(FlowKey(client_ip=msg.client_ip, client_port=msg.client_port,
                                                vip=msg.vip, vport=msg.vport), msg.xid)
        elif isinstance(msg, control.MoveAsk):
            self._move_ask(link, msg)
        elif isinstance(msg, control.Moved):
            self._moved(link, msg)
        elif isinstance(msg, control.Ping):
            if link.up:
                link.send(control.Pong(token=msg.token))
        else:
            log.debug("back end %s: %s ignored", link.backend.name, type(msg).__name__)

    # -- rehandoff: a back end hands a keep-alive connection back (docs/kernel.md) ---------------
    def _move_ask(self, link: Any, msg: Any) -> None:
        """Freeze the flow, so that its back end may dump it (MoveFrozen); or say why not (MoveRefused)."""
        def refuse(why: str) -> None:
            log.info("move of %s:%d (handoff %d) refused: %s", msg.client_ip, msg.client_port, msg.xid, why)
            link.send(control.MoveRefused(xid=msg.xid, reason=why))

        if not self.rehandoff:
            return refuse("rehandoff is off")
        if self._stopping_set():
            return refuse("stopping")
        record = self.ledger.flows.get((msg.client_ip, msg.client_port, msg.vport))
        if record is None or record.xid != msg.xid or record.state != "handed-off":
            return refuse("not a connection this worker handed off")
        flow = FlowKey(client_ip=msg.client_ip, client_port=msg.client_port, vip=msg.vip, vport=msg.vport)
        try:
            self.steering.freeze(flow)
        except Exception as e:
            return refuse(f"freezing failed: {e}")
        record.state = "moving"
        self._moving[msg.xid] = (flow, record)
        link.send(control.MoveFrozen(xid=msg.xid))

    def _moved(self, link: Any, msg: Any) -> None:
        """The back end's dump of the connection, with the request it held: rebuild the socket here and
        dispatch it as a new connection (its request is in the receive queue, as an accepted one's is)."""
        entry = self._moving.pop(msg.xid, None)
        if entry is None:
            log.error("back end %s: 'moved' for handoff %d that is not moving", link.backend.name, msg.xid)
            return
        flow, record = entry
        key = (flow.client_ip, flow.client_port, flow.vport)
        if not msg.state:
            # It stays on the back end (the client closed or reset it meanwhile, or the dump failed).
            record.state = "handed-off"
            self._unfreeze(flow)
            log.info("%s:%d stays on %s: %s", flow.client_ip, flow.client_port, record.backend, msg.reason)
            return
        if self.ledger.flows.get(key) is record:
            del self.ledger.flows[key]
        try:
            sock = repair.restore(repair.TcpState.from_bytes(msg.state), announce=False)
        except Exception as e:
            self._unfreeze(flow)
            self._drop_forward(flow)
            log.error("%s:%d moved by %s but not rebuilt here, the connection is lost: %s", flow.client_ip,
                      flow.client_port, record.backend, e)
            return
        # Our socket owns the flow again: neither the old back end nor the freeze may take its packets.
        self._drop_forward(flow)
        self._unfreeze(flow)
        sock.setblocking(False)
        self.inflight += 1
        self.stats.moved += 1
        d = Dispatch(self, sock, (flow.client_ip, flow.client_port), flow.vport)
        d.moves = record.moves + 1
        d.start()

    def _unfreeze(self, flow: Any) -> None:
        try:
            self.steering.thaw(flow)
        except Exception as e:
            log.error("thawing %s:%d failed: %s", flow.client_ip, flow.client_port, e)

    def _drop_forward(self, flow: Any) -> None:
        try:
            self.steering.unforward(flow)
        except Exception as e:
            log.error("removing the steering entry of %s:%d failed: %s", flow.client_ip, flow.client_port, e)

    # -- accepting -------------------------------------------------------------------------------
    def _may_accept(self) -> bool:
        return (self.inflight - self.heads_waiting < self.maxclients
                and self.heads_waiting + len(self.lingering) < self.heads_max)

    def head_wait(self, d: Dispatch) -> None:
        """`d` waits for more of its request head: it stops counting against maxclients."""
        self.heads_waiting += 1
        if not self.accepting and self._may_accept() and not self._stopping_set():
            self._resume_accepting()

    def head_done(self, d: Dispatch) -> None:
        """`d`'s head is complete (or its wait is over): it counts against maxclients again."""
        self.heads_waiting -= 1

    def _accept(self, lsock: socket.socket, lport: int) -> None:
        # socket.accept() without its wrapper: the wrapper asks the listener its family, type (enum
        # conversions) and timeout again for every connection.
        raw_accept = lsock._accept          # type: ignore[attr-defined]
        family, kind, proto = lsock.family, lsock.type, lsock.proto
        new_socket = socket.socket
        for _ in range(ACCEPT_BATCH):
            if not self._may_accept():
                break
            try:
                fd, peer = raw_accept()
                sock = new_socket(family, kind, proto, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("accept on port %d failed: %s", lport, e)
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors/memory: the listener stays readable, so do not spin on
                    # it; the connections wait in the accept queue for 100 ms.
                    self._pause_accepting()
                    self.loop.call_later(0.1, self._resume_after_error)
                return
            sock.setblocking(False)
            self.inflight += 1
            self.stats.accepted += 1
            Dispatch(self, sock, peer, lport).start()
        else:
            return      # more may wait: the listener stays readable, the loop serves other events first
        # maxclients connections are being dispatched (or the descriptors for waiting heads are used up):
        # the rest waits in the kernel's accept queue.
        self._pause_accepting()

    def _resume_after_error(self) -> None:
        if self._may_accept() and not self._stopping_set():
            self._resume_accepting()

    def dispatch_done(self, d: Dispatch) -> None:
        if d.waiting:
            d.waiting = False
            self.heads_waiting -= 1
        self.inflight -= 1
        self.ledger.ended(d)
        if not self.accepting and self._may_accept() and not self._stopping_set():
            self._resume_accepting()

    def _stopping_set(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    def _resume_accepting(self) -> None:
        if self.accepting:
            return
        for lsock, lport in self.listeners:
            self.loop.add_reader(lsock.fileno(), self._accept, lsock, lport)
        self.accepting = True

    def _pause_accepting(self) -> None:
        if not self.accepting:
            return
        for lsock, _ in self.listeners:
            self.loop.remove_reader(lsock.fileno())
        self.accepting = False

    # -- life cycle ------------------------------------------------------------------------------
    def run(self) -> None:
        profile = os.environ.get("TCPHA_PROFILE")      # bench/handoff: where a worker's CPU goes
        if not profile:
            asyncio.run(self.serve())
            return
        # TCPHA_PROFILE_CLOCK=cpu: CPU time of the process (not wall-clock): on a shared machine the
        # wall-clock profile also counts the time the worker waited for a core.
        clock = time.process_time if os.environ.get("TCPHA_PROFILE_CLOCK") == "cpu" else time.perf_counter
        prof = cProfile.Profile(clock)
        try:
            prof.runcall(asyncio.run, self.serve())
        finally:
            prof.dump_stats(f"{profile}.{os.getpid()}")

    def stop(self) -> None:
        self.stop_asked = True
        if self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self.runtime_sock is not None:
            WorkerAgent(self, self.runtime_sock).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_stop_signal)
        # SIGUSR2: the arbiter handed everything over to a successor (seamless upgrade): finish what
        # is being dispatched, but do not wait for handed-off flows (the successor owns them).
        self.loop.add_signal_handler(signal.SIGUSR2, self._stop_handed_over)
        if self.stop_asked:               # stop() before the loop had the signals (tcpha.fe.arbiter)
            self._stopping.set()
        if self._arbiter_gone():          # it died between the fork and PR_SET_PDEATHSIG
            self._stopping.set()
            await self._drain()
            return
        for be in set(self.backends.values()):
            be.start()
        await self._wait_backends(max(1.0, self.handofftimeout))
        if self._stopping.is_set():
            await self._drain()
            return
        self._resume_accepting()
        log.info("%s: accepting on %s port(s) %s", self.name, self.vip,
                 " ".join(str(p) for _, p in self.listeners))
        if self.on_ready is not None:
            self.on_ready()
        await self._stopping.wait()
        await self._drain()

    def _stop_handed_over(self) -> None:
        self.wait_flows = False
        self._stopping.set()

    def _on_stop_signal(self) -> None:
        """SIGTERM/SIGINT: stop (finish what is dispatched, wait for handed-off flows within grace).
        Also the PR_SET_PDEATHSIG of a dead arbiter (tcpha.fe.arbiter): then, or on a second signal,
        no wait for handed-off flows (the kernel steers them whoever runs)."""
        if self._arbiter_gone():
            self._close_listeners()
        elif self._stopping.is_set() and self.wait_flows:
            log.log(NOTICE, "%s: stop signal again: not waiting for handed-off flows", self.name)
            self.wait_flows = False
        self._stopping.set()

    def _arbiter_gone(self) -> bool:
        """True when the arbiter that forked us has died (we were re-parented): log it once."""
        if self.arbiter_pid is None or os.getppid() == self.arbiter_pid:
            return False
        if not self._orphan_logged:
            self._orphan_logged = True
            log.warning("%s: arbiter pid %d is gone: stopping at once (handed-off flows stay steered in the "
                        "kernel; connections being dispatched are finished)", self.name, self.arbiter_pid)
        self.wait_flows = False
        return True

    def _close_listeners(self) -> None:
        """A stopping worker holds no listening socket: a new front end can bind the ports at once even
        while this one finishes (after a dead arbiter nobody else closes them)."""
        if self.loop is not None:
            self._pause_accepting()
        for lsock, _ in self.listeners:
            try:
                lsock.close()
            except OSError:
                pass

    def _entries(self) -> int:
        try:
            return int(self.steering.entries())
        except Exception:
            return 0

    def _awaited_flows(self) -> int:
        """Handed-off flows a stop waits for: those steered to a back end whose control connection is up.
        A flow whose back end is down (killed, unreachable) never reports its end (FlowClosed): it
        keeps its steering entry until the flow timeout, but does not hold the stop for `grace`."""
        try:
            forwarded = self.steering.forwarded()
        except Exception:
            return self._entries()
        live = {be.mac.lower() for be in set(self.backends.values())
                if getattr(be, "kind", "") == "tcp" and be.available and be.mac}
        awaited = sum(1 for mac in forwarded.values() if mac.lower() in live)
        if awaited < len(forwarded) and not self._dead_flows_logged:
            self._dead_flows_logged = True
            log.log(NOTICE, "%s: %d handed-off flows belong to back ends that are down: not waited for",
                    self.name, len(forwarded) - awaited)
        return awaited

    def _keep_waiting_for_flows(self) -> bool:
        return self.wait_flows and not self._arbiter_gone()

    async def _wait_backends(self, timeout: float) -> None:
        """Give the control connections a moment before accepting, so that the first clients are
        not answered 503 only because the links were still being set up (bounded: a back end that
        is down must not keep the front end from serving the others)."""
        remote = [be for be in set(self.backends.values()) if be.kind == "tcp"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(be.ready for be in remote):
            await asyncio.sleep(0.01)
        down = [be.name for be in remote if not be.ready]
        if down:
            log.warning("%s: accepting without back end(s) %s (not reachable yet)", self.name, ", ".join(down))

    async def _drain(self) -> None:
        """Stop accepting; let connections being dispatched finish (at most `grace` seconds)."""
        self._close_listeners()
        deadline = time.monotonic() + self.grace
        while (self.inflight or self.handoffs.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.inflight:
            log.warning("%s: %d connections still being dispatched at stop", self.name, self.inflight)
        # Handed-off flows keep their steering entries until their back ends report them closed
        # (the control connections stay up for that) or the grace period ends. After a handover
        # (seamless upgrade) the successor receives their reports: no wait.
        # A dead arbiter, a second stop signal or a back end that is down cut the wait short.
        flows = self._awaited_flows() if self._keep_waiting_for_flows() else 0
        if flows > 0:
            log.log(NOTICE, "%s: waiting up to %.0f s for %d handed-off flows to end", self.name,
                    max(0.0, deadline - time.monotonic()), flows)
        while flows > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            flows = self._awaited_flows() if self._keep_waiting_for_flows() else 0
        for d in list(self.lingering.values()):
            d._linger_end()
        # Half-close the control connections and read on until each back end closes its side: the
        # FlowClosed reports still coming are applied (their steering entries go now, not at the
        # flow timeout) and no RST cuts our last frames short (ControlLink.close).
        gone = [f for be in set(self.backends.values()) for f in (be.close() or [])]
        if gone:
            _, late = await asyncio.wait(gone, timeout=LINK_CLOSE_WAIT)
            if late:
                log.warning("%s: %d control connections not closed by their back end within %g s; aborted",
                            self.name, len(late), LINK_CLOSE_WAIT)
                for be in set(self.backends.values()):
                    for link in getattr(be, "links", []):
                        link.abort()
        await asyncio.sleep(0)
        self.batch.close()
        log.info("%s: stopped (%d handoffs, %d refused, %d unmatched)", self.name, self.stats.handoffs,
                 self.stats.refused, self.stats.nomatch)
