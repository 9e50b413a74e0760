"""Keep the TLS sessions of a stdlib ``ssl.SSLContext`` in an external cache (distcache).

OpenSSL's server session callbacks, installed through :mod:`tcpha.tls.openssl`:

* new:    a session was made (end of a full TLS 1.2 handshake; a TLS 1.3 stateful ticket was
          issued) -> serialise it (i2d_SSL_SESSION) and ADD it under its session id, for the
          session's own lifetime (SSL_SESSION_get_timeout, in ms as distcache wants).
* get:    a client offers a session id (TLS 1.2) or a stateful ticket (TLS 1.3) -> GET it and
          d2i_SSL_SESSION it.  Synchronous, in the middle of the handshake: bounded by a short
          timeout, and any error, timeout or corrupt entry is a miss (a full handshake), never a
          failed handshake.
* remove: see :class:`SharedSessions.on_remove`.

Only the get is on a handshake's critical path by necessity.  With a distcache address the ADDs
(and REMOVEs) are *posted*: written to a connection of their own without waiting for the answer,
whose answers are read (without blocking) at the next operation; see :class:`PostedOperations`.
A TLS 1.3 resumption costs one GET and one posted ADD (the new ticket's session), a TLS 1.2
resumption one GET, a full handshake one posted ADD.  OpenSSL removes a stateful TLS 1.3 ticket
from the cache on use only when early data is enabled (anti-replay, ``max_early_data > 0``), which
the stdlib ``ssl`` module never enables; so no REMOVE per resumption.

A cache that fails is skipped for ``retry_interval`` seconds (a circuit breaker) so that a dead
cache does not add the timeout to every handshake; one warning line when it goes, one line when
it comes back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
import ssl
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

from tcpha.distcache.address import AddressError, connect_socket, parse_address
from tcpha.distcache.client import DistcacheError, encode_request, next_uid
from tcpha.distcache.codec import MessageReader, Op, ProtocolError, encode_add_payload
from tcpha.distcache.tls import ClientTls, describe_error
from tcpha.distcache import client as dc

from . import openssl
from .openssl import LibSSL, ShimError
from .sealing import SEAL_OVERHEAD, SessionSealer

__all__ = ["share_sessions", "session_cache_stats", "posted_operations", "SessionCache", "DistcacheSessions",
           "PostedOperations", "SessionCacheStats"]

log = logging.getLogger("tcpha.tls")

# distcache refuses ADD timeouts above a week ([102]) and data above 32768 bytes ([104]).
MAX_TIMEOUT_MS = 604_800_000
MAX_SESSION_DATA = 32768 - 8 - 64


class SessionCache(Protocol):
    """What share_sessions needs from a cache object (DistcacheClient has these methods)."""

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> Any: ...
    def get(self, session_id: bytes) -> bytes | None: ...
    def remove(self, session_id: bytes) -> Any: ...


# Posted operations whose answers have not been read yet, past which the cache counts as not
# answering whatever the time (a bound on memory; the time bound below normally comes first).
MAX_UNANSWERED = 4096


class PostedOperations:
    """ADD and REMOVE requests written to one connection of their own without waiting for answers.

    Why: a blocking round trip is not only its latency; the two context switches cost more CPU than
    the request itself (measured on a UNIX socket to dc_server: ADD 60 us of client CPU and 57 us
    of dc_server CPU when waited for, 8 us and 13 us when posted).  And an ADD made in the new-session
    callback delays the handshake's last flight (TLS 1.2) or the TLS 1.3 ticket and the first read.

    Answers are read, never waited for, at the start of every later operation (a non-blocking
    ``recv``) and given to each request's ``done(result)`` callback in order: True stored / removed,
    False refused / absent.  What is lost: an ADD whose answer never comes has no callback.
    Failures (connection refused or closed, a send buffer full for ``timeout``, an answer missing for longer than
    ``timeout`` or more than MAX_UNANSWERED answers missing, a corrupt answer) raise DistcacheError;
    the next operation opens a new connection.
    A session posted on this connection can be asked for (GET, on another connection or by another
    server) before the cache has read the ADD: the client only needs a new TCP connection and a
    ClientHello, and on a busy machine the ADD's way through dc_client to dc_server can take longer
    (seen: a TLS 1.3 resumption on another back end that became a full handshake). A server that
    must not give the client its session before the cache has it holds the handshake's flight until
    :meth:`settled` says so (the back end does: tcpha.be.tls.SessionStoreWait); ``sent`` counts the
    requests written, and ``on_close(fd)`` is told before the connection's descriptor is closed (an
    event loop watching it for answers must stop first).
    """

    def __init__(self, address: str, timeout: float, tls: ClientTls | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.tls = tls      # TLS to the cache (tcpha.distcache.tls.ClientTls), the certificate checked
        self._addr = parse_address(address)
        self._sock: socket.socket | None = None
        self._pid = 0
        self._reader: Any = None
        # uid -> (operation, done, time posted), oldest first
        self._waiting: dict[int, tuple[int, Callable[[bool], None] | None, float]] = {}
        self._lock = threading.Lock()
        self.sent = 0           # requests written so far (on any connection)
        self.on_close: Callable[[int], None] | None = None

    def add(self, session_id: bytes, data: bytes, timeout_ms: int,
            done: Callable[[bool], None] | None = None) -> None:
        self._post(Op.ADD, encode_add_payload(session_id, data, timeout_ms), done)

    def remove(self, session_id: bytes, done: Callable[[bool], None] | None = None) -> None:
        self._post(Op.REMOVE, bytes(session_id), done)

    def unanswered(self) -> int:
        return len(self._waiting)

    def settled(self, mark: int) -> bool:
        """Whether the first ``mark`` requests sent are answered, or lost with their connection (so
        nothing more will come of them). Answers come in request order on the one connection."""
        return self.sent - len(self._waiting) >= mark

    def fileno(self) -> int:
        """The connection's descriptor (readable: answers to read with :meth:`poll`), -1 without one."""
        sock = self._sock
        return sock.fileno() if sock is not None and self._pid == os.getpid() else -1

    def poll(self) -> None:
        """Read the answers that have arrived (never blocks)."""
        with self._lock:
            if self._sock is not None and self._waiting:
                self._read_answers()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _post(self, op: int, payload: bytes, done: Callable[[bool], None] | None) -> None:
        with self._lock:
            if self._sock is not None and self._pid != os.getpid():
                # After fork(): the parent's connection. Closing our copy of the descriptor does not
                # disturb the parent (the connection lives while any process holds it open).
                self._closing(self._sock)
                self._sock.close()
                self._sock = None
                self._waiting.clear()
            if self._sock is not None:
                self._read_answers()     # also notices a connection the cache closed
            if self._sock is None:
                self._connect()
            now = time.monotonic()
            if self._waiting:
                oldest = next(iter(self._waiting.values()))[2]
                if now - oldest > self.timeout:
                    self._drop()
                    raise DistcacheError(f"{self.address}: no answer within {self.timeout} s")
                if len(self._waiting) >= MAX_UNANSWERED:
                    self._drop()
                    raise DistcacheError(f"{self.address}: {MAX_UNANSWERED} requests without an answer")
            uid = next_uid()
            request = encode_request(uid, op, payload)
            self._send(request, now)
            self._waiting[uid] = (op, done, now)
            self.sent += 1

    def _send(self, request: bytes, now: float) -> None:
        """Send the whole request; only when the socket buffer is full (the cache is behind by
        hundreds of requests) wait for room, at most ``timeout``."""
        view = memoryview(request)
        deadline = now + self.timeout
        while view:
            try:
                view = view[self._sock.send(view):]
                continue
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                # (an SSL socket: the same bytes again later, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
                pass
            except OSError as exc:
                self._drop()
                raise DistcacheError(f"{self.address}: send failed: {exc.strerror or exc}") from None
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select([self._sock] if self.tls else [], [self._sock], [], left)):
                # A part-sent request would garble the stream: this connection is done.
                self._drop()
                raise DistcacheError(f"{self.address}: the cache does not read its requests "
                                     f"(send blocked {self.timeout} s)")

    def _connect(self) -> None:
        try:
            sock = connect_socket(self._addr, self.timeout)
            if self.tls is not None:
                sock = self.tls.wrap(sock, self._addr)    # handshake and certificate check, blocking
        except (OSError, AddressError) as exc:
            raise DistcacheError(f"{self.address}: cannot connect: {describe_error(exc)}") from None
        sock.setblocking(False)
        self._sock = sock
        self._pid = os.getpid()
        self._reader = MessageReader(expect_response=True)

    def _read_answers(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self._drop()
                raise DistcacheError(f"{self.address}: receive failed: {describe_error(exc)}") from None
            if not data:
                # The cache closed the connection (restart): the unanswered requests are lost.
                # (An SSL socket says so too, with or without close_notify: suppress_ragged_eofs.)
                self._drop()
                return
            try:
                messages = self._reader.feed(data)
            except ProtocolError as exc:
                self._drop()
                raise DistcacheError(f"{self.address}: corrupt answer: {exc}") from None
            for msg in messages:
                op, done, _ = self._waiting.pop(msg.uid, (None, None, 0.0))
                if op != msg.op:
                    self._drop()
                    raise DistcacheError(f"{self.address}: an answer to no request (uid {msg.uid})")
                # Status [0]: stored / removed; [1] absent, [101] id already stored, ...: refused.
                # An empty answer or [2] (dc_client without its server): refused as well.
                if done is not None:
                    done(len(msg.payload) == 1 and msg.payload[0] == 0)

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._waiting.clear()
        if sock is not None:
            self._closing(sock)
            sock.close()

    def _closing(self, sock: socket.socket) -> None:
        if self.on_close is not None:
            try:
                self.on_close(sock.fileno())
            except Exception:  # noqa: BLE001 - a watcher's failure must not keep the socket open
                log.exception("posted operations: on_close failed")

    def __repr__(self) -> str:
        return f"distcache {self.address} (posted)"


class DistcacheSessions:
    """add/get/remove on a distcache address, through a small pool of persistent connections
    for the gets and one connection for the posted adds and removes (:class:`PostedOperations`).

    A pool rather than one connection: threaded servers run handshakes (and so the callbacks)
    in many threads at once, and one :class:`DistcacheClient` is one request at a time.
    """

    def __init__(self, address: str, timeout: float, pool_size: int = 8, tls: ClientTls | None = None) -> None:

        try:
            addr = parse_address(address)
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        if addr.kind == "ip" and addr.host is None:
            raise ValueError(f"cannot connect to {address!r}: IP:port is a listen-only address")
        self.address = address
        self.timeout = timeout
        self.pool_size = pool_size
        self._dc = dc
        # LATE: connect on first use (share_sessions must not block on a down cache);
        # RETRY: a connection the cache closed (it restarted) is reopened and the request resent
        # once (the client does not retry timeouts); PIDCHECK: safe across fork() (pre-fork servers).
        self._flags = dc.PERSISTENT | dc.PERSISTENT_LATE | dc.PERSISTENT_RETRY | dc.PERSISTENT_PIDCHECK
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.tls = tls
        self.posted = PostedOperations(address, timeout, tls)

    def _run(self, method: str, *args):
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = self._dc.DistcacheClient(self.address, self._flags, self.timeout, tls=self.tls)
        try:
            result = getattr(client, method)(*args)
        except BaseException:
            client.close()
            raise
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(client)
                client = None
        if client is not None:
            client.close()
        return result

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> bool:
        return self._run("add", session_id, data, timeout_ms)

    def get(self, session_id: bytes) -> bytes | None:
        return self._run("get", session_id)

    def remove(self, session_id: bytes) -> bool:
        return self._run("remove", session_id)

    def post_add(self, session_id: bytes, data: bytes, timeout_ms: int,
                 done: Callable[[bool], None] | None = None) -> None:
        self.posted.add(session_id, data, timeout_ms, done)

    def post_remove(self, session_id: bytes, done: Callable[[bool], None] | None = None) -> None:
        self.posted.remove(session_id, done)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        self.posted.close()

    def __repr__(self) -> str:
        return f"distcache {self.address}"


@dataclass
class SessionCacheStats:
    """Counters of one shared context (read with :func:`session_cache_stats`)."""

    stored: int = 0        # sessions ADDed (posted ADDs: counted when the answer is read)
    not_stored: int = 0    # ADD refused by the cache (e.g. id already present) or too big
    lookups: int = 0       # get callbacks (a client offered a session)
    hits: int = 0          # lookups answered with a usable session
    misses: int = 0        # lookups the cache answered "absent" (or with a corrupt entry)
    unsealed: int = 0      # of the misses: entries that failed to open (wrong key, tampered, plaintext)
    removed: int = 0       # REMOVEs sent (fatal alerts; removal requests if honoured)
    errors: int = 0        # operations that failed or took longer than the timeout
    skipped: int = 0       # operations not tried because the cache was marked down
    outages: int = 0       # times the cache was marked down


class CacheBreaker:
    """Runs cache operations with errors and slow answers turned into misses.

    After a failure the cache is skipped (every operation counts as a miss at once) until
    ``retry_interval`` seconds have passed; then operations are tried again.  Logs one line when
    the cache goes down and one when it answers again.
    """

    def __init__(self, cache: SessionCache, timeout: float, retry_interval: float,
                 stats: SessionCacheStats) -> None:
        self.cache = cache
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.stats = stats
        self._down_since: float | None = None
        self._retry_at = 0.0

    def call(self, method: str, *args) -> tuple[bool, Any]:
        """(True, result) or (False, None) when the cache was skipped or failed."""
        now = time.monotonic()
        if self._down_since is not None and now < self._retry_at:
            self.stats.skipped += 1
            return False, None
        try:
            result = getattr(self.cache, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any failure of the cache is a miss, by design
            self._failed(f"{type(exc).__name__}: {exc}")
            return False, None
        took = time.monotonic() - now
        if took > self.timeout:
            # An object cache we cannot interrupt: use the answer, but stop asking for a while.
            self._failed(f"{method} took {took * 1000:.0f} ms, over the {self.timeout * 1000:.0f} ms timeout")
            return True, result
        if self._down_since is not None:
            log.warning("TLS session cache %s answers again after %.1f s; sessions are shared again",
                        self.cache, time.monotonic() - self._down_since)
            self._down_since = None
        return True, result

    def _failed(self, why: str) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        self._retry_at = now + self.retry_interval
        if self._down_since is None:
            self._down_since = now
            self.stats.outages += 1
            log.warning("TLS session cache %s failed (%s): full handshakes, retrying every %.1f s",
                        self.cache, why, self.retry_interval)


class SharedSessions:
    """The session callbacks of one SSL_CTX."""

    def __init__(self, lib: LibSSL, ctx: int, cache: SessionCache, timeout: float,
                 retry_interval: float, honour_removals: bool, sealer: SessionSealer | None = None) -> None:
        self.lib = lib
        self.ctx = ctx
        self.sealer = sealer
        # A sealed record is SEAL_OVERHEAD bytes longer than the session; distcache's limit is on the record.
        self.max_session = MAX_SESSION_DATA - (SEAL_OVERHEAD if sealer is not None else 0)
        self.stats = SessionCacheStats()
        self.breaker = CacheBreaker(cache, timeout, retry_interval, self.stats)
        self.honour_removals = honour_removals
        # A cache that can post (DistcacheSessions): ADDs and REMOVEs leave the critical path.
        self.posts = callable(getattr(cache, "post_add", None)) and callable(getattr(cache, "post_remove", None))

    def _add_answered(self, stored: bool) -> None:
        if stored:
            self.stats.stored += 1
        else:
            self.stats.not_stored += 1

    def on_new(self, ssl_ptr: int, sess: int) -> int:
        sid = self.lib.session_id(sess)
        data = self.lib.session_to_der(sess)
        if not sid or not data or len(data) > self.max_session:
            self.stats.not_stored += 1
            return 0
        if self.sealer is not None:
            data = self.sealer.seal(sid, data)
        timeout_ms = min(max(self.lib.SSL_SESSION_get_timeout(sess), 1) * 1000, MAX_TIMEOUT_MS)
        if self.posts:
            self.breaker.call("post_add", sid, data, timeout_ms, self._add_answered)
            return 0
        ok, added = self.breaker.call("add", sid, data, timeout_ms)
        if ok and added is not False:
            self.stats.stored += 1
        elif ok:
            self.stats.not_stored += 1
        return 0  # we keep no reference to `sess`; OpenSSL frees it as usual

    def on_get(self, ssl_ptr: int, sid: bytes) -> int | None:
        self.stats.lookups += 1
        ok, data = self.breaker.call("get", sid)
        if not ok:
            return None
        if not data:
            self.stats.misses += 1
            return None
        if self.sealer is not None:
            data = self.sealer.open(sid, bytes(data))
            if data is None:
                # Another key (a back end not yet given the new one, or a wrong file), a record moved
                # to another id, tampered or never sealed: a miss, never a resumption.
                log.debug("TLS session cache %s: entry for id %s does not open with %s",
                          self.breaker.cache, sid.hex(), self.sealer)
                self.stats.misses += 1
                self.stats.unsealed += 1
                return None
        sess = self.lib.session_from_der(bytes(data))
        if sess is None or self.lib.session_id(sess) != sid:
            # Corrupt, or an entry that is not the session asked for: a miss, never a wrong resume.
            if sess is not None:
                self.lib.SSL_SESSION_free(sess)
            log.debug("TLS session cache %s: unusable entry for id %s", self.breaker.cache, sid.hex())
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return sess

    def on_remove(self, sess: int) -> None:
        """OpenSSL asks to forget a session.

        It does so after a fatal alert (RFC 5246 7.2.2: such a session must not be resumed) and
        also whenever a connection is freed without the server having sent close_notify, which is
        every Python server that closes its socket without ``unwrap()`` (socketserver, most
        handlers).  Honouring the latter would throw away nearly every session, and RFC 4346 /
        5246 7.2.1 allow resuming after a connection closed without close_notify.  So by default
        only fatal alerts remove (seen by :meth:`on_info`), as Apache's mod_ssl does by marking
        unclean shutdowns; ``honour_removals=True`` forwards every request.
        """
        if self.honour_removals:
            self._remove(self.lib.session_id(sess))

    def on_info(self, ssl_ptr: int, where: int, ret: int) -> None:
        """A fatal alert removes the connection's session from the cache, except the decode_error
        OpenSSL 3 raises when the peer merely closed without close_notify (see on_remove)."""
        if (where & openssl.CB_ALERT and (ret >> 8) == openssl.AL_FATAL and not self.honour_removals
                and not self.lib.last_error_is_unexpected_eof()):
            sess = self.lib.SSL_get_session(ssl_ptr)
            if sess:
                self._remove(self.lib.session_id(sess))

    def _remove(self, sid: bytes) -> None:
        if sid:
            ok, _ = self.breaker.call("post_remove", sid) if self.posts else self.breaker.call("remove", sid)
            if ok:
                self.stats.removed += 1


# SSL_CTX* -> SharedSessions.  The C callbacks below are created once and live as long as the
# process, so OpenSSL can never call into a freed ctypes thunk; a context that is freed takes its
# entry out of this table (weakref.finalize) before OpenSSL frees the SSL_CTX.
_SHARED: dict[int, SharedSessions] = {}


def _shared_for_ssl(ssl_ptr: int) -> SharedSessions | None:
    lib = openssl._LIB
    return _SHARED.get(lib.SSL_get_SSL_CTX(ssl_ptr)) if lib is not None and ssl_ptr else None


@openssl.NEW_SESSION_CB
def _new_cb(ssl_ptr, sess):
    try:
        shared = _shared_for_ssl(ssl_ptr)
        return shared.on_new(ssl_ptr, sess) if shared is not None else 0
    except BaseException:  # noqa: BLE001 - an exception must never cross into OpenSSL
        log.exception("TLS session cache: new-session callback failed")
        return 0


@openssl.GET_SESSION_CB
def _get_cb(ssl_ptr, id_ptr, id_len, copy_ptr):
    try:
        copy_ptr[0] = 0  # the session we return carries our reference: OpenSSL takes it over
        shared = _shared_for_ssl(ssl_ptr)
        if shared is None or id_len <= 0:
            return None
        return shared.on_get(ssl_ptr, ctypes.string_at(id_ptr, id_len))
    except BaseException:  # noqa: BLE001
        log.exception("TLS session cache: get-session callback failed")
        return None


@openssl.REMOVE_SESSION_CB
def _remove_cb(ctx_ptr, sess):
    try:
        shared = _SHARED.get(ctx_ptr)
        if shared is not None:
            shared.on_remove(sess)
    except BaseException:  # noqa: BLE001
        log.exception("TLS session cache: remove-session callback failed")


@openssl.INFO_CB
def _info_cb(ssl_ptr, where, ret):
    try:
        if where & openssl.CB_ALERT:
            shared = _shared_for_ssl(ssl_ptr)
            if shared is not None:
                shared.on_info(ssl_ptr, where, ret)
    except BaseException:  # noqa: BLE001
        log.exception("TLS session cache: info callback failed")


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


def _forget(ptr: int, shared: SharedSessions) -> None:
    if _SHARED.get(ptr) is shared:
        del _SHARED[ptr]


def share_sessions(context: ssl.SSLContext, cache: str | SessionCache, *, timeout: float = 0.2,
                   id_context: bytes = b"tcpha", session_timeout: int = 300,
                   retry_interval: float = 1.0, honour_removals: bool = False,
                   sealer: SessionSealer | None = None, tls: ClientTls | None = None) -> bool:
    """Keep the server sessions of ``context`` in ``cache``, so that any server sharing that cache
    (and the same ``id_context``) resumes them.  Call before the context serves connections.

    ``cache`` is a distcache address (``"UNIX:/run/tcpha/scache"``, ``"IP:10.0.0.5:9001"``) of a
    dc_server or dc_client, or any object with ``add(id, data, timeout_ms)``, ``get(id)`` and
    ``remove(id)`` (such an object must bound its own calls; one slower than ``timeout`` is used
    but marks the cache down).  ``timeout`` (seconds) bounds each distcache operation: the get is
    made in the middle of a handshake.  ``session_timeout`` (seconds) is the session lifetime, in
    OpenSSL and in the cache.  The context gets ``OP_NO_TICKET`` (TLS 1.2 session ids, TLS 1.3
    stateful tickets: both go through the cache) and ``num_tickets = 1``, and no internal cache.

    Returns True when installed.  Returns False, after one log line, when the shim's self-checks
    fail (unknown layout, another libssl, ...): the context then works as before, unshared.
    Raises ValueError/TypeError for bad arguments.

    The cached sessions hold the master secrets. With ``sealer`` (a :class:`SessionSealer`, the same
    keys on every server) each session is sealed with AES-256-GCM before it leaves the process and
    opened after the GET, so the cache, its files and its replicas never hold a usable one; an entry
    that does not open is a miss. Without it the cache must be reachable only by the servers (a UNIX
    socket with tight permissions, a private network).  With ``tls`` (a
    :class:`tcpha.distcache.tls.ClientTls`) a distcache address is reached over TLS, the cache's
    certificate checked (dc_server ``-tls-cert``, docs/distcache.md); a certificate that does not
    check out is a cache that is down.
    """
    if not isinstance(id_context, bytes) or not 1 <= len(id_context) <= openssl.MAX_SID_CTX_LENGTH:
        raise ValueError(f"id_context must be 1 to {openssl.MAX_SID_CTX_LENGTH} bytes")
    if not timeout > 0 or not retry_interval >= 0:
        raise ValueError("timeout must be > 0 and retry_interval >= 0")
    if not 1 <= session_timeout <= MAX_TIMEOUT_MS // 1000:
        raise ValueError(f"session_timeout must be 1 to {MAX_TIMEOUT_MS // 1000} seconds")
    if isinstance(cache, str):
        store: SessionCache = DistcacheSessions(cache, timeout, tls=tls)
    elif all(callable(getattr(cache, m, None)) for m in ("add", "get", "remove")):
        store = cache
    else:
        raise TypeError("cache must be a distcache address or an object with add/get/remove")
    if getattr(context, "protocol", None) == ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError("share_sessions needs a server context, not PROTOCOL_TLS_CLIENT")

    try:
        lib = openssl.libssl()
        ctx = openssl.context_pointer(context, lib)
        ours = {_address(_new_cb), _address(_get_cb)}
        for getter in (lib.SSL_CTX_sess_get_new_cb, lib.SSL_CTX_sess_get_get_cb):
            current = getter(ctx)
            if current and current not in ours:
                raise ShimError("the SSL_CTX already has session callbacks of someone else")
        before = context.options
        context.options |= ssl.OP_NO_TICKET
        # A write through the Python API must show through our pointer too (a live check that
        # we hold this context's SSL_CTX, not a stale or unrelated one).
        if lib.SSL_CTX_get_options(ctx) != int(context.options):
            context.options = before
            raise ShimError("an option set through the ssl module does not show through the SSL_CTX")
    except ShimError as exc:
        log.warning("TLS session sharing disabled, no shared session cache: %s", exc)
        return False

    context.num_tickets = 1  # TLS 1.3: one ticket (one cache entry) per full handshake
    if lib.SSL_CTX_set_session_id_context(ctx, id_context, len(id_context)) != 1:
        raise ValueError("SSL_CTX_set_session_id_context refused the id_context")
    lib.SSL_CTX_set_timeout(ctx, session_timeout)
    mode = openssl.SESS_CACHE_SERVER | openssl.SESS_CACHE_NO_INTERNAL
    lib.SSL_CTX_ctrl(ctx, openssl.CTRL_SET_SESS_CACHE_MODE, mode, None)

    shared = SharedSessions(lib, ctx, store, timeout, retry_interval, honour_removals, sealer)
    _SHARED[ctx] = shared
    weakref.finalize(context, _forget, ctx, shared)
    lib.SSL_CTX_sess_set_new_cb(ctx, _new_cb)
    lib.SSL_CTX_sess_set_get_cb(ctx, _get_cb)
    lib.SSL_CTX_sess_set_remove_cb(ctx, _remove_cb)
    info = lib.SSL_CTX_get_info_callback(ctx)
    if not info or info == _address(_info_cb):
        lib.SSL_CTX_set_info_callback(ctx, _info_cb)
    else:
        log.info("TLS session cache: the context has its own info callback; fatal alerts will not "
                 "remove sessions from the cache")
    log.info("TLS sessions of this context shared through %s (lookup timeout %.0f ms, "
             "session lifetime %d s, %s)", store, timeout * 1000, session_timeout,
             f"sealed: {sealer!r}" if sealer is not None else "not sealed")
    return True


def posted_operations(context: ssl.SSLContext) -> PostedOperations | None:
    """The connection a context given to share_sessions posts its ADDs on (None: it waits for each,
    or it is not shared)."""
    try:
        lib = openssl.libssl()
        shared = _SHARED.get(openssl.context_pointer(context, lib))
    except ShimError:
        return None
    if shared is None or not shared.posts:
        return None
    return getattr(shared.breaker.cache, "posted", None)


def session_cache_stats(context: ssl.SSLContext) -> dict[str, int] | None:
    """The counters of a context given to share_sessions (None if it is not shared)."""
    try:
        lib = openssl.libssl()
        shared = _SHARED.get(openssl.context_pointer(context, lib))
    except ShimError:
        return None
    return asdict(shared.stats) if shared is not None else None
