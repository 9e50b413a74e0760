"""TLS termination on the back end: handed-off connections to a VIP port in `tlsports` are decrypted
here and the plaintext relayed to the application at redirectaddr:redirectport (any unmodified HTTP
server), with the TLS sessions kept in the shared distcache session cache (tcpha.tls.share_sessions).

The front end hands the connection over *before* the handshake (it only peeked at the ClientHello,
which is still in the restored socket's receive queue), so the whole handshake happens here.

Why in the back end's event loop rather than a thread per connection: the relay is a few callbacks
per readiness event, like the splice relay; a handshake costs ~1-3 ms of CPU either way (the GIL
serialises OpenSSL calls made from Python threads as well, apart from the crypto itself), and a thread
per connection would add a thread start (~60 us) and two context switches per record. The session
cache lookup is synchronous inside the handshake (OpenSSL's get callback), bounded by the shim's
timeout and its circuit breaker, so a dead cache costs at most one timeout per retry interval.

    TlsTermination.from_config(cfg)  -> None (tlscert unset) or the context + ports
    termination.wants(sock)          -> is this connection's local port one of tlsports
    termination.relay(loop, client, app, on_done) -> TlsRelay (start / release / close like SpliceRelay)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

from tcpha.distcache.tls import ClientTls, TlsError, TlsOptions
from tcpha.loglevels import NOTICE
from tcpha.relay import close_sockets
from tcpha.tls import posted_operations, session_cache_stats, share_sessions
from tcpha.tls.sharing import PostedOperations

log = logging.getLogger("tcpha.be.tls")

HANDSHAKE_TIMEOUT = 10.0     # a client that does not finish its handshake in this time is dropped
CACHE_LOOKUP_TIMEOUT = 0.2   # seconds: bound of one session cache operation (it runs mid-handshake)
STORE_WAIT = CACHE_LOOKUP_TIMEOUT   # seconds a handshake's last flight may wait for its session's ADD
BUFFER_LIMIT = 256 * 1024    # bytes buffered per direction before we stop reading that side
RECV_SIZE = 65536
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class TlsSetupError(Exception):
    """The TLS settings cannot be used (certificate, key); str(e) is one line."""


# The sessioncache* settings and the distcache tools' options they mirror (stunnel's words).
_CACHE_TLS_SETTINGS = {"-tls-cafile": "sessioncachecafile", "-tls-cert": "sessioncachecert",
                       "-tls-key": "sessioncachekey", "-tls-checkhost": "sessioncachecheckhost"}


def _cache_setting(config: Any, name: str) -> str | None:
    value = getattr(config, name, None)
    return None if value is None or str(value).lower() in ("", "none") else str(value)


def cache_tls(config: Any):
    """The ClientTls for the sessioncache link, or None (plaintext); TlsSetupError (one line naming
    the setting) when the files cannot be used."""
    try:
        return ClientTls.from_options(TlsOptions(*(_cache_setting(config, n) for n in _CACHE_TLS_SETTINGS.values())))
    except TlsError as exc:
        message = str(exc).removeprefix("Error, ")
        for option, setting in _CACHE_TLS_SETTINGS.items():
            message = message.replace(option, setting)
        raise TlsSetupError(message) from None


@dataclass
class TlsStats:
    handshakes: int = 0      # completed
    resumed: int = 0         # of which resumed (session from the cache)
    failed: int = 0          # handshakes that failed (bad ClientHello, alert, timeout, reset)
    store_waits: int = 0     # last flights held until the cache had stored the new session
    store_unconfirmed: int = 0   # of which sent after STORE_WAIT without the cache's answer


class SessionStoreWait:
    """Holds a handshake's last flight until the session cache has stored the session it made.

    Why: the ADD of a new session is posted (tcpha.tls.sharing.PostedOperations), not waited for, so
    that no cache round trip blocks the loop. Sent at once, the flight gives the client its session
    (TLS 1.2: the server's Finished; TLS 1.3: the ticket) while the ADD may still be on its way through
    dc_client to dc_server; the client's next connection, handed to the other back end, then asked
    the cache before it had the session (seen under load: a resumption that became a full handshake).
    The original distcache waits for the ADD inside the callback, blocking its server; here only the
    connection waits: the relay keeps the flight (TlsRelay.tx) until the cache's answer to every ADD
    posted up to its own has been read (answers come in order), at most STORE_WAIT, after which it
    is sent anyway (then the worst case is a full handshake, never a failure).

    The posted connection's descriptor is watched while a relay waits, and let go before it closes
    (PostedOperations.on_close), so that the loop never watches a descriptor number reused elsewhere.
    """

    def __init__(self, posted: PostedOperations, stats: TlsStats):
        self.posted = posted
        self.stats = stats
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict["TlsRelay", asyncio.TimerHandle] = {}
        self.watched = -1
        posted.on_close = self._closing

    @property
    def mark(self) -> int:
        return self.posted.sent

    def settled(self, mark: int) -> bool:
        try:
            self.posted.poll()               # answers that arrived (never blocks)
        except Exception as e:  # noqa: BLE001 - a failed cache connection settles what it carried
            log.debug("session cache answers: %s", e)
        return self.posted.settled(mark)

    def wait(self, relay: "TlsRelay") -> None:
        """`relay` waits for its mark: woken (its _event) when answers come or at STORE_WAIT."""
        if relay not in self.waiting:
            self.loop = relay.loop
            self.stats.store_waits += 1
            self.waiting[relay] = relay.loop.call_later(STORE_WAIT, self._overdue, relay)
        self._watch()

    def forget(self, relay: "TlsRelay") -> None:
        timer = self.waiting.pop(relay, None)
        if timer is not None:
            timer.cancel()
        if not self.waiting:
            self._unwatch()

    def _overdue(self, relay: "TlsRelay") -> None:
        if self.waiting.pop(relay, None) is not None:
            self.stats.store_unconfirmed += 1
            log.debug("TLS %s: the session cache did not answer the ADD within %g s; flight sent",
                      relay.describe(), STORE_WAIT)
            relay.store_mark = 0
            relay._event()
        if not self.waiting:
            self._unwatch()

    def _watch(self) -> None:
        fd = self.posted.fileno()
        if fd != self.watched:
            self._unwatch()
            if fd >= 0 and self.loop is not None:
                self.loop.add_reader(fd, self._answers)
                self.watched = fd

    def _unwatch(self) -> None:
        if self.watched >= 0 and self.loop is not None:
            self.loop.remove_reader(self.watched)
        self.watched = -1

    def _closing(self, fd: int) -> None:
        if fd == self.watched:
            self._unwatch()
            if self.loop is not None and self.waiting:
                self.loop.call_soon(self._answers)     # what it carried is settled now: wake them

    def _answers(self) -> None:
        for relay in list(self.waiting):
            if relay.closed or self.settled(relay.store_mark):
                self.forget(relay)
                relay.store_mark = 0
                relay._event()
        if self.waiting:
            self._watch()


@dataclass
class TlsTermination:
    context: ssl.SSLContext
    ports: frozenset[int]
    shared: bool                         # sessions go through the shared cache
    cache: str | None
    stats: TlsStats = field(default_factory=TlsStats)
    store_wait: SessionStoreWait | None = None

    def __post_init__(self) -> None:
        posted = posted_operations(self.context) if self.shared else None
        if posted is not None:
            self.store_wait = SessionStoreWait(posted, self.stats)

    def session_counters(self) -> tuple[int, int]:
        """(lookups, hits) of the shared session cache: offered sessions looked up, and resumed."""
        if not self.shared:
            return 0, 0
        stats = session_cache_stats(self.context) or {}
        return int(stats.get("lookups", 0)), int(stats.get("hits", 0))

    @classmethod
    def from_config(cls, config: Any) -> "TlsTermination | None":
        cert = config.tlscert
        if not cert:
            return None
        key = config.tlskey
        ports = frozenset(config.tlsports)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cert, key)
        except FileNotFoundError as e:
            raise TlsSetupError(f"tlscert/tlskey: {e.filename}: no such file") from None
        except (ssl.SSLError, OSError) as e:
            raise TlsSetupError(f"tlscert {cert}" + (f" / tlskey {key}" if key else "") +
                                f": cannot load the certificate and key: {e}") from None
        ctx.set_alpn_protocols(["http/1.1"])     # the relay speaks to an HTTP/1.1 application
        cache = config.sessioncache
        shared = False
        if cache:
            timeout = int(config.sessiontimeout)          # whole seconds: OpenSSL's session timeout
            # False after one log line when the shim's self-checks fail: TLS still works, unshared.
            keys = config.sessionkeys
            shared = share_sessions(ctx, cache, timeout=CACHE_LOOKUP_TIMEOUT, session_timeout=timeout,
                                    sealer=keys.sealer() if keys is not None else None,
                                    tls=cache_tls(config))
        if not shared:
            # Without the shared cache: OpenSSL's own cache (this process only) and TLS 1.3 tickets.
            ctx.num_tickets = 1
        log.log(NOTICE, "TLS terminated on VIP port(s) %s with %s; sessions %s", " ".join(map(str, sorted(ports))),
                cert, (f"shared through {cache}"
                       + (" over TLS" if _cache_setting(config, "sessioncachecafile") else "")
                       + (f", sealed with {config.sessionkeys}" if config.sessionkeys else ", not sealed"))
                if shared else "not shared (no sessioncache)" if not cache
                else f"NOT shared (the shim refused; see above), cache {cache}")
        return cls(context=ctx, ports=ports, shared=shared, cache=cache)

    def wants(self, client: socket.socket) -> bool:
        try:
            return client.getsockname()[1] in self.ports
        except OSError:
            return False

    def relay(self, loop: asyncio.AbstractEventLoop, client: socket.socket, app: socket.socket,
              on_done: Callable[[Any], None] | None) -> "TlsRelay":
        return TlsRelay(self, loop, client, app, on_done)


class TlsRelay:
    """TLS server on `client`, plaintext to `app`; the same life cycle as SpliceRelay.

    OpenSSL works on memory BIOs (ssl.SSLObject) and this class moves the bytes between them and the
    sockets, so that the handshake can run while the front end has not yet steered the flow here: the
    ClientHello is read and the server's first flight computed (the expensive part of a full handshake)
    during that wait, and only *sent* on release(). Level-triggered: every readiness event runs
    :meth:`_pump`, which makes all the progress it can and then watches exactly the fds it needs.
    Half-close is kept: the client's close_notify / FIN becomes a FIN to the application; the
    application's FIN becomes close_notify + FIN to the client.
    """

    def __init__(self, term: TlsTermination, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 app: socket.socket, on_done: Callable[[Any], None] | None):
        self.term = term
        self.loop = loop
        self.sock = client
        self.app = app
        self.on_done = on_done
        self.peer = _peer(client)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(False)
        app.setblocking(False)
        self.client_fd = client.fileno()
        self.app_fd = app.fileno()
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = term.context.wrap_bio(self.inc, self.out, server_side=True)
        self.handshaken = False
        self.held = True
        self.closed = False
        self.error: str | None = None
        self.tx = bytearray()        # TLS records for the client
        self.up = bytearray()        # client -> app, decrypted
        self.client_eof = False      # FIN from the client
        self.up_eof = self.up_shut = False
        self.down_eof = self.notified = self.down_shut = False
        self.bytes_up = self.bytes_down = 0
        self.version: str | None = None
        self.resumed = False
        self.store_mark = 0          # the session cache's posted ADDs our flight waits for (0: none)
        self._watch = {"cr": False, "cw": False, "ar": False, "aw": False}
        self._timer: asyncio.TimerHandle | None = None

    # -- SpliceRelay's interface ---------------------------------------------------------------------
    def start(self, *, hold_down: bool = False) -> None:
        """hold_down: nothing may go to the client until release() (the front end has not yet steered
        the flow here: the client's answer would hit its freeze). The handshake starts at once."""
        self._timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        self.held = hold_down
        self._pump()

    def release(self) -> None:
        if self.held and not self.closed:
            self.held = False
            self._pump()

    def describe(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "?"

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.store_mark and self.term.store_wait is not None:
            self.term.store_wait.forget(self)
        self._set_watch(cr=False, cw=False, ar=False, aw=False)
        close_sockets(self.sock, self.app)
        if self.on_done is not None:
            self.on_done(self)

    # -- the work ------------------------------------------------------------------------------------
    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.handshaken and not self.closed:
            self._fail(f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s")

    def _fail(self, why: str) -> None:
        if not self.handshaken:
            self.term.stats.failed += 1
            # Our alert (if OpenSSL made one) is worth a try: the client then knows why.
            self._take_out()
            if self.tx and not self.held:
                try:
                    self.sock.send(self.tx)
                except OSError:
                    pass
        self.error = why
        log.info("TLS %s: %s", self.describe(), why)
        self.close()

    def _event(self) -> None:
        if not self.closed:
            self._pump()

    def _pump(self) -> None:
        try:
            self._progress()
        except ssl.SSLError as e:
            self._fail(f"TLS error: {e.reason or e}")
            return
        except OSError as e:
            self._fail(f"{e.strerror or e}")
            return
        if not self.closed and self.up_shut and self.down_shut:
            self.close()

    def _take_out(self) -> None:
        if self.out.pending:
            self.tx += self.out.read()

    def _progress(self) -> None:
        moved = True
        want = {"cr": False, "cw": False, "ar": False, "aw": False}
        while moved and not self.closed:
            moved = False
            want = {"cr": False, "cw": False, "ar": False, "aw": False}
            # client socket -> OpenSSL
            if not self.client_eof and len(self.up) < BUFFER_LIMIT and self.inc.pending < BUFFER_LIMIT:
                try:
                    data = self.sock.recv(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    want["cr"] = True
                else:
                    moved = True
                    if data:
                        self.inc.write(data)
                    else:
                        self.client_eof = True
                        self.inc.write_eof()
            if not self.handshaken:
                stored = self._store_count()
                try:
                    self.obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                else:
                    self._handshake_done()
                    moved = True
                self._note_store(stored)
                self._take_out()
            # OpenSSL -> application
            if self.handshaken and not self.up_eof and len(self.up) < BUFFER_LIMIT:
                stored = self._store_count()
                try:
                    data = self.obj.read(RECV_SIZE)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self.up_eof = moved = True
                else:
                    moved = True
                    if data:
                        self.up += data
                    else:
                        self.up_eof = True
                finally:
                    self._note_store(stored)
                self._take_out()              # e.g. a KeyUpdate answer
            if self.up:
                try:
                    n = self.app.send(self.up)
                except (BlockingIOError, InterruptedError):
                    want["aw"] = True
                else:
                    del self.up[:n]
                    self.bytes_up += n
                    moved = moved or n > 0
                    if self.up:
                        want["aw"] = True
            elif self.up_eof and not self.up_shut:
                self.up_shut = moved = True
                _shutdown_write(self.app)
            # application -> OpenSSL
            if self.handshaken and not self.down_eof and len(self.tx) < BUFFER_LIMIT:
                try:
                    data = self.app.recv(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    want["ar"] = True
                else:
                    moved = True
                    if data:
                        self.obj.write(data)
                        self.bytes_down += len(data)
                        self._take_out()
                    else:
                        self.down_eof = True
            if self.down_eof and not self.notified:
                self.notified = moved = True
                try:
                    self.obj.unwrap()            # close_notify into the outgoing BIO
                except (ssl.SSLError, ValueError):
                    pass                         # SSLWantRead: the client's close_notify is not here yet
                self._take_out()
            # OpenSSL -> client socket (held until the flow is steered here, and until the cache has
            # the session this flight gives the client: SessionStoreWait)
            if self.tx and not self.held and not self._store_pending():
                try:
                    n = self.sock.send(self.tx)
                except (BlockingIOError, InterruptedError):
                    want["cw"] = True
                else:
                    del self.tx[:n]
                    moved = moved or n > 0
                    if self.tx:
                        want["cw"] = True
            if self.notified and not self.tx and not self.down_shut and not self.held:
                self.down_shut = moved = True
                _shutdown_write(self.sock)
            if self.up_shut and self.down_shut:
                break
        self._set_watch(**want)

    def _store_count(self) -> int:
        wait = self.term.store_wait
        return wait.mark if wait is not None else 0

    def _note_store(self, before: int) -> None:
        """An OpenSSL call that made a session posted its ADD (the callback runs inside the call)."""
        wait = self.term.store_wait
        if wait is not None and wait.mark != before:
            self.store_mark = wait.mark

    def _store_pending(self) -> bool:
        if not self.store_mark:
            return False
        wait = self.term.store_wait
        if wait is None or wait.settled(self.store_mark):
            if wait is not None:
                wait.forget(self)
            self.store_mark = 0
            return False
        wait.wait(self)
        return True

    def _handshake_done(self) -> None:
        self.handshaken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.version = self.obj.version()
        self.resumed = bool(self.obj.session_reused)
        stats = self.term.stats
        stats.handshakes += 1
        stats.resumed += self.resumed
        log.debug("TLS %s: %s handshake done (%s)", self.describe(), self.version,
                  "resumed" if self.resumed else "full")

    def _set_watch(self, *, cr: bool, cw: bool, ar: bool, aw: bool) -> None:
        w = self._watch
        loop = self.loop
        if cr != w["cr"]:
            loop.add_reader(self.client_fd, self._event) if cr else loop.remove_reader(self.client_fd)
            w["cr"] = cr
        if cw != w["cw"]:
            loop.add_writer(self.client_fd, self._event) if cw else loop.remove_writer(self.client_fd)
            w["cw"] = cw
        if ar != w["ar"]:
            loop.add_reader(self.app_fd, self._event) if ar else loop.remove_reader(self.app_fd)
            w["ar"] = ar
        if aw != w["aw"]:
            loop.add_writer(self.app_fd, self._event) if aw else loop.remove_writer(self.app_fd)
            w["aw"] = aw


def _peer(sock: socket.socket) -> tuple[str, int] | None:
    try:
        return sock.getpeername()[:2]
    except OSError:
        return None


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
