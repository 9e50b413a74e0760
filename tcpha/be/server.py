"""tcpha-be: restores handed-off connections and relays them to the local application.

One asyncio loop, callbacks only:
- control listener on raddr:port: one authenticated ControlConnection per front-end connection.
  A connection that presents a wrong key, a malformed or a replayed message is logged and dropped
  before anything else happens: a forged Handoff never reaches repair.restore.
- Handoff(xid, state): refuse a state whose local address is not our VIP, restore the socket
  (TCP_REPAIR), connect to the application at redirectaddr:redirectport, answer Restored; then relay
  in the kernel (splice). If the application cannot be reached the restored socket is closed
  silently (repair mode) and the answer is Refused, so the front end can try another back end.
- UNIX listener (same-host front end): accepted client sockets arrive by SCM_RIGHTS and are relayed.
- When a relayed connection ends, FlowClosed goes back to the front end so that it removes the
  flow's steering entry (after a short delay: the client's last ACK must still reach us).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from tcpha import control, repair, sockdiag
from tcpha.be.relay import SpliceRelay
from tcpha.bpf.relay import choose_relay, relay_class
from tcpha.be.tls import TlsTermination

log = logging.getLogger("tcpha.be")

TCP_REPAIR = 19
# The client's final ACK (for our FIN) still travels through the front end's steering entry:
UNSENT_CLOSED_MAX = 65536   # FlowClosed kept while no front end is connected (beyond: the FE's timeout)
# FlowClosed is sent this long after the relay ended so that the entry outlives it.
FLOWCLOSED_DELAY = 0.5
# Longest wait for the front end's Steered. Without it the front end took the connection back (its
# handofftimeout expired before our Restored arrived) or died before steering the flow here: the
# restored socket is then closed silently, never released (two hosts answering one client would
# corrupt its stream). A front end that got Restored steers the flow within milliseconds.
STEER_WAIT = 5.0
NFT_TABLE = "tcpha_be"
# Header of a same-host fd-passing message: magic, listening port of the front end (for logs).
FDPASS_MAGIC = b"TCPHAFD1"
NOTICE = 25


def app_address(redirectaddr: str, redirectport: int) -> tuple[str, int]:
    """redirectaddr 0.0.0.0 (the default) means the application on this host."""
    host = redirectaddr or "0.0.0.0"
    if host in ("0.0.0.0", "*"):
        host = "127.0.0.1"
    return host, int(redirectport)


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def vip_held_elsewhere(vip: str) -> bool:
    """True when `vip` is an address of an interface other than lo (a front end on this host)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get_attr("IFA_ADDRESS") == vip and msg.get_attr("IFA_LABEL") != "lo":
                return True
    return False


def discard_silently(sock: socket.socket) -> None:
    """Close a restored socket without a FIN or RST reaching the client (repair mode close)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except OSError:
        pass
    sock.close()


@dataclass
class BackEndStats:
    handoffs: int = 0
    refused: int = 0
    fdpassed: int = 0
    control_errors: int = 0
    active: int = 0


def restore_handed_off(state: repair.TcpState,
                       release_own: Callable[[tuple[str, int], tuple[str, int]], bool] | None = None,
                       *, announce: bool = True) -> socket.socket:
    """repair.restore; when an earlier connection's socket on the same 4-tuple is in the way
    (EADDRNOTAVAIL: the client reuses its port while that socket lingers here), it goes first and the
    restore is tried again. `release_own(local, peer)` releases it when it is one of ours (a relay still
    holding it); any other socket is destroyed through the kernel (tcpha.sockdiag). `announce`: as in
    repair.restore (the back end announces the socket itself once the flow is steered here)."""
    try:
        return repair.restore(state, announce=announce)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        local, peer = (state.local[0], state.local[1]), (state.peer[0], state.peer[1])
        if release_own is not None and release_own(local, peer):
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
            "reuses its port", state.peer[0], state.peer[1], how)
    return repair.restore(state, announce=announce)


class ControlSession(asyncio.Protocol):
    """One control connection from a front end (server side)."""

    def __init__(self, backend: "BackEnd"):
        self.backend = backend
        self.conn = control.ControlConnection(backend.authkey, role="be")
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.unsteered: dict[int, tuple[SpliceRelay, asyncio.TimerHandle]] = {}
        self.node_id = ""                 # from the front end's Hello ("tcpha-fe health ..." for its checker)
        self._out: list[bytes] = []         # frames not written yet (see send)
        self._feeding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backend.sessions.add(self)
        log.debug("control connection from %s", self.peer)
        self.transport.write(self.conn.send(self.backend.greeting()))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            messages = self.conn.feed(data)
        except control.ControlError as e:
            self.backend.stats.control_errors += 1
            log.warning("control connection from %s dropped: %s", self.peer, e)
            self.abort()
            return
        self._feeding = True
        try:
            for msg in messages:
                try:
                    self.backend.on_message(self, msg)
                except Exception:                                     # never crash the daemon
                    log.exception("control message %s from %s failed", type(msg).__name__, self.peer)
        finally:
            self._feeding = False
            self.flush()

    def send(self, msg: Any) -> bool:
        """Queue msg's frame: the answers to the Handoffs of one read (and the FlowClosed of one loop
        iteration) leave in one write; each write is a trip through the TCP stack (~40 us here)."""
        if self.closed or self.transport is None:
            return False
        out = self._out
        out.append(self.conn.send(msg))
        if len(out) == 1 and not self._feeding:
            self.backend.loop.call_soon(self.flush)
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
        self.backend.sessions.discard(self)
        self.flush()
        self.closed = True
        for xid in list(self.unsteered):       # no Steered can come any more
            self.backend._not_steered(self, xid, "control connection closed before Steered")
        if self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self.backend.sessions.discard(self)
        for xid in list(self.unsteered):       # lost before Steered: the flow was not steered here
            self.backend._not_steered(self, xid, "control connection lost before Steered")
        log.debug("control connection from %s closed%s", self.peer, f": {exc}" if exc else "")


class FdPassSession:
    """A same-host front end passing accepted sockets over a UNIX seqpacket socket (SCM_RIGHTS)."""

    def __init__(self, backend: "BackEnd", sock: socket.socket):
        self.backend = backend
        self.sock = sock
        sock.setblocking(False)
        backend.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        from tcpha import fdpass
        while True:
            try:
                data, fds = fdpass.recv_fds(self.sock, 64, 1)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    return
                log.warning("fd-passing connection failed: %s", e)
                self.close()
                return
            if not data and not fds:
                self.close()
                return
            if not data.startswith(FDPASS_MAGIC):
                log.warning("fd-passing connection sent a malformed message; dropped")
                for fd in fds:
                    os.close(fd)
                self.close()
                return
            for fd in fds:
                self.backend.adopt_client(fd)

    def close(self) -> None:
        try:
            self.backend.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()


class BackEnd:
    """The back-end daemon. `kernel=False` skips VIP/ARP installation (tests that install it themselves)."""

    def __init__(self, config: Any, *, kernel: bool = True):
        self.config = config
        self.authkey: bytes = config.authkey
        self.vip: str = config.vaddr
        self.app_addr = app_address(config.redirectaddr, config.redirectport)
        self.lan_mac: str | None = None
        self.maxclients: int = config.maxclients
        self.unix_path: str | None = config.unixpath
        self.kernel = kernel
        self.loop: asyncio.AbstractEventLoop | None = None  # type: ignore[assignment]
        self.sessions: set[ControlSession] = set()
        self.unsent_closed: list[Any] = []        # FlowClosed that found no control connection
        self.relays: set[SpliceRelay] = set()
        self.relay_kind = "splice"                # relay = auto|bpf|splice, chosen in serve()
        self.stats = BackEndStats()
        self._server: asyncio.AbstractServer | None = None
        self._unix_listener: socket.socket | None = None
        self._stop: asyncio.Event | None = None
        self._kernel_state: list[Any] = []
        self.on_ready: Callable[[], None] | None = None
        # tlscert set: connections to a VIP port in tlsports are TLS-terminated here (tcpha.be.tls).
        self.tls: TlsTermination | None = None
        self.stopping = False                     # SIGTERM: handoffs refused, relays given `grace`
        self.metrics_server: Any = None

    # -- messages --------------------------------------------------------------------------------
    def greeting(self) -> Any:
        return control.Hello(node_id=f"tcpha-be {socket.gethostname()} pid {os.getpid()}",
                             addr=self.config.raddr, port=self.config.port, mac=self.lan_mac or "",
                             app_port=self.app_addr[1], vaddr=self.vip)

    def on_message(self, session: ControlSession, msg: Any) -> None:
        if isinstance(msg, control.Handoff):
            self.on_handoff(session, msg)
        elif isinstance(msg, control.Steered):
            self._steered(session, msg.xid)
        elif isinstance(msg, control.Hello):
            if msg.vaddr not in ("0.0.0.0", self.vip):
                log.warning("control connection from %s dropped: its VIP %s is not ours (%s)",
                            session.peer, msg.vaddr, self.vip)
                session.abort()
                return
            session.node_id = msg.node_id
            log.log(NOTICE, "front end %s (%s) connected", session.peer, msg.node_id)
            pending, self.unsent_closed = self.unsent_closed, []
            for closed in pending:
                session.send(closed)
        elif isinstance(msg, control.Ping):
            lookups, hits = self.tls.session_counters() if self.tls is not None else (0, 0)
            session.send(control.Pong(token=msg.token, session_lookups=lookups, session_hits=hits))
        else:
            log.debug("control message %s from %s ignored", type(msg).__name__, session.peer)

    def on_handoff(self, session: ControlSession, msg: Any) -> None:
        xid = msg.xid
        t0 = time.perf_counter()

        def refuse(reason: str) -> None:
            self.stats.refused += 1
            log.warning("handoff %d from %s refused: %s", xid, session.peer, reason)
            session.send(control.Refused(xid=xid, reason=reason))

        if self.stopping:
            return refuse("stopping")
        if len(self.relays) >= self.maxclients:
            return refuse(f"busy: {len(self.relays)} connections (maxclients)")
        try:
            state = repair.TcpState.from_bytes(msg.state)
        except Exception as e:
            return refuse(f"malformed TCP state: {e}")
        local_ip = state.local[0]
        if local_ip != self.vip:
            return refuse(f"local address {local_ip} is not this back end's VIP {self.vip}")
        if (state.peer[0], state.peer[1], state.local[1]) != (msg.client_ip, msg.client_port, msg.vport):
            return refuse("the TCP state does not match the handoff's flow")
        try:
            # Silent until Steered: a window probe now would draw the client's answer into the front
            # end's freeze (docs/kernel.md, "the freeze window").
            client = restore_handed_off(state, self._release_stale_relay, announce=False)
        except OSError as e:
            return refuse(f"restore failed: {e.strerror or e}")
        except Exception as e:
            return refuse(f"restore failed: {e}")
        peer = state.peer
        app = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        app.setblocking(False)
        rc = app.connect_ex(self.app_addr)
        if rc in (errno.EINPROGRESS, errno.EAGAIN) and _connected(app):
            rc = 0      # loopback: the handshake completed inside connect() itself
        if rc == 0:
            self._handoff_done(session, xid, client, app, peer, t0)
        elif rc in (errno.EINPROGRESS, errno.EAGAIN):
            # Localhost connects complete at once in practice; wait for writability otherwise.
            timer: asyncio.TimerHandle | None = None

            def connected() -> None:
                self.loop.remove_writer(app.fileno())
                if timer is not None:
                    timer.cancel()
                err = app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failed(os.strerror(err))
                else:
                    self._handoff_done(session, xid, client, app, peer, t0)

            def failed(why: str) -> None:
                try:
                    self.loop.remove_writer(app.fileno())
                except (ValueError, OSError):
                    pass
                app.close()
                discard_silently(client)
                refuse(f"application at {self.app_addr[0]}:{self.app_addr[1]} unreachable: {why}")

            self.loop.add_writer(app.fileno(), connected)
            timer = self.loop.call_later(1.0, failed, "connect timed out")
        else:
            app.close()
            discard_silently(client)
            refuse(f"application at {self.app_addr[0]}:{self.app_addr[1]} unreachable: {os.strerror(rc)}")

    def _handoff_done(self, session: ControlSession, xid: int, client: socket.socket,
                      app: socket.socket, peer: tuple[str, int], t0: float) -> None:
        app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session.send(control.Restored(xid=xid))
        self.stats.handoffs += 1
        if log.isEnabledFor(logging.INFO):
            log.info("handoff %d: %s:%d restored from %s in %.0f us", xid, peer[0], peer[1], session.peer,
                     (time.perf_counter() - t0) * 1e6)
        flow = (peer[0], peer[1], self.vip, client.getsockname()[1])
        relay = self._relay(client, app, lambda r: self._flow_closed(session, flow, r, xid), hold_down=True)
        # Nothing goes to the client before the front end says the flow is steered here (Steered):
        # until then the client's ACKs would hit the front end's freeze and we would wait an RTO.
        timer = self.loop.call_later(STEER_WAIT, self._not_steered, session, xid, "no Steered within "
                                     f"{STEER_WAIT:g} s")
        session.unsteered[xid] = (relay, timer)

    def _release_stale_relay(self, local: tuple[str, int], peer: tuple[str, int]) -> bool:
        """A relay of ours still holds a client socket on this 4-tuple (its client's last packets never
        came: they went to the front end after the flow's entry was gone). The client has started a new
        connection from the same port, so that one is dead: close it silently, without FlowClosed (which
        would now remove the *new* flow's steering entry)."""
        for relay in list(self.relays):
            sock = getattr(relay, "client", None) or getattr(relay, "sock", None)
            try:
                if sock is None or sock.getpeername()[:2] != peer or sock.getsockname()[:2] != local:
                    continue
            except OSError:
                continue
            relay.discarded = True
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)   # close without FIN or RST
            except OSError:
                pass
            relay.close()
            return True
        return False

    def _steered(self, session: ControlSession, xid: int) -> None:
        entry = session.unsteered.pop(xid, None)
        if entry is None:
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

    def _not_steered(self, session: ControlSession, xid: int, why: str) -> None:
        entry = session.unsteered.pop(xid, None)
        if entry is None:
            return
        relay, timer = entry
        timer.cancel()
        log.warning("handoff %d from %s: %s; the restored connection is dropped silently (the front end "
                    "kept it)", xid, session.peer, why)
        relay.discarded = True                       # no FlowClosed: the flow was never steered here
        client = getattr(relay, "client", None) or getattr(relay, "sock", None)
        if client is not None:
            try:
                client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)   # close without FIN or RST
            except OSError:
                pass
        relay.close()

    def _relay(self, client: socket.socket, app: socket.socket,
               on_done: Callable[[SpliceRelay], None], *, hold_down: bool = False) -> SpliceRelay:
        if self.tls is not None and self.tls.wants(client):
            relay: Any = self.tls.relay(self.loop, client, app, on_done)
        else:
            relay = relay_class(self.relay_kind)(self.loop, client, app, on_done)
        relay.started = time.monotonic()     # for the conn table's age  # type: ignore[attr-defined]
        self.relays.add(relay)
        self.stats.active = len(self.relays)
        relay.start(hold_down=hold_down)
        return relay

    def _flow_closed(self, session: ControlSession, flow: tuple[str, int, str, int], relay: SpliceRelay,
                     xid: int = 0) -> None:
        self.relays.discard(relay)
        self.stats.active = len(self.relays)
        if getattr(relay, "discarded", False):
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("flow %s:%d closed (up %d, down %d bytes)%s", flow[0], flow[1], relay.bytes_up,
                      relay.bytes_down, f": {relay.error}" if relay.error else "")
        self.loop.call_later(FLOWCLOSED_DELAY, self._send_flow_closed, session, flow, xid)

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

    # -- same-host sockets ----------------------------------------------------------------------
    def adopt_client(self, fd: int) -> None:
        try:
            client = socket.socket(fileno=fd)
        except OSError as e:
            log.warning("passed fd %d unusable: %s", fd, e)
            os.close(fd)
            return
        if len(self.relays) >= self.maxclients:
            log.warning("passed connection dropped: busy (maxclients %d)", self.maxclients)
            client.close()
            return
        app = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            app.settimeout(1.0)     # loopback connect: immediate, or refused at once
            app.connect(self.app_addr)
        except OSError as e:
            log.warning("passed connection dropped: application at %s:%d unreachable: %s",
                        *self.app_addr, e)
            app.close()
            client.close()
            return
        app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.fdpassed += 1
        self._relay(client, app, self._fd_relay_done)

    def _fd_relay_done(self, relay: SpliceRelay) -> None:
        self.relays.discard(relay)
        self.stats.active = len(self.relays)

    def _accept_unix(self) -> None:
        assert self._unix_listener is not None
        while True:
            try:
                sock, _ = self._unix_listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("UNIX accept failed: %s", e)
                return
            # Only root or our own user may hand us sockets.
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                log.warning("fd-passing connection from uid %d refused", uid)
                sock.close()
                continue
            FdPassSession(self, sock)

    # -- kernel state ----------------------------------------------------------------------------
    def install_kernel_state(self) -> None:
        """The VIP as a /32 on lo, and ARP filtering so that this host never answers for it."""
        from tcpha import steering
        from tcpha.fe.arbiter import interface_holding
        ifname = self.config.interface
        if not ifname or ifname == "auto":
            ifname = interface_holding(self.config.raddr)
        try:
            with open(f"/sys/class/net/{ifname}/address") as f:
                self.lan_mac = f.read().strip()
        except OSError:
            self.lan_mac = None
        arp = steering.ArpFilter(self.vip, ifname, table=NFT_TABLE)
        arp.install()              # before the VIP: never a moment where it could be answered
        self._kernel_state.append(arp)
        vip = steering.VipAddress(self.vip, "lo", prefixlen=32)
        vip.add()
        self._kernel_state.append(vip)
        log.log(NOTICE, "kernel state installed: VIP %s on lo, ARP filtered on %s", self.vip, ifname)

    def remove_kernel_state(self) -> None:
        while self._kernel_state:
            obj = self._kernel_state.pop()
            try:
                obj.remove()
            except Exception as e:
                log.error("removing %s failed: %s", type(obj).__name__, e)

    # -- life cycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """Install the kernel state, serve until SIGTERM/SIGINT, remove the kernel state.

        Netlink work (pyroute2) happens outside the event loop: pyroute2 0.9's synchronous API
        refuses to run inside a running asyncio loop.
        """
        if self.kernel and (self.unix_path or vip_held_elsewhere(self.vip)):
            # A back end with a UNIX socket shares its host with a front end (that is what the
            # socket is for), which holds the VIP on its LAN interface: the passed sockets are
            # already bound to it. Adding the VIP to lo and filtering its ARP here would break
            # that front end, whichever of the two starts first.
            log.log(NOTICE, "a front end shares this host (unixpath set, or the VIP %s on a LAN "
                    "interface): VIP and ARP filtering left to it", self.vip)
            self.kernel = False
        self.tls = TlsTermination.from_config(self.config)     # before any kernel state: may fail
        if self.kernel:
            self.install_kernel_state()
        try:
            profile = os.environ.get("TCPHA_PROFILE")       # bench/handoff: where the CPU goes
            if profile:
                import cProfile
                prof = cProfile.Profile()
                try:
                    prof.runcall(asyncio.run, self.serve())
                finally:
                    prof.dump_stats(f"{profile}.be.{os.getpid()}")
            else:
                asyncio.run(self.serve())
        finally:
            if self.kernel:
                self.remove_kernel_state()

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            host = self.config.raddr
            self._server = await self.loop.create_server(lambda: ControlSession(self), host,
                                                         self.config.port, reuse_address=True,
                                                         backlog=1024)
            log.info("listening for front ends on %s:%d; application at %s:%d; VIP %s",
                     host, self.config.port, *self.app_addr, self.vip)
            self.relay_kind, why = choose_relay(self.config.relay)
            log.log(NOTICE, "relay: %s (%s)", self.relay_kind, why)
            if self.unix_path:
                self._listen_unix(self.unix_path)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self.stop)
            # Control directory (sys/unload, sys/dbglevel, conn) and dregister (docs/operations.md).
            from tcpha.be.runtime import start_be_runtime, start_registrar
            self.runtime = start_be_runtime(self)
            self.registrar = start_registrar(self)
            if self.runtime is not None:
                self.runtime.registrar = self.registrar
            await self._start_metrics()
            if self.on_ready is not None:
                self.on_ready()
            await self._stop.wait()
            await self._finish_relays()
        finally:
            await self._shutdown()

    async def _start_metrics(self) -> None:
        """``metrics = [ADDR:]PORT``: a Prometheus endpoint with this back end's counters (as the front end's)."""
        if self.config.metrics is None:
            return
        from tcpha.metrics import MetricsServer
        self.metrics_server = MetricsServer(tuple(self.config.metrics), self.metrics_text)
        try:
            await self.metrics_server.start()
        except OSError as e:
            log.error("metrics endpoint %s:%d: %s", *self.config.metrics, e.strerror or e)
            self.metrics_server = None

    def metrics_text(self) -> str:
        from tcpha.metrics import backend_exposition
        s = self.stats
        registrar = getattr(self, "registrar", None)
        return backend_exposition(handoffs=s.handoffs, refused=s.refused, fdpassed=s.fdpassed,
                                  control_errors=s.control_errors, relayed=len(self.relays),
                                  front_ends=len(self.sessions),
                                  registered=None if registrar is None else bool(registrar.registered))

    async def _finish_relays(self) -> None:
        """SIGTERM / unload: take no new connections (unregistered, the control port closed, a Handoff on a
        connection still open refused so that the front end tries its next back end, its health checks
        disconnected so that it marks us down), and let the connections being relayed end by themselves
        for up to ``grace`` seconds; a second SIGTERM ends the wait. What is left is then closed."""
        self.stopping = True
        if getattr(self, "registrar", None) is not None:
            await self.registrar.stop()               # Unregister: the front end stops sending at once
            self.registrar = None
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            if str(getattr(session, "node_id", "")).startswith("tcpha-fe health"):
                session.close()
        grace = self.config.grace
        if not self.relays or grace <= 0:
            log.info("stopping: %d connections relayed still open", len(self.relays))
            return
        log.log(NOTICE, "stopping: waiting up to %g s for %d relayed connections to end", grace, len(self.relays))
        self._stop = asyncio.Event()                  # set again by a second SIGTERM
        deadline = self.loop.time() + grace
        while self.relays and not self._stop.is_set():
            left = deadline - self.loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._stop.wait(), min(0.1, left))
            except asyncio.TimeoutError:
                pass
        if self.relays:
            log.warning("stopping: %d relayed connections still open after %s; closed",
                        len(self.relays), "a second signal" if self._stop.is_set() else f"grace ({grace:g} s)")
        else:
            log.log(NOTICE, "stopping: every relayed connection has ended")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _listen_unix(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # SOCK_SEQPACKET: one message per handed socket, boundaries kept (no framing to get wrong).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(64)
        s.setblocking(False)
        self._unix_listener = s
        self.loop.add_reader(s.fileno(), self._accept_unix)
        log.info("accepting same-host sockets on unix:%s", path)

    async def _shutdown(self) -> None:
        if getattr(self, "registrar", None) is not None:
            await self.registrar.stop()               # Unregister: the front end stops sending at once
        if getattr(self, "runtime", None) is not None:
            self.runtime.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.abort()
        if self._unix_listener is not None:
            try:
                self.loop.remove_reader(self._unix_listener.fileno())
            except (ValueError, OSError):
                pass
            self._unix_listener.close()
            try:
                os.unlink(self.unix_path)  # type: ignore[arg-type]
            except OSError:
                pass
        for r in list(self.relays):
            r.close()

