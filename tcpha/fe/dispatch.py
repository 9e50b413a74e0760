"""One accepted connection on its way to a back end: the I/O of each step.

The connection's states (PEEKING, ROUTING, FREEZING, HANDOFF_SENT, FORWARDING, and the final STEERED,
PASSED, LOCAL, ANSWERED, CLOSED) and which event leads where are tcpha.control.handoff's table
(FE_TRANSITIONS); each step here feeds the state machine its event (Dispatch.handoff). What a Dispatch
uses of its worker is tcpha.fe.host.DispatchHost.

    peek (MSG_PEEK: the bytes stay in the socket), parse head / ClientHello, match the rules, then the
    candidates in order:
         same host:  SCM_RIGHTS to the local tcpha-be
         other host: freeze flow, dump (repair mode), Handoff over a control link; Restored: forward the
                     flow to the back end's MAC, Steered, close silently; Refused / timeout / link lost:
                     resume (repair off), thaw, next candidate
         the local node (redirectaddr), for 'local' rules and what no back end takes
      no candidate left / no rule matches: 503 written here, then close
    freeze and forward are nft transactions batched by the worker (SteeringBatch): the connection
    waits for them in frozen() / forwarded(); a half-closed connection is never frozen (_movable)
    bad head -> 400/414; head not complete within peektimeout -> 408
    empty lines before the request-line (RFC 9112 2.2) are read off before routing: the back end gets
    the request from its request-line on; nothing else of the request is ever consumed
    TLS (docs/rules.md): a ClientHello that is malformed, longer than peekmax or not complete within
    peektimeout is routed as one without SNI/ALPN; no rule matches -> handshake_failure alert, close

Waiting for more of the head without consuming it: SO_RCVLOWAT is raised to one byte more than
what was peeked, so the socket becomes readable only when new bytes (or a FIN) arrive.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from tcpha import control, repair
from tcpha.control.handoff import FeConnection, FeEvent
from tcpha.fe.localnode import LOCAL, serve_locally
from tcpha.fe.responses import error_response
from tcpha.fe.rules import RequestFacts
from tcpha.sniff.tls import HANDSHAKE_FAILURE_ALERT

if TYPE_CHECKING:  # pragma: no cover
    from tcpha.fe.host import DispatchHost

log = logging.getLogger("tcpha.fe.dispatch")

# A handoff taken back because bytes reached our socket after its dump (Dispatch.restored) is not the
# back end's fault: it is tried again on the same back end, with a new dump that holds those bytes, at
# most this many times before the next candidate. Without it, a rule naming one back end answered 503.
LATE_TRIES = 2


def _tls_default_facts() -> RequestFacts:
    """What a TLS connection whose ClientHello could not be read is matched as (docs/rules.md): no SNI, no ALPN."""
    return RequestFacts.from_client_hello(None)

# What a connection not routed yet has as candidates and pools: one shared empty list, never modified
# (_route gives each connection lists of its own), not two new lists per accepted connection.
_NO_CANDIDATES: list = []

TCP_CLOSE_WAIT = 8
LINGER = 2.0             # after writing an error answer: how long to wait for the client's FIN


class Dispatch:
    __slots__ = ("worker", "sock", "fd", "peer", "lport", "t0", "timer", "peeked", "candidates",
                 "next_index", "handoff", "link", "backend", "flow", "facts", "reading", "finished",
                 "lowat", "rule", "pools", "waiting", "moves", "dumped", "late_tries")

    def __init__(self, worker: "DispatchHost", sock: socket.socket, peer: tuple[str, int], lport: int):
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.lport = lport
        self.t0 = time.perf_counter()
        self.timer: Any = None
        self.peeked = 0
        self.candidates: list[str] = _NO_CANDIDATES      # a list of its own once routed (_route)
        self.next_index = 0
        self.handoff = FeConnection()     # the state machine: state and latest xid
        self.link: Any = None
        self.backend: Any = None
        self.flow: Any = None
        self.facts: Any = None
        self.reading = False
        self.finished = False
        self.lowat = 1
        self.rule: str | None = None
        self.pools: list[tuple[int, int, tuple[str, ...]]] = _NO_CANDIDATES  # rule pools: (start, end, pool) spans
        self.waiting = False     # waiting for more of the request head: not counted against maxclients
        self.moves = 0           # rehandoff: how many times back ends handed this connection back
        self.dumped: repair.TcpState | None = None      # the state sent in the latest Handoff
        self.late_tries = 0      # handoffs taken back for bytes that came after their dump (restored())

    # -- peeking ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.worker.ledger.started(self)
        # Most clients send the request with (or right after) the handshake: the first peek usually
        # finds the whole head, and the peektimeout timer is only armed when we have to wait.
        self._peek(woken=False)

    def _readable(self) -> None:
        self._peek(woken=True)

    def _peek(self, woken: bool) -> None:
        sniffer = self.worker.sniffer
        peekmax = sniffer.peekmax
        try:
            buf = self.sock.recv(peekmax, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._want_read()
            return
        except OSError as e:
            self._close(f"receive failed: {e.strerror or e}")
            return
        if not buf:
            self._close("closed by the client before sending a request")
            return
        if woken and len(buf) == self.peeked and len(buf) < peekmax:
            # Readable, yet nothing new: the client sent FIN (or an error) with an incomplete head.
            self._close("client closed with an incomplete request head")
            return
        self.peeked = len(buf)
        tls = sniffer.is_tls(buf)
        try:
            facts = sniffer.facts_of(buf, tls)
        except sniffer.errors as e:
            if tls:      # docs/rules.md: an unreadable ClientHello is routed as one without SNI/ALPN
                self._route(_tls_default_facts(), f"unreadable TLS ClientHello ({e})")
            else:
                self._answer(getattr(e, "status", 400), f"bad request head: {e}")
            return
        except Exception as e:                                  # never a crash, whatever the bytes
            log.exception("%s:%d: sniffing the first %d bytes failed", self.peer[0], self.peer[1], len(buf))
            if tls:
                self._route(_tls_default_facts(), f"unreadable TLS ClientHello ({e})")
            else:
                self._answer(400, f"unreadable request head: {e}")
            return
        if facts is None:                                        # NeedMore
            if len(buf) >= peekmax:
                if tls:
                    self._route(_tls_default_facts(), f"TLS ClientHello longer than peekmax {peekmax}")
                else:
                    self._answer(400, f"request head longer than peekmax {peekmax}")
                return
            self._set_lowat(len(buf) + 1)
            self._want_read()
            return
        if facts.leading and not self._drop_leading_empty_lines(facts.leading):
            return
        self._route(facts, None)

    def _drop_leading_empty_lines(self, n: int) -> bool:
        """Read (consume) the `n` bytes of empty lines before the request-line, so that the back end's
        server gets a request that starts with its request-line: RFC 9112 2.2 only says a server SHOULD
        ignore them, and some do not (Python's http.server closes without an answer). They were peeked,
        so they are in the socket now; False (connection closed) if reading them fails."""
        try:
            while n > 0:
                got = len(self.sock.recv(n, socket.MSG_DONTWAIT))
                if got == 0:
                    raise ConnectionError("closed")
                n -= got
                self.peeked -= got
        except OSError as e:
            self._close(f"receive failed: {e.strerror or e}")
            return False
        return True

    def _route(self, facts: Any, why: str | None) -> None:
        """Match the rules and hand off to the first candidate; `why`: the facts are the TLS default."""
        w = self.worker
        self.handoff.handle(FeEvent.HEAD_READ)
        self._stop_reading()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.waiting:
            self.waiting = False
            w.head_done(self)
        if why is not None:
            log.info("%s:%d: %s: routed as a ClientHello without SNI", self.peer[0], self.peer[1], why)
        self.facts = facts
        if w.rules.pools:
            self.candidates, self.pools = w.rules.candidates_with_pools(facts)
        else:
            self.candidates = w.rules.candidates(facts)
        if not self.candidates:
            w.stats.nomatch += 1
            if self._serve_locally():                 # the local node takes what no rule matches
                return
            if facts.uri is None:
                self._tls_refuse(f"no rule matches (sni {facts.sni!r})")
            else:
                self._answer(503, f"no rule matches {facts.uri!r}")
            return
        self._next_candidate()

    def _want_read(self) -> None:
        if not self.waiting:
            self.waiting = True
            self.worker.head_wait(self)
        if self.timer is None:
            w = self.worker
            self.timer = w.loop.call_later(max(0.0, w.peektimeout - (time.perf_counter() - self.t0)),
                                           self._peek_timeout)
        if not self.reading:
            self.worker.loop.add_reader(self.fd, self._readable)
            self.reading = True

    def _stop_reading(self) -> None:
        if self.reading:
            self.worker.loop.remove_reader(self.fd)
            self.reading = False

    def _set_lowat(self, n: int) -> None:
        if n != self.lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
                self.lowat = n
            except OSError:
                pass

    def _peek_timeout(self) -> None:
        self.timer = None
        self._stop_reading()
        if self.worker.sniffer.is_tls_socket(self.sock):
            self._set_lowat(1)
            self._tls_late()
        else:
            self._answer(408, f"request head not complete within {self.worker.peektimeout:g} s")

    def _tls_late(self) -> None:
        """peektimeout on a TLS connection. Route what is there: the timer may have run before the
        readable callback of a ClientHello that did arrive (a busy loop); an incomplete one is routed by
        the TLS default (docs/rules.md). Never an HTTP answer: the client speaks TLS."""
        w = self.worker
        try:
            facts = w.sniffer.facts_of(self.sock.recv(w.sniffer.peekmax, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except Exception:                                   # nothing readable now, or unparsable
            facts = None
        if facts is not None:
            self._route(facts, None)
        else:
            self._route(_tls_default_facts(), f"TLS ClientHello not complete within {w.peektimeout:g} s")

    # -- handing off -----------------------------------------------------------------------------
    def _next_candidate(self) -> None:
        w = self.worker
        while self.next_index < len(self.candidates):
            if self.pools and self.pools[0][0] == self.next_index:
                # A rule naming several back ends: the smooth-WRR pick first, the others as its fallbacks.
                start, end, _pool = self.pools.pop(0)
                self.candidates[start:end] = w.ledger.order_pool(self.candidates[start:end])
            target = self.candidates[self.next_index]
            self.next_index += 1
            if target == LOCAL:                       # a rule naming the front end itself
                if self._serve_locally():
                    return
                continue
            if not w.ledger.accepts(target):          # down (health checks), weight 0 or draining
                continue
            backend = w.backends.get(target)
            if backend is None:
                log.error("rule target %s has no server; skipped", target)
                continue
            if backend.kind == "unix":
                if self.lowat != 1:
                    self._set_lowat(1)          # the socket itself travels: leave it as accepted
                if backend.pass_socket(self.sock, self.lport):
                    self.handoff.handle(FeEvent.PASS)
                    self.backend = backend
                    self._finish_local()
                    return
                continue
            link = backend.pick_link()
            if link is None or backend.mac is None:
                continue
            if not self._movable():
                continue
            # Two-phase handoff, step 1: stop the client's packets reaching our socket. Freezes
            # are batched per loop iteration (one nft transaction for all connections ready now).
            if self.flow is None:
                self.flow = w.flow_key(self.peer, self.lport)
            self.backend = backend
            self.link = link
            self.handoff.handle(FeEvent.FREEZE)
            w.batch.freeze(self)
            return
        w.stats.unavailable += 1
        if LOCAL not in self.candidates and self._serve_locally():   # all matching back ends out
            return
        if self.facts is not None and self.facts.uri is None:          # TLS: an alert, not an HTTP 503
            self._tls_refuse(f"no back end available among {', '.join(self.candidates)}")
            return
        self._answer(503, f"no back end available among {', '.join(self.candidates)}")

    def _serve_locally(self) -> bool:
        if serve_locally(self.worker, self):
            self.handoff.handle(FeEvent.SERVE_LOCALLY)
            return True
        return False

    def _movable(self) -> bool:
        """Only an ESTABLISHED connection can be rebuilt elsewhere with TCP_REPAIR; one the client has
        already half-closed (HTTP/1.0 tools that shut down writing after the request) can still be
        passed to a same-host back end or served by the local node, else it gets 503."""
        try:
            state = self.sock.getsockopt(socket.IPPROTO_TCP, repair.TCP_INFO, 1)[0]
        except OSError:
            return False
        if state != 1:                                   # TCP_ESTABLISHED
            if self.flow is not None or self.next_index <= 1:
                log.info("%s:%d: cannot move a connection in TCP state %d (client half-closed?)",
                         self.peer[0], self.peer[1], state)
            return False
        return True

    def frozen(self, error: Exception | None) -> None:
        """Step 2 (the flow is frozen): dump the socket, send the state, wait for the answer."""
        w = self.worker
        if error is not None:
            self.handoff.handle(FeEvent.FREEZE_FAILED)
            log.error("freezing %s:%d failed: %s", self.peer[0], self.peer[1], error)
            self._next_candidate()
            return
        link = self.link
        if not link.up:
            self.handoff.handle(FeEvent.NOT_SENT)
            self._thaw()
            self._next_candidate()
            return
        flow = self.flow
        try:
            # the addresses are known: the listener's (the VIP and port) and accept()'s peer
            state = repair.dump(self.sock, local=(flow.vip, flow.vport), peer=self.peer)
        except OSError as e:
            self.handoff.handle(FeEvent.NOT_SENT)
            self._thaw()
            log.warning("%s:%d: dump failed: %s", self.peer[0], self.peer[1], e)
            self._next_candidate()
            return
        self.dumped = state
        self.handoff.xid = xid = w.handoffs.new_xid()
        try:
            link.send(control.Handoff(xid=xid, client_ip=flow.client_ip, client_port=flow.client_port,
                                      vip=flow.vip, vport=flow.vport, peeked_len=self.peeked,
                                      state=state.to_bytes()))
        except Exception as e:
            self.handoff.handle(FeEvent.NOT_SENT)
            log.warning("back end %s: sending handoff failed: %s", self.backend.name, e)
            self._rollback()
            if not self.finished:
                self._next_candidate()
            return
        w.handoffs.sent(self.handoff, xid, link, self)
        w.handoff_deadline(xid)          # "timed out" (fail_handoff) unless answered within handofftimeout

    def _thaw(self) -> None:
        try:
            self.worker.batch.thaw(self.flow)
        except Exception as e:
            log.error("thawing %s:%d failed: %s", self.peer[0], self.peer[1], e)

    def _rollback(self) -> None:
        try:
            repair.resume(self.sock)
        except OSError as e:
            # The connection cannot be taken back: it is lost for this client.
            self._thaw()
            self._close(f"rollback failed: {e}")
            return
        self._thaw()

    def restored(self) -> None:
        """The back end rebuilt the connection (FORWARDING): steer the flow there and let go silently.

        Unless our socket took bytes in after its dump (repair.received_since: a segment that passed the
        freeze just before it took effect, which our kernel acknowledged to the client). The back end's
        copy lacks them and the client will not send them again: steered there, the connection would
        wait for ever (seen under load as an upload whose body never reached the application). It is
        taken back instead, as when the flow cannot be steered, whole, and handed to the same back end
        again (LATE_TRIES), then to the next candidate. The back end drops its first copy when the second
        Handoff's restore finds it on the same 4-tuple (tcpha.be.handoff.restore_handed_off)."""
        late = self._received_since_dump()
        if late:
            again = self.late_tries < LATE_TRIES
            self.late_tries += 1
            log.warning("%s:%d: back end %s did not take the connection: %d bytes reached this socket after its "
                        "dump (acknowledged to the client, not in its copy); taken back%s", self.peer[0],
                        self.peer[1], self.backend.name, late, ", handed to it again" if again else "")
            self._take_back(again=again)
            return
        self.worker.batch.forward(self)          # batched per loop iteration, like the freezes

    def _received_since_dump(self) -> int:
        try:
            return repair.received_since(self.sock, self.dumped) if self.dumped is not None else 0
        except OSError:
            return 0                             # the socket is gone: nothing to compare (and nothing lost)

    def _take_back(self, *, again: bool = False) -> None:
        """Keep the connection (the back end, which never gets Steered, drops its restored copy silently)
        and try the next candidate, or (`again`) the same back end once more."""
        self.worker.handoffs.forward_failed(self.handoff)
        self.link.handoff_over()
        self._rollback()
        if not self.finished:
            if again:
                self.next_index -= 1             # candidates[next_index - 1] is the back end just tried
            self._next_candidate()

    def forwarded(self, error: Exception | None) -> None:
        """Step 3 (the flow now goes to the back end): tell it, and let go of our socket silently."""
        w = self.worker
        if error is not None:
            log.error("forwarding %s:%d to %s failed: %s; taken back", self.peer[0], self.peer[1],
                      self.backend.name, error)
            self._take_back()
            return
        late = self._received_since_dump()
        if late:
            # after the check at Restored, before the flow went there: too late to take it back (the
            # entry steers it to the back end now). Never seen; logged so that it would be.
            log.error("%s:%d: %d bytes reached this socket after its dump and after the check at Restored; "
                      "the connection on %s lacks them", self.peer[0], self.peer[1], late, self.backend.name)
        self.dumped = None                       # its queues may be large: not kept for the rest of the flow
        w.handoffs.steered(self.handoff)
        if self.link.can_send:
            self.link.send(control.Steered(xid=self.handoff.xid))
        self.link.handoff_over()
        repair.discard(self.sock)
        self.finished = True
        self.backend.handoffs += 1
        w.stats.handoffs += 1
        w.ledger.handed_off(self, self.backend.name)     # counters, conn table, the per-handoff log line
        w.dispatch_done(self)

    def refused(self, reason: str) -> None:
        """The back end refused, the link dropped or the answer did not come in time (the state machine
        is back in ROUTING: FrontEndHandoffs.failed): take the connection back."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.link is not None:
            self.link.handoff_over()
        self.backend.refused += 1
        self.worker.stats.refused += 1
        self.worker.ledger.refused(self, self.backend.name, self.backend.name)
        log.warning("%s:%d: back end %s did not take the connection: %s", self.peer[0], self.peer[1],
                    self.backend.name, reason)
        self._rollback()
        if not self.finished:
            self._next_candidate()

    def _finish_local(self) -> None:
        w = self.worker
        self.sock.close()                     # our copy; the back end holds the other one
        self.finished = True
        w.stats.handoffs += 1
        w.ledger.handed_off(self, self.backend.name, outcome="passed")
        w.dispatch_done(self)

    # -- answering and closing here --------------------------------------------------------------
    def _answer(self, status: int, why: str) -> None:
        """Write an error answer, close our side, and drain the client until its FIN (or LINGER).

        Closing a socket with unread data makes the kernel send RST, which can destroy the answer
        before the client reads it; so the request is consumed, then FIN, then the client's FIN.
        """
        w = self.worker
        w.stats.answered[status] = w.stats.answered.get(status, 0) + 1
        w.ledger.answered(self, status, why)
        log.warning("%s:%d: %d: %s", self.peer[0], self.peer[1], status, why, extra={"ratekey": ("answer", status)})
        self._stop_reading()
        if self.timer is not None:
            self.timer.cancel()
        self._set_lowat(1)
        sock = self.sock
        try:
            self._drain()
            sock.send(error_response(status))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(None)
            return
        self.handoff.handle(FeEvent.ANSWER)
        self.finished = True
        w.dispatch_done(self)           # no longer counts against maxclients
        w.lingering[self.fd] = self
        w.loop.add_reader(self.fd, self._linger_readable)
        self.reading = True
        self.timer = w.loop.call_later(LINGER, self._linger_end)

    def _tls_refuse(self, why: str) -> None:
        """No rule for this TLS connection: a fatal handshake_failure alert (plaintext, as a server may
        send before its ServerHello, RFC 8446 6.2), then close. No HTTP answer is possible inside TLS."""
        w = self.worker
        log.warning("%s:%d: handshake_failure alert: %s", self.peer[0], self.peer[1], why)
        self._stop_reading()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._set_lowat(1)
        try:
            self._drain()                 # unread bytes would turn our close into an RST
            self.sock.send(HANDSHAKE_FAILURE_ALERT)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(None)
            return
        self.handoff.handle(FeEvent.ANSWER)
        self.finished = True
        w.dispatch_done(self)
        w.lingering[self.fd] = self
        w.loop.add_reader(self.fd, self._linger_readable)
        self.reading = True
        self.timer = w.loop.call_later(LINGER, self._linger_end)

    def _drain(self) -> bool:
        """Read and drop what the client sent; True on EOF."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                return True

    def _linger_readable(self) -> None:
        try:
            eof = self._drain()
        except OSError:
            eof = True
        if eof:
            self._linger_end()

    def _linger_end(self) -> None:
        self.worker.lingering.pop(self.fd, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._stop_reading()
        self.sock.close()

    def _close(self, why: str | None) -> None:
        if why:
            log.info("%s:%d: %s", self.peer[0], self.peer[1], why)
        self._stop_reading()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            self.sock.close()
        except OSError:
            pass
        if not self.handoff.final:
            self.handoff.handle(FeEvent.CLOSE)
        if not self.finished:
            self.finished = True
            self.worker.dispatch_done(self)
