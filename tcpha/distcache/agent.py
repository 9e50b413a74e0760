"""dc_client, the local distcache agent: many local clients, one persistent upstream connection.

Behaviour (the original's, from the protocol notes, with the extensions marked):

* One persistent connection to the cache server.  Every local client's requests are written to
  it pipelined, renumbered with the agent's own uid counter; each answer goes back to its client
  with the client's own uid.
* While there is no upstream connection a request is answered at once with an empty payload
  (the C client counts that as a failed transaction).  Requests outstanding when the upstream
  connection dies are answered with the single status byte [2] (DISCONNECTED).
* While the server is unreachable the agent tries again every ``-retry`` ms.
* Answers for clients that have gone are dropped.
* ``-idle`` ms: a client connection with nothing outstanding and no traffic for that long is
  closed.
* Extension: many requests may be in flight on one client connection (the C agent takes one at
  a time); answers go back strictly in request order for each client.
* Extension: several ``-server`` addresses; when the current one fails (cannot connect, or the
  connection dies) the agent moves to the next one at once, and waits ``-retry`` ms only after
  a whole round of failures.
* Extension: data centers.  With ``dc`` (dc_client's ``-dc NAME``) the servers of that data center
  (the "primary servers") come first, in the given order, then the others.  While the agent is on
  a server of another data center it probes the primary servers every ``-retry`` ms in the
  background; once one accepts a connection the agent moves back to it when no request is
  outstanding on the foreign server: requests arriving meanwhile are held and sent to the primary
  server after the last answer came from the foreign one, so nothing is lost or reordered.
  Operations forwarded are counted per server (:meth:`Agent.counters_line`).

The agent is an asyncio program; :class:`Agent` does the forwarding and knows nothing of
command-line options, daemonising or privileges (see tcpha.cli.dc_client).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque

from .address import Address, AddressError
from .aio import open_address
from .tls import ClientTls, describe_error
from .codec import FRAME_HEADER, MAX_FRAME_DATA, PROTO_LEVEL, Message, MessageReader, ProtocolError, \
    Status, encode_message

__all__ = ["Agent"]

log = logging.getLogger("tcpha.distcache.agent")

_pack_header = FRAME_HEADER.pack
_DISCONNECTED = bytes([Status.DISCONNECTED])
_EMPTY = b""
# A client with this many requests waiting for answers is not read from until half are answered.
MAX_IN_FLIGHT_PER_CLIENT = 4096


def _encode(is_response: int, uid: int, op: int, payload: bytes) -> bytes:
    if len(payload) <= MAX_FRAME_DATA:
        return _pack_header(PROTO_LEVEL, is_response, uid, 0, op, 1, len(payload)) + payload
    return encode_message(Message(bool(is_response), uid, op, payload))


class _Slot:
    """One request of one client, waiting for its answer (kept in the client's order)."""

    __slots__ = ("uid", "op", "answer")

    def __init__(self, uid: int, op: int) -> None:
        self.uid = uid
        self.op = op
        self.answer: bytes | None = None


class _Client(asyncio.Protocol):
    """One local client connection.

    Reading from it stops while any of three things holds (memory stays bounded whatever the
    client does): it has MAX_IN_FLIGHT_PER_CLIENT unanswered requests, its answers are piling up
    unread (the transport's write buffer is over its high-water mark), or the upstream
    connection's write buffer is full.
    """

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.reader = MessageReader(expect_response=False)
        self.slots: deque[_Slot] = deque()
        self.closed = False
        self.last_active = time.monotonic()
        self.paused_limit = False
        self.paused_upstream = False
        self.paused_write = False
        self.reading = True

    def update_reading(self) -> None:
        want = not (self.paused_limit or self.paused_upstream or self.paused_write)
        if want != self.reading and self.transport is not None and not self.closed:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.agent._clients.add(self)
        if self.agent._upstream_paused:
            self.paused_upstream = True
            self.update_reading()

    def pause_writing(self) -> None:
        self.paused_write = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.paused_write = False
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            msgs = self.reader.feed(data)
        except ProtocolError as exc:
            # Rule: a corrupt frame, a frame in the wrong direction or an unknown operation
            # closes that one connection without a reply.
            log.info("client connection closed: %s", exc)
            self.close()
            return
        agent = self.agent
        for msg in msgs:
            slot = _Slot(msg.uid, msg.op)
            self.slots.append(slot)
            agent._forward(self, slot, msg.payload)
        # Everything this read produced goes upstream in one write, now (no extra loop turn).
        agent._flush_upstream()
        self.flush()
        if len(self.slots) >= MAX_IN_FLIGHT_PER_CLIENT and not self.paused_limit:
            self.paused_limit = True
            self.update_reading()

    def flush(self) -> None:
        """Write the answers that are ready, in request order."""
        slots = self.slots
        if not slots or slots[0].answer is None:
            return
        out = []
        while slots and slots[0].answer is not None:
            slot = slots.popleft()
            out.append(_encode(1, slot.uid, slot.op, slot.answer))
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))
            self.last_active = time.monotonic()
        if self.paused_limit and len(slots) < MAX_IN_FLIGHT_PER_CLIENT // 2:
            self.paused_limit = False
            self.update_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.transport = None
        self.slots.clear()
        self.agent._clients.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class _Upstream(asyncio.Protocol):
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.alive = True

    def data_received(self, data: bytes) -> None:
        if self.alive:
            self.agent._upstream_data(self, data)

    def connection_lost(self, exc) -> None:
        if self.alive:
            self.agent._upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.agent._pause_clients(True)

    def resume_writing(self) -> None:
        self.agent._pause_clients(False)


class Agent:
    """Forwarding engine of dc_client.

    ``listen`` is a listening socket (already bound, so that privileges can be dropped first);
    ``servers`` the upstream addresses in failover order.
    """

    def __init__(self, listen: socket.socket, servers: list[Address], *, retry_ms: int = 5000,
                 idle_ms: int = 0, upstream_timeout_ms: int = 0, dc: str | None = None,
                 server_dcs: list[str | None] | None = None, tls: ClientTls | None = None) -> None:
        if not servers:
            raise ValueError("at least one server address is needed")
        self.listen_sock = listen
        dcs = list(server_dcs) if server_dcs is not None else [None] * len(servers)
        if len(dcs) != len(servers):
            raise ValueError("one data center (or None) per server is needed")
        self.dc = dc
        # Primary servers (those of our own data center) first, each group in the given order.
        order = sorted(range(len(servers)), key=lambda i: dc is None or dcs[i] != dc)
        self.servers = [servers[i] for i in order]
        self.server_dcs = [dcs[i] for i in order]
        self.primary_count = sum(1 for d in self.server_dcs if dc is not None and d == dc)
        # Operations written to each server (index into self.servers), for the counters line.
        self.forwarded = [0] * len(self.servers)
        # Extension: TLS to every server (the certificate checked; one that does not check out
        # is an unreachable server: logged, failed over, retried).
        self.tls = tls
        self.retry = retry_ms / 1000.0
        self.idle = idle_ms / 1000.0
        # Extension: an upstream that leaves a request unanswered this long (e.g. stalled in the
        # middle of a frame) is treated as dead (the C agent would wait forever).
        self.upstream_timeout = upstream_timeout_ms / 1000.0
        self._watchdog_task: asyncio.Task | None = None
        self.connect_timeout = min(max(self.retry, 1.0), 10.0)
        self._clients: set[_Client] = set()
        self._server_idx = 0
        self._failures_in_round = 0
        self._up: _Upstream | None = None
        self._up_transport: asyncio.Transport | None = None
        self._up_reader: MessageReader | None = None
        self._up_out: list[bytes] = []
        self._up_flush_scheduled = False
        self._upstream_paused = False
        self._pending: dict[int, tuple[_Client, _Slot, float]] = {}
        self._uid = 0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task | None = None
        self._stopped: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._idle_task: asyncio.Task | None = None
        self._fail_logged: dict[str, tuple[float, str]] = {}   # address -> (when, why) last logged
        self._answered = False        # the current upstream connection has answered something
        self.loop: asyncio.AbstractEventLoop | None = None
        # Return to the own data center: the background probe, the connected primary server
        # waiting to take over, the uids still outstanding on the foreign server, and the
        # requests held (already in _pending) until those are answered.
        self._probe_task: asyncio.Task | None = None
        self._candidate: tuple[int, _Upstream, asyncio.Transport] | None = None
        self._draining: set[int] | None = None
        self._held: list[tuple[int, bytes]] = []
        self.returns = 0
        # Counters, for logs and tests.
        self.requests = 0
        self.answered_empty = 0
        self.answered_disconnected = 0
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._up_transport is not None

    @property
    def current_server(self) -> Address:
        return self.servers[self._server_idx]

    @property
    def on_foreign_server(self) -> bool:
        """Connected to a server outside our data center while we have primary servers."""
        return self.primary_count > 0 and self._server_idx >= self.primary_count and self.connected

    def counters(self) -> dict[str, dict[str, int]]:
        """Operations forwarded, per server address and per data center ('-' for a server without one)."""
        per_server: dict[str, int] = {}
        per_dc: dict[str, int] = {}
        for addr, sdc, n in zip(self.servers, self.server_dcs, self.forwarded):
            per_server[addr.text] = per_server.get(addr.text, 0) + n
            per_dc[sdc or "-"] = per_dc.get(sdc or "-", 0) + n
        return {"server": per_server, "dc": per_dc}

    def counters_line(self) -> str:
        """One line for the operator: ``Info, dc = east, forwarded: east=12 west=0, servers: ADDR (dc)=N ...``."""
        c = self.counters()
        by_dc = " ".join(f"{d}={n}" for d, n in c["dc"].items())
        by_server = " ".join(f"{addr.text}({sdc or '-'})={n}"
                             for addr, sdc, n in zip(self.servers, self.server_dcs, self.forwarded))
        return (f"Info, dc = {self.dc or '-'}, forwarded: {by_dc}, servers: {by_server}, "
                f"unanswered (no server) = {self.answered_empty}, returns to own dc = {self.returns}")

    # -- life cycle ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop` is called."""
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.listen_sock.setblocking(False)
        if self.listen_sock.family == socket.AF_UNIX:
            self._server = await self.loop.create_unix_server(lambda: _Client(self), sock=self.listen_sock)
        else:
            self._server = await self.loop.create_server(lambda: _Client(self), sock=self.listen_sock)
        self._start_connect()
        if self.idle > 0:
            self._idle_task = asyncio.ensure_future(self._idle_sweeper())
        if self.upstream_timeout > 0:
            self._watchdog_task = asyncio.ensure_future(self._watchdog())
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def _shutdown(self) -> None:
        self._drop_candidate()
        for task in (self._idle_task, self._watchdog_task, self._probe_task):
            if task is not None:
                task.cancel()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.close()
        if self._up_transport is not None:
            self._up.alive = False
            self._up_transport.close()
            self._up_transport = None

    # -- upstream -----------------------------------------------------------------

    def _start_connect(self) -> None:
        self._retry_handle = None
        if self._connecting is None and self._up_transport is None:
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        addr = self.current_server
        proto = _Upstream(self)
        try:
            transport, _ = await open_address(addr, lambda: proto, self.connect_timeout, self.tls)
        except asyncio.CancelledError:
            raise
        except (OSError, AddressError, asyncio.TimeoutError) as exc:
            self._connecting = None
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else describe_error(exc)
            self._warn_failure(addr, why, "cannot connect to cache server %s: %s (retrying every %g ms)",
                               addr.text, why, self.retry * 1000)
            self._next_server(failed=True)
            return
        self._connecting = None
        self._answered = False
        if self.tls is None:
            self._fail_logged.clear()   # with TLS, only an answer shows the server accepted us
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._up = proto
        self._up_transport = transport
        self._up_reader = MessageReader(expect_response=True)
        self._failures_in_round = 0
        self.connects += 1
        log.info("connected to cache server %s", addr.text)
        if self.on_foreign_server and self._probe_task is None:
            self._probe_task = asyncio.ensure_future(self._probe_primaries())

    def _warn_failure(self, addr: Address, why: str, fmt: str, *args) -> None:
        """One line per server and outage (and per new reason: refused, then a certificate that
        does not check out), then one a minute, whatever -retry is.  An outage ends with the
        first answer from the server."""
        now = time.monotonic()
        last_time, last_why = self._fail_logged.get(addr.text, (-1e9, ""))
        if now - last_time >= 60.0 or why != last_why:
            self._fail_logged[addr.text] = (now, why)
            log.warning(fmt, *args)

    def _next_server(self, *, failed: bool) -> None:
        """Move to the next address; try it now, or after -retry ms once a whole round failed."""
        n = len(self.servers)
        self._failures_in_round += 1
        self._server_idx = (self._server_idx + 1) % n
        if self._stopped is not None and self._stopped.is_set():
            return
        if self._failures_in_round < n:
            self._start_connect()
        else:
            self._failures_in_round = 0
            self._retry_handle = self.loop.call_later(self.retry, self._start_connect)

    def _upstream_data(self, up: _Upstream, data: bytes) -> None:
        if up is not self._up:
            return  # a connected primary server waiting to take over sends nothing unasked
        if not self._answered:
            self._answered = True
            self._fail_logged.clear()
        try:
            msgs = self._up_reader.feed(data)
        except ProtocolError as exc:
            log.warning("corrupt data from cache server %s: %s", self.current_server.text, exc)
            self._drop_upstream(f"protocol error: {exc}")
            return
        pending = self._pending
        touched = set()
        for msg in msgs:
            entry = pending.pop(msg.uid, None)
            if entry is None:
                log.debug("answer for unknown uid %d dropped", msg.uid)
                continue
            if self._draining is not None:
                self._draining.discard(msg.uid)
            client, slot, _ = entry
            if client.closed:
                continue  # Rule: answers for clients that left are dropped.
            slot.answer = msg.payload
            touched.add(client)
        for client in touched:
            client.flush()
        if self._draining is not None and not self._draining:
            self._return_to_primary()

    def _upstream_lost(self, up: _Upstream, exc) -> None:
        if self._candidate is not None and up is self._candidate[1]:
            log.info("primary server %s went away before taking over", self.servers[self._candidate[0]].text)
            self._candidate = None
            self._draining = None
            self._release_held()
            self._flush_upstream()
            return
        addr = self.current_server
        if self.tls is not None and not self._answered:
            # TLS 1.3: a server refusing our certificate (or its absence) closes the connection
            # (or resets it) right after the handshake, and says no more than that.
            why = (f": {describe_error(exc) if exc else 'closed by the server'} before any answer (does it "
                   "require a client certificate that -tls-cert/-tls-key do not give, or one from another CA?)")
        elif exc is not None:
            why = f": {describe_error(exc)}"
        else:
            why = ""
        self._warn_failure(addr, why, "lost the cache server %s%s", addr.text, why)
        self._drop_upstream(None)

    def _drop_upstream(self, why: str | None) -> None:
        if self._up is not None:
            self._up.alive = False
        transport = self._up_transport
        self._up_transport = None
        self._up = None
        self._up_out.clear()
        if transport is not None and why is not None:
            transport.abort()
        # Rule: requests outstanding when the upstream dies are answered with [2] -- except the
        # ones held for a primary server that is connected and waiting: they go there now.
        held_uids = {uid for uid, _ in self._held}
        pending = {u: e for u, e in self._pending.items() if u not in held_uids}
        self._pending = {u: e for u, e in self._pending.items() if u in held_uids}
        touched = set()
        for client, slot, _ in pending.values():
            if not client.closed:
                slot.answer = _DISCONNECTED
                self.answered_disconnected += 1
                touched.add(client)
        for client in touched:
            client.flush()
        if self._upstream_paused:
            self._pause_clients(False)
        if self._candidate is not None:
            self._return_to_primary()
            return
        if self._probe_task is not None:
            self._probe_task.cancel()
            self._probe_task = None
        if len(self.servers) > 1:
            self._next_server(failed=True)
        else:
            self._failures_in_round = 0
            self._retry_handle = self.loop.call_later(self.retry, self._start_connect)

    def _pause_clients(self, pause: bool) -> None:
        self._upstream_paused = pause
        for client in list(self._clients):
            client.paused_upstream = pause
            client.update_reading()

    # -- requests -----------------------------------------------------------------

    def _forward(self, client: _Client, slot: _Slot, payload: bytes) -> None:
        self.requests += 1
        if self._up_transport is None:
            # Rule: no server -> an immediate empty answer.
            slot.answer = _EMPTY
            self.answered_empty += 1
            return
        uid = self._uid = (self._uid + 1) & 0xFFFFFFFF
        self._pending[uid] = (client, slot, time.monotonic())
        if self._draining is not None:
            # Held until the foreign server has answered everything it was sent.
            self._held.append((uid, _encode(0, uid, slot.op, payload)))
            return
        self.forwarded[self._server_idx] += 1
        self._up_out.append(_encode(0, uid, slot.op, payload))

    def _flush_upstream(self) -> None:
        self._up_flush_scheduled = False
        if self._up_out and self._up_transport is not None:
            # Whole messages in one write (the C decoder must never see a split frame tail).
            self._up_transport.write(b"".join(self._up_out))
        self._up_out.clear()

    # -- back to the own data center --------------------------------------------------

    async def _probe_primaries(self) -> None:
        """While on a foreign server: every -retry ms try the primary servers in order; the first
        that accepts a connection becomes the candidate, taken over when nothing is outstanding."""
        try:
            while self.on_foreign_server and self._candidate is None:
                await asyncio.sleep(self.retry)
                for idx in range(self.primary_count):
                    if not self.on_foreign_server:
                        return
                    proto = _Upstream(self)
                    try:
                        transport, _ = await open_address(self.servers[idx], lambda: proto, self.connect_timeout, self.tls)
                    except (OSError, AddressError, asyncio.TimeoutError):
                        continue
                    if not self.on_foreign_server:
                        proto.alive = False
                        transport.close()
                        return
                    self._candidate = (idx, proto, transport)
                    log.info("primary server %s is back; returning to data center %s",
                             self.servers[idx].text, self.dc)
                    self._flush_upstream()
                    if self._pending:
                        self._draining = set(self._pending)
                    else:
                        self._return_to_primary()
                    return
        finally:
            if self._probe_task is asyncio.current_task():
                self._probe_task = None

    def _return_to_primary(self) -> None:
        """Make the candidate the upstream: close the foreign server's connection, send the held requests."""
        assert self._candidate is not None
        idx, proto, transport = self._candidate
        self._candidate = None
        self._draining = None
        old, old_transport = self._up, self._up_transport
        if old is not None:
            old.alive = False
        if old_transport is not None:
            old_transport.close()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        self._server_idx = idx
        self._failures_in_round = 0
        self._up = proto
        self._up_transport = transport
        self._up_reader = MessageReader(expect_response=True)
        self._answered = False        # with TLS, only an answer shows the server accepted us
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        self.returns += 1
        log.info("back on cache server %s (data center %s)", self.servers[idx].text, self.dc)
        self._release_held()
        self._flush_upstream()

    def _release_held(self) -> None:
        """Queue the held requests on the current upstream (or answer them empty if there is none)."""
        held, self._held = self._held, []
        for uid, frame in held:
            if self._up_transport is None:
                entry = self._pending.pop(uid, None)
                if entry is not None and not entry[0].closed:
                    entry[1].answer = _EMPTY
                    self.answered_empty += 1
                    entry[0].flush()
                continue
            self.forwarded[self._server_idx] += 1
            self._up_out.append(frame)

    def _drop_candidate(self) -> None:
        if self._candidate is not None:
            _, proto, transport = self._candidate
            self._candidate = None
            proto.alive = False
            transport.close()

    async def _watchdog(self) -> None:
        period = min(max(self.upstream_timeout / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(period)
            if self._pending and self._up_transport is not None:
                oldest = next(iter(self._pending.values()))[2]
                if time.monotonic() - oldest > self.upstream_timeout:
                    log.warning("cache server %s left a request unanswered for %.1f s, dropping it",
                                self.current_server.text, self.upstream_timeout)
                    self._drop_upstream("unanswered request")

    # -- idle clients ---------------------------------------------------------------

    async def _idle_sweeper(self) -> None:
        period = min(max(self.idle / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for client in list(self._clients):
                if not client.slots and now - client.last_active >= self.idle:
                    log.debug("closing idle client connection")
                    client.close()
