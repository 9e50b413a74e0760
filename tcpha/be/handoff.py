"""The back end's side of a handoff: the control sessions from front ends and what a Handoff sets off.

- ControlSession: one authenticated control connection (tcpha.control.ControlConnection, role "be").
  A connection that presents a wrong key, a malformed or a replayed message is logged and dropped
  before anything else happens: a forged Handoff never reaches repair.restore.
- HandoffReceiver.on_handoff: refuse a state whose local address is not our VIP, restore the socket
  (restore_handed_off: TCP_REPAIR, an earlier socket on the same 4-tuple moved out of the way),
  connect to the application at redirectaddr:redirectport (from the client's address when
  transparent, tcpha.be.appsource; with a PROXY header first when appproxy is set), answer Restored;
  the back end relays in the kernel (splice). If the application cannot be reached the restored socket
  is closed silently (repair mode) and the answer is Refused, so the front end can try another back end.
- Waiting for Steered: nothing goes to the client until the front end says the flow is steered here;
  without Steered within STEER_WAIT the restored socket is dropped silently. Which handoffs of a
  session wait for Steered, relay or are over is its BackEndHandoffs (tcpha.control.handoff, the back
  end's view of the handoff state machine): ControlSession.handoffs.
- The FlowClosed queue: when a relayed connection ends, FlowClosed goes back to the front end so that
  it removes the flow's steering entry (after FLOWCLOSED_DELAY: the client's last ACK must still reach
  us); with no front end connected it waits for the next Hello.
"""

from __future__ import annotations

import asyncio
import errno
import re
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

from tcpha import control, repair, sockdiag
from tcpha.be.appsource import send_proxy_header
from tcpha.be.rehandoff import RehandoffRelay
from tcpha.control.handoff import BackEndHandoffs
from tcpha.loglevels import NOTICE
from tcpha.relay import SpliceRelay
from tcpha.sniff.rulecheck import StayRules

if TYPE_CHECKING:
    from tcpha.be.server import BackEnd

log = logging.getLogger("tcpha.be")

# The client's final ACK (for our FIN) still travels through the front end's steering entry:
UNSENT_CLOSED_MAX = 65536   # FlowClosed kept while no front end is connected (beyond: the FE's timeout)
# FlowClosed is sent this long after the relay ended so that the entry outlives it.
FLOWCLOSED_DELAY = 0.5
# Longest wait for the front end's Steered. Without it the front end took the connection back (its
# handofftimeout expired before our Restored arrived) or died before steering the flow here: the
# restored socket is then closed silently, never relayed (two hosts answering one client would
# corrupt its stream). A front end that got Restored steers the flow within milliseconds.
STEER_WAIT = 5.0
# rehandoff: a MoveAsk unanswered (MoveFrozen / MoveRefused) for this long: the connection stays here
# (generous: the client waits for its response either way, and a busy front end answers late).
MOVE_WAIT = 10.0


def backend_hello(config: Any, *, mac: str | None, app_port: int) -> control.Hello:
    """The back end's Hello, on its control sessions and on its registration (tcpha.be.registrar): who it
    is, where it listens for front ends, its LAN MAC, the application's port and its VIP."""
    return control.Hello(node_id=f"tcpha-be {socket.gethostname()} pid {os.getpid()}",
                         addr=config.raddr, port=config.port, mac=mac or "", app_port=app_port,
                         vaddr=config.vaddr)


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def discard_silently(sock: socket.socket) -> None:
    """Close a restored socket without a FIN or RST reaching the client (repair mode close)."""
    try:
        repair.silence(sock)
    except OSError:
        pass
    sock.close()


def discard_relay_silently(relay: SpliceRelay) -> None:
    """Close a relay whose client connection is not ours (any more) without a FIN or RST reaching the
    client, and without a FlowClosed (`discarded`): the flow is not, or no longer, steered here."""
    relay.discarded = True
    client = getattr(relay, "client", None) or getattr(relay, "sock", None)
    if client is not None:
        try:
            repair.silence(client)
        except OSError:
            pass
    relay.close()


def restore_handed_off(state: repair.TcpState,
                       discard_own: Callable[[tuple[str, int], tuple[str, int]], bool] | None = None,
                       *, announce: bool = True) -> socket.socket:
    """repair.restore; when an earlier connection's socket on the same 4-tuple is in the way
    (EADDRNOTAVAIL: the client reuses its port while that socket lingers here, or the front end took a
    handoff back and hands the same connection here again while its first copy waits for Steered), it
    goes first and the restore is tried again. `discard_own(local, peer)` closes it silently when it is one of ours (a
    relay still holding it); any other socket is destroyed through the kernel (tcpha.sockdiag).
    `announce`: as in repair.restore (the back end announces the socket itself once the flow is steered
    here)."""
    try:
        return repair.restore(state, announce=announce)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        local, peer = (state.local[0], state.local[1]), (state.peer[0], state.peer[1])
        if discard_own is not None and discard_own(local, peer):
            how = "released (its relay ended, no FlowClosed: the 4-tuple is the new connection's now)"
        else:
            try:
                if not sockdiag.destroy(local, peer):
                    raise
            except OSError as de:
                if de is e:
                    raise
                log.warning("restore %s:%d: a socket is in the way and cannot be destroyed: %s", peer[0],
                            peer[1], de.strerror or de)
                raise e from None
            how = "destroyed"
    log.log(NOTICE, "restore %s:%d: the socket of an earlier connection on this 4-tuple %s: the client "
            "reuses its port (or the front end hands this connection again)", state.peer[0], state.peer[1], how)
    return repair.restore(state, announce=announce)


class ControlSession(asyncio.Protocol):
    """One control connection from a front end (server side)."""

    def __init__(self, receiver: HandoffReceiver):
        self.receiver = receiver
        self.conn = control.ControlConnection(receiver.backend.authkey, role="be")
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        # The handoffs restored from this front end, waiting for its Steered (with their relay, held,
        # and the STEER_WAIT timer) or relaying (tcpha.control.handoff: the back end's view).
        self.handoffs: BackEndHandoffs[tuple[SpliceRelay, asyncio.TimerHandle]] = BackEndHandoffs()
        self.node_id = ""                 # from the front end's Hello ("tcpha-fe health ..." for its checker)
        # rehandoff: the front end's rules (its Rules message; None: its connections never move), and the
        # relays whose MoveAsk waits for an answer, by xid, with their MOVE_WAIT timer.
        self.stay_rules: StayRules | None = None
        self.moving: dict[int, tuple[RehandoffRelay, asyncio.TimerHandle]] = {}
        self._out: list[bytes] = []         # frames not written yet (see send)
        self._feeding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.receiver.sessions.add(self)
        log.debug("control connection from %s", self.peer)
        self.transport.write(self.conn.send(self.receiver.greeting()))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            messages = self.conn.feed(data)
        except control.ControlError as e:
            self.receiver.backend.stats.control_errors += 1
            log.warning("control connection from %s dropped: %s", self.peer, e)
            self.abort()
            return
        self._feeding = True
        try:
            for msg in messages:
                try:
                    self.receiver.on_message(self, msg)
                except Exception:                                     # never crash the daemon
                    log.exception("control message %s from %s failed", type(msg).__name__, self.peer)
        finally:
            self._feeding = False
            self.flush()

    def send(self, msg: Any) -> bool:
        """Queue msg's frame: the answers to the Handoffs of one read (and the FlowClosed of one loop
        iteration) leave in one write; each write is a trip through the TCP stack (~40 us here).
        False (nothing queued) on a closed session, and on one whose front end's Hello has not come yet:
        a FlowClosed looking for any session must not pick it (there is no key to sign with yet)."""
        if self.closed or self.transport is None or not self.conn.ready:
            return False
        out = self._out
        out.append(self.conn.send(msg))
        if len(out) == 1 and not self._feeding:
            self.receiver.backend.loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    def close(self) -> None:
        """Close after what is queued is written (a reload closes the front end's health connections)."""
        if not self.closed:
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        """The front end half-closed after its last frame (tcpha.fe.backends.ControlLink.close): all
        it sent has been handled; nothing more goes to it (FlowClosed reports take another control
        connection) and we close our side, which it waits for."""
        self.receiver.sessions.discard(self)
        self.flush()
        self.closed = True
        for xid in self.handoffs.unsteered():  # no Steered can come any more
            self.receiver.not_steered(self, xid, "control connection closed before Steered")
        if self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self.receiver.sessions.discard(self)
        for xid in self.handoffs.unsteered():  # lost before Steered: the flow was not steered here
            self.receiver.not_steered(self, xid, "control connection lost before Steered")
        log.debug("control connection from %s closed%s", self.peer, f": {exc}" if exc else "")


class HandoffReceiver:
    """What the back end does with the messages of its control sessions: Hello, Ping, Handoff (restore,
    connect to the application, Restored or Refused), Steered; and the FlowClosed reports."""

    def __init__(self, backend: BackEnd):
        self.backend = backend
        self.sessions: set[ControlSession] = set()
        self.unsent_closed: list[Any] = []        # FlowClosed that found no control connection

    def close_health_sessions(self) -> None:
        """Close the front ends' health-check connections (they carry no handoffs): at a stop, so that the
        front end marks us down; at a reload that moves the application, so that it reads the new port."""
        for session in list(self.sessions):
            if str(getattr(session, "node_id", "")).startswith("tcpha-fe health"):
                session.close()

    # -- messages --------------------------------------------------------------------------------
    def greeting(self) -> Any:
        be = self.backend
        return backend_hello(be.config, mac=be.lan_mac, app_port=be.app_addr[1])

    def on_message(self, session: ControlSession, msg: Any) -> None:
        if isinstance(msg, control.Handoff):
            self.on_handoff(session, msg)
        elif isinstance(msg, control.Steered):
            self._steered(session, msg.xid)
        elif isinstance(msg, control.Hello):
            if msg.vaddr not in ("0.0.0.0", self.backend.vip):
                log.warning("control connection from %s dropped: its VIP %s is not ours (%s)",
                            session.peer, msg.vaddr, self.backend.vip)
                session.abort()
                return
            session.node_id = msg.node_id
            log.log(NOTICE, "front end %s (%s) connected", session.peer, msg.node_id)
            pending, self.unsent_closed = self.unsent_closed, []
            for closed in pending:
                session.send(closed)
        elif isinstance(msg, control.Rules):
            try:
                session.stay_rules = StayRules(msg.rules, msg.here) if msg.rules else None
            except (ValueError, re.error) as e:
                session.stay_rules = None
                log.warning("rules from %s not usable, its connections stay where they are: %s", session.peer, e)
        elif isinstance(msg, control.MoveFrozen):
            self._move_frozen(session, msg.xid)
        elif isinstance(msg, control.MoveRefused):
            entry = session.moving.pop(msg.xid, None)
            if entry is not None:
                entry[1].cancel()
                entry[0].keep(f"front end refused the move: {msg.reason}")
        elif isinstance(msg, control.Ping):
            lookups, hits = self.backend.tls.session_counters() if self.backend.tls is not None else (0, 0)
            session.send(control.Pong(token=msg.token, session_lookups=lookups, session_hits=hits))
        else:
            log.debug("control message %s from %s ignored", type(msg).__name__, session.peer)

    def on_handoff(self, session: ControlSession, msg: Any) -> None:
        xid = msg.xid
        t0 = time.perf_counter()

        def refuse(reason: str) -> None:
            self.backend.stats.refused += 1
            log.warning("handoff %d from %s refused: %s", xid, session.peer, reason)
            session.send(control.Refused(xid=xid, reason=reason))

        if self.backend.stopping:
            return refuse("stopping")
        if len(self.backend.relays) >= self.backend.maxclients:
            return refuse(f"busy: {len(self.backend.relays)} connections (maxclients)")
        if session.handoffs.state(xid) is not None:     # the front end gives each id once
            return refuse(f"handoff id {xid} is already in use on this connection")
        try:
            state = repair.TcpState.from_bytes(msg.state)
        except Exception as e:
            return refuse(f"malformed TCP state: {e}")
        local_ip = state.local[0]
        if local_ip != self.backend.vip:
            return refuse(f"local address {local_ip} is not this back end's VIP {self.backend.vip}")
        if (state.peer[0], state.peer[1], state.local[1]) != (msg.client_ip, msg.client_port, msg.vport):
            return refuse("the TCP state does not match the handoff's flow")
        try:
            # Silent until Steered: a window probe now would draw the client's answer into the front
            # end's freeze (docs/kernel.md, "the freeze window").
            client = restore_handed_off(state, self._discard_stale_relay, announce=False)
        except OSError as e:
            return refuse(f"restore failed: {e.strerror or e}")
        except Exception as e:
            return refuse(f"restore failed: {e}")
        peer = state.peer
        app_addr = self.backend.app_addr
        # From the client's address and port when transparent (tcpha.be.appsource), else our own.
        app, rc = self.backend.appsource.connect((peer[0], peer[1]), app_addr)
        if rc in (errno.EINPROGRESS, errno.EAGAIN) and _connected(app):
            rc = 0      # loopback: the handshake completed inside connect() itself
        vip = (state.local[0], state.local[1])
        if rc == 0:
            self._handoff_done(session, xid, client, app, peer, vip, t0)
        elif rc in (errno.EINPROGRESS, errno.EAGAIN):
            # Localhost connects complete at once in practice; wait for writability otherwise.
            timer: asyncio.TimerHandle | None = None

            def connected() -> None:
                self.backend.loop.remove_writer(app.fileno())
                if timer is not None:
                    timer.cancel()
                err = app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failed(os.strerror(err))
                else:
                    self._handoff_done(session, xid, client, app, peer, vip, t0)

            def failed(why: str) -> None:
                try:
                    self.backend.loop.remove_writer(app.fileno())
                except (ValueError, OSError):
                    pass
                app.close()
                discard_silently(client)
                refuse(f"application at {app_addr[0]}:{app_addr[1]} unreachable: {why}")

            self.backend.loop.add_writer(app.fileno(), connected)
            timer = self.backend.loop.call_later(1.0, failed, "connect timed out")
        else:
            app.close()
            discard_silently(client)
            refuse(f"application at {app_addr[0]}:{app_addr[1]} unreachable: {os.strerror(rc)}")

    def _handoff_done(self, session: ControlSession, xid: int, client: socket.socket,
                      app: socket.socket, peer: tuple[str, int], vip: tuple[str, int], t0: float) -> None:
        app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proxy = self.backend.config.appproxy
        if proxy != "off":
            # The client's and the VIP's addresses, before any byte of the client's (appproxy).
            try:
                send_proxy_header(app, proxy, (peer[0], peer[1]), vip)
            except OSError as e:
                app.close()
                discard_silently(client)
                self.backend.stats.refused += 1
                log.warning("handoff %d from %s refused: PROXY header to the application: %s", xid, session.peer,
                            e.strerror or e)
                session.send(control.Refused(xid=xid, reason=f"PROXY header not written: {e.strerror or e}"))
                return
        session.send(control.Restored(xid=xid))
        self.backend.stats.handoffs += 1
        if log.isEnabledFor(logging.INFO):
            log.info("handoff %d: %s:%d restored from %s in %.0f us", xid, peer[0], peer[1], session.peer,
                     (time.perf_counter() - t0) * 1e6)
        flow = (peer[0], peer[1], self.backend.vip, client.getsockname()[1])
        make = None
        rules = session.stay_rules
        if rules is not None and not (self.backend.tls is not None and self.backend.tls.wants(client)):
            make = self._rehandoff_relay(session, xid, flow, rules)
        relay = self.backend.start_relay(client, app, lambda r: self._flow_closed(session, flow, r, xid),
                                         hold_down=True, make=make)
        # Nothing goes to the client before the front end says the flow is steered here (Steered):
        # until then the client's ACKs would hit the front end's freeze and we would wait an RTO.
        timer = self.backend.loop.call_later(STEER_WAIT, self.not_steered, session, xid,
                                             f"no Steered within {STEER_WAIT:g} s")
        session.handoffs.restored(xid, (relay, timer))

    # -- rehandoff: moving a keep-alive connection (docs/kernel.md) ------------------------------
    def _rehandoff_relay(self, session: ControlSession, xid: int, flow: tuple[str, int, str, int],
                         rules: StayRules) -> Callable[..., RehandoffRelay]:
        first = [True]

        def stays(head: Any) -> bool:
            # The front end routed the first request itself (with health and fallbacks): it stays.
            if first[0]:
                first[0] = False
                return True
            return rules.stays(head)

        def make(loop: asyncio.AbstractEventLoop, client: socket.socket, app: socket.socket,
                 on_done: Callable[..., None]) -> RehandoffRelay:
            return RehandoffRelay(loop, client, app, on_done, stays=stays,
                                  on_move=lambda relay: self._ask_move(session, xid, flow, relay))
        return make

    def _ask_move(self, session: ControlSession, xid: int, flow: tuple[str, int, str, int],
                  relay: RehandoffRelay) -> None:
        if session.closed or not session.send(control.MoveAsk(xid=xid, client_ip=flow[0], client_port=flow[1],
                                                              vip=flow[2], vport=flow[3])):
            relay.keep("no control connection to the front end that sent it")
            return
        timer = self.backend.loop.call_later(MOVE_WAIT, self._move_unanswered, session, xid)
        session.moving[xid] = (relay, timer)

    def _move_unanswered(self, session: ControlSession, xid: int) -> None:
        entry = session.moving.pop(xid, None)
        if entry is not None:
            entry[0].keep(f"no answer to MoveAsk within {MOVE_WAIT:g} s")

    def _move_frozen(self, session: ControlSession, xid: int) -> None:
        entry = session.moving.pop(xid, None)
        if entry is None:
            session.send(control.Moved(xid=xid, state=b"", reason="no move pending"))
            return
        relay, timer = entry
        timer.cancel()
        if relay.closed:
            session.send(control.Moved(xid=xid, state=b"", reason="the connection ended"))
            return
        try:
            state = relay.frozen()
        except OSError as e:
            session.send(control.Moved(xid=xid, state=b"", reason=f"dump failed: {e}"))
            relay.keep(f"dump failed: {e}")
            return
        self.backend.stats.moved_away += 1
        session.send(control.Moved(xid=xid, state=state))

    def _discard_stale_relay(self, local: tuple[str, int], peer: tuple[str, int]) -> bool:
        """A relay of ours still holds a client socket on this 4-tuple (its client's last packets never
        came: they went to the front end after the flow's entry was gone). The client has started a new
        connection from the same port, so that one is dead: close it silently, without FlowClosed (which
        would now remove the *new* flow's steering entry)."""
        for relay in list(self.backend.relays):
            sock = getattr(relay, "client", None) or getattr(relay, "sock", None)
            try:
                if sock is None or sock.getpeername()[:2] != peer or sock.getsockname()[:2] != local:
                    continue
            except OSError:
                continue
            discard_relay_silently(relay)
            return True
        return False

    def _steered(self, session: ControlSession, xid: int) -> None:
        entry = session.handoffs.steered(xid)
        if entry is None:                 # not waiting: unknown, or given up (no Steered in time)
            return
        relay, timer = entry
        timer.cancel()
        relay.release()
        # The client's packets reach us from now on: prompt it instead of waiting for its timers. Its
        # immediate ACK tells our socket where it stands, and a client that waited for the receive
        # window (persist mode, backed off) sends at once.
        client = getattr(relay, "client", None) or getattr(relay, "sock", None)
        if client is not None and not relay.closed:
            try:
                repair.announce(client)
            except OSError as e:
                log.debug("handoff %d: window probe after Steered failed: %s", xid, e)

    def not_steered(self, session: ControlSession, xid: int, why: str) -> None:
        entry = session.handoffs.not_steered(xid)
        if entry is None:                 # Steered came first
            return
        relay, timer = entry
        timer.cancel()
        log.warning("handoff %d from %s: %s; the restored connection is dropped silently (the front end "
                    "kept it)", xid, session.peer, why)
        discard_relay_silently(relay)                # no FlowClosed: the flow was never steered here

    def _flow_closed(self, session: ControlSession, flow: tuple[str, int, str, int], relay: SpliceRelay,
                     xid: int = 0) -> None:
        self.backend.relay_ended(relay)
        if xid and session.handoffs.state(xid) is not None:
            # RELAYING -> CLOSED; a relay that ended before Steered waits for it (ENDED_UNSTEERED)
            session.handoffs.flow_closed(xid)
        if getattr(relay, "discarded", False):
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("flow %s:%d closed (up %d, down %d bytes)%s", flow[0], flow[1], relay.bytes_up,
                      relay.bytes_down, f": {relay.error}" if relay.error else "")
        self.backend.loop.call_later(FLOWCLOSED_DELAY, self._send_flow_closed, session, flow, xid)

    def _send_flow_closed(self, session: ControlSession, flow: tuple[str, int, str, int], xid: int = 0) -> None:
        # xid: the front end keeps the flow's entry if it now belongs to another handoff (a client
        # reusing its port within FLOWCLOSED_DELAY).
        msg = control.FlowClosed(client_ip=flow[0], client_port=flow[1], vip=flow[2], vport=flow[3], xid=xid)
        if session.send(msg):
            return
        # The session that delivered the flow is gone: any control connection reaches a front end
        # that shares the steering table (workers of one tcpha-fe).
        for other in list(self.sessions):
            if other.send(msg):
                return
        # No front end connected at all (its only worker died and the new one is not connected yet):
        # kept for the next front end that says Hello, so that its steering entry and `conn` row go now
        # rather than at the front end's flowtimeout.
        if len(self.unsent_closed) < UNSENT_CLOSED_MAX:
            self.unsent_closed.append(msg)
        log.debug("FlowClosed for %s:%d queued: no control connection", flow[0], flow[1])
