"""Session storage in Redis or a Redis Cluster, behind the same interface as the embedded store.

dc_server picks this store with ``-backend redis://HOST:PORT`` (standalone, or a primary with replicas) or
``-backend redis-cluster://HOST:PORT[,HOST:PORT...]`` (hash-slot partitioned cluster). ``rediss://`` and
``rediss-cluster://`` use TLS; password, database and TLS options ride in the URL.

TLS (``rediss://``) checks the server's certificate chain *and* its name (or IP address) by default. The
options take redis-cli's words: ``cacert=FILE`` (the CA to trust; default: the system's), ``cacertdir=DIR``,
``cert=FILE`` and ``key=FILE`` (a client certificate, for ``tls-auth-clients yes``), ``insecure`` (no
certificate check: only for tests). The name checked is the host of the URL (an IP address needs an IP
subjectAltName in the server's certificate). redis-py's own
``ssl_*`` words are accepted too. Example:
``rediss://:secret@10.0.0.5:6380?cacert=/etc/tcpha/redis-ca.pem&cert=/etc/tcpha/dc.pem&key=/etc/tcpha/dc.key``.

How the distcache operations map onto Redis (semantics of the embedded store, see store.py):

* ADD    -> ``SET key data PX timeout NX``: NX gives "an ADD never overwrites" (status 101), PX gives the
            expiry in milliseconds relative to when the server handles it, as the protocol says.
* GET    -> ``GET key``; a GET never refreshes the expiry.
* REMOVE -> ``DEL key``; HAVE -> ``EXISTS key``.
* The ``-sessions`` limit is the embedded store's; in Redis, capacity is the engine's ``maxmemory`` and
  ``maxmemory-policy volatile-ttl`` evicts the keys closest to expiry first -- the distcache eviction order.

Faults: every call is bounded by a timeout (``socket_timeout``/``socket_connect_timeout`` in the URL, default
0.25 s). A failed call is answered as a miss (GET/HAVE), "absent" (REMOVE) or NOTOK (ADD), never held. An
outage is logged once when it starts and once when it ends, not once per request. After several consecutive
failures the store stops trying for ``retry_interval`` seconds and answers at once, so a dead Redis does not
cost every client a timeout; redis-py reconnects by itself when the engine returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from .codec import Status

log = logging.getLogger("tcpha.distcache.redis")

T = TypeVar("T")

KEY_PREFIX = b"dc:"
DEFAULT_TIMEOUT = 0.25          # seconds, connect and per command, unless the URL says otherwise
TRIP_AFTER_FAILURES = 3         # consecutive failures that open the breaker
RETRY_INTERVAL = 0.5            # seconds the open breaker answers without trying
SCHEMES = ("redis", "rediss", "redis-cluster", "rediss-cluster")


class BackendURLError(ValueError):
    """A -backend URL that cannot be used; str() is one line."""


@dataclass
class OutageTracker:
    """Counts consecutive failures, logs an outage once at its start and once at its end."""

    name: str
    failures: int = 0
    down_since: float | None = None
    skipped: int = 0
    retry_at: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic)

    def should_skip(self) -> bool:
        if self.failures >= TRIP_AFTER_FAILURES and self.clock() < self.retry_at:
            self.skipped += 1
            return True
        return False

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = self.clock()
            log.error("Error, backend %s unreachable (%s): answering requests as misses until it returns",
                      self.name, describe_error(exc))
        if self.failures >= TRIP_AFTER_FAILURES:
            self.retry_at = self.clock() + RETRY_INTERVAL

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning("Info, backend %s reachable again after %.1f s (%d requests answered without trying)",
                        self.name, self.clock() - self.down_since, self.skipped)
        self.failures = 0
        self.down_since = None
        self.skipped = 0


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class RedisSessionStore:
    """The distcache store on Redis; coroutine methods, as dc_server awaits them when ``is_async``."""

    is_async = True
    # Calls made one after another reach Redis in that order (CommandBatcher queues them synchronously and
    # sends them down one connection per shard), so dc_server may start a connection's requests together.
    issues_in_order = True

    def __init__(self, client: Any, *, name: str, cluster: bool, timeout: float) -> None:
        self._client = client
        self._batch = CommandBatcher(client, cluster, timeout * 2)
        self.name = name
        self.cluster = cluster
        self._timeout = timeout
        self._outage = OutageTracker(name)
        self._count = 0

    # -- the SessionStore interface -------------------------------------------------------------
    async def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> Status:
        # PX must be >= 1; a 0 ms timeout means "valid at this instant only" in the original, which
        # no later request can observe: 1 ms is the closest Redis can express.
        px = max(1, timeout_ms)
        stored = await self._call(self._batch.call, "SET", KEY_PREFIX + session_id, data, "PX", px, "NX",
                                  on_error=False)
        if stored is False:           # the call failed (on_error)
            return Status.NOTOK
        # SET ... NX answers OK when it stored the session, nil when the id is present (101).
        return Status.OK if stored is not None else Status.ADD_MATCHING_SESSION

    async def get(self, session_id: bytes) -> bytes | None:
        return await self._call(self._batch.call, "GET", KEY_PREFIX + session_id, on_error=None)

    async def remove(self, session_id: bytes) -> bool:
        return bool(await self._call(self._batch.call, "DEL", KEY_PREFIX + session_id, on_error=0))

    async def has(self, session_id: bytes) -> bool:
        return bool(await self._call(self._batch.call, "EXISTS", KEY_PREFIX + session_id, on_error=0))

    def __len__(self) -> int:
        """The session count as last refreshed by :meth:`refresh_count` (for the progress line)."""
        return self._count

    # -- operations ---------------------------------------------------------------------------------
    async def refresh_count(self) -> int:
        """Count distcache keys (DBSIZE on each primary; the database is assumed to be ours)."""
        if self.cluster:
            # Every primary's count, summed: redis-py 8 sends a bare DBSIZE to one node only (seen: the
            # count of one shard), so the target is named.
            sizes = await self._call(lambda: self._client.dbsize(target_nodes=RedisCluster.PRIMARIES), on_error=None)
        else:
            sizes = await self._call(self._client.dbsize, on_error=None)
        if isinstance(sizes, dict):
            sizes = sum(sizes.values())
        if sizes is not None:
            self._count = int(sizes)
        return self._count

    async def describe(self) -> str:
        """One line on what the backend is: version, topology, replicas. Raises on failure."""
        if self.cluster:
            nodes = await asyncio.wait_for(self._client.cluster_nodes(), self._timeout * 4)
            primaries = sum(1 for n in nodes.values() if "master" in n["flags"] and "fail" not in n["flags"])
            replicas = sum(1 for n in nodes.values() if "slave" in n["flags"] and "fail" not in n["flags"])
            failed = sum(1 for n in nodes.values() if "fail" in n["flags"])
            info = await asyncio.wait_for(self._client.cluster_info(), self._timeout * 4)
            state = info.get("cluster_state", "?")
            covered = info.get("cluster_slots_assigned", "?")
            text = (f"Redis Cluster, {primaries} primaries, {replicas} replicas"
                    f"{f', {failed} failed nodes' if failed else ''}, {covered}/16384 slots assigned, state {state}")
        else:
            info = await asyncio.wait_for(self._client.info("replication"), self._timeout * 4)
            server = await asyncio.wait_for(self._client.info("server"), self._timeout * 4)
            role = info.get("role", "?")
            text = (f"Redis {server.get('redis_version', '?')} standalone ({role}), "
                    f"{info.get('connected_slaves', 0)} replicas")
        return f"Info, backend {self.name}: {text}"

    async def close(self) -> None:
        await self._batch.close()
        await self._client.aclose()

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, on_error: T, **kwargs: Any) -> T:
        if self._outage.should_skip():
            return on_error
        try:
            result = await fn(*args, **kwargs)   # bounded by the batcher's per-batch timeout
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._outage.failed(exc)
            return on_error
        self._outage.succeeded()
        return result


class CommandBatcher:
    """Sends the commands of all client connections in batches, one batch in flight at a time.

    dc_server answers each connection's requests in order but serves many connections at once. One round trip
    per request would cap the server at what one redis-py round trip costs (several hundred µs of CPU on this
    machine, more with its Pipeline object); here every command issued while a batch is in flight joins the
    next one, written with one send on redis-py's own connection objects and read back in order, so the rate
    grows with the number of clients. For a cluster the batch is split per primary by hash slot, from the
    cluster client's own slot map. Anything unusual -- a MOVED/ASK redirect during a resharding or failover, a
    dead connection -- is retried through the regular client, which follows redirects and refreshes the map.
    (redis-py has no automatic pipelining of its own for asyncio clients.)
    """

    def __init__(self, client: Any, cluster: bool, timeout: float) -> None:
        self._client = client
        self._cluster = cluster
        # One deadline per batch (not per call: a timer per request cost a fifth of the CPU); a call
        # waits at most for the batch in flight and its own.
        self._timeout = timeout
        self._queue: list[tuple[tuple, asyncio.Future]] = []
        self._flushing = False
        self._conn: Any = None            # standalone: one connection of our own
        self._initialized = False

    async def call(self, *command: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((command, future))
        if not self._flushing:
            self._flushing = True
            # Scheduled, not awaited: requests arriving in this loop iteration join the first batch.
            loop.create_task(self._flush())
        return await future

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    async with asyncio.timeout(self._timeout):
                        if self._cluster:
                            await self._send_cluster(batch)
                        else:
                            await self._send_standalone(batch)
                except Exception as exc:  # noqa: BLE001 -- delivered to every caller of the batch
                    _fail(batch, exc)
        finally:
            self._flushing = False

    async def _send_standalone(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        if self._conn is None:
            self._conn = self._client.connection_pool.make_connection()
        try:
            await self._exchange(self._conn, batch)
        except BaseException:         # includes the batch deadline's cancellation: answers may be pending
            await self._conn.disconnect(nowait=True)
            raise

    async def _send_cluster(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        if not self._initialized:
            await self._client.initialize()
            self._initialized = True
        groups: dict[str, tuple[Any, list]] = {}
        nodes = self._client.nodes_manager
        for item in batch:
            node = nodes.get_node_from_slot(key_slot(item[0][1]))
            groups.setdefault(node.name, (node, []))[1].append(item)
        await asyncio.gather(*(self._send_node(node, items) for node, items in groups.values()))

    async def _send_node(self, node: Any, items: list[tuple[tuple, asyncio.Future]]) -> None:
        conn = node.acquire_connection()
        try:
            await self._exchange(conn, items)
        except asyncio.CancelledError:   # the batch deadline: answers may be pending on this connection
            await conn.disconnect(nowait=True)
            raise
        except (RedisError, OSError):
            await conn.disconnect()
            # The slow path marks the node as failed and makes the client look for the new primary.
            await asyncio.gather(*(self._slow(cmd, fut) for cmd, fut in items if not fut.done()))
        finally:
            node.release(conn)

    async def _exchange(self, conn: Any, items: list[tuple[tuple, asyncio.Future]]) -> None:
        await conn.send_packed_command(conn.pack_commands([cmd for cmd, _ in items]), check_health=False)
        redirected = []
        for command, future in items:
            try:
                result = await conn.read_response()
            except ResponseError as exc:
                if self._cluster and str(exc).split(" ", 1)[0] in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
                    redirected.append((command, future))
                    continue
                result = exc
            _settle(future, result)
        if redirected:
            await asyncio.gather(*(self._slow(cmd, fut) for cmd, fut in redirected))

    async def _slow(self, command: tuple, future: asyncio.Future) -> None:
        try:
            result = await self._client.execute_command(*command)
        except Exception as exc:  # noqa: BLE001 -- delivered to the caller
            result = exc
        _settle(future, result)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():                 # its caller gave up (timeout)
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def _fail(batch: list[tuple[tuple, asyncio.Future]], exc: Exception) -> None:
    for _, future in batch:
        _settle(future, exc)


def _split_url(url: str) -> tuple[str, list[tuple[str, int]], str]:
    """Returns (scheme, [(host, port), ...], url of the first node in redis-py form)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise BackendURLError(f"unknown backend scheme {parts.scheme!r} in {url!r} "
                              f"(expected memory, {', '.join(s + '://' for s in SCHEMES)})")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BackendURLError(f"bad host:port {item!r} in backend {url!r}")
        nodes.append((host, int(port)))
    plain_scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    first = f"{nodes[0][0]}:{nodes[0][1]}" if ":" not in nodes[0][0] else f"[{nodes[0][0]}]:{nodes[0][1]}"
    netloc = f"{userinfo}@{first}" if userinfo else first
    return parts.scheme, nodes, urlunsplit((plain_scheme, netloc, parts.path, parts.query, ""))


# redis-cli's TLS words (--cacert, --cacertdir, --cert, --key, --insecure) -> redis-py's.
_TLS_WORDS = {"cacert": "ssl_ca_certs", "cacertdir": "ssl_ca_path", "cert": "ssl_certfile",
              "key": "ssl_keyfile"}


def _tls_options(url: str) -> tuple[str, dict[str, Any]]:
    """The URL without redis-cli's TLS words, and the redis-py keyword arguments they stand for.

    A TLS URL checks the certificate and the host name unless ``insecure`` says otherwise; a TLS word
    on a plain redis:// URL is an error (it would silently not be used).
    """
    parts = urlsplit(url)
    tls = parts.scheme.startswith("rediss")
    kept, options = [], {}
    for item in filter(None, parts.query.split("&")):
        word, _, value = item.partition("=")
        if word in _TLS_WORDS or word == "insecure":
            if not tls:
                raise BackendURLError(f"{word} is a TLS option: use rediss:// in backend {url_without_password(url)!r}")
            if word == "insecure":
                options["ssl_cert_reqs"] = "none"
                options["ssl_check_hostname"] = False
            else:
                if not value:
                    raise BackendURLError(f"{word} needs a file name in backend {url_without_password(url)!r}")
                if not os.path.exists(value):
                    raise BackendURLError(f"{word} {value}: no such file (backend {url_without_password(url)!r})")
                options[_TLS_WORDS[word]] = value
        else:
            kept.append(item)
    if tls:
        options.setdefault("ssl_cert_reqs", "required")
        options.setdefault("ssl_check_hostname", True)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(kept), parts.fragment)), options


def _timeouts_from(url: str) -> float:
    query = urlsplit(url).query
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key == "socket_timeout":
            try:
                return float(value)
            except ValueError:
                raise BackendURLError(f"bad socket_timeout {value!r} in backend {url!r}") from None
    return DEFAULT_TIMEOUT


def open_store(url: str, sessions: int) -> RedisSessionStore:
    """Make a store for a ``redis://`` / ``redis-cluster://`` URL. Connects lazily, on first use.

    ``sessions`` (dc_server's -sessions) is not enforced here: Redis's maxmemory is the limit (see above).
    """
    del sessions
    url, tls = _tls_options(url)
    scheme, nodes, node_url = _split_url(url)
    timeout = _timeouts_from(url)
    defaults: dict[str, Any] = dict(tls)
    query = urlsplit(url).query
    if "socket_timeout" not in query:
        defaults["socket_timeout"] = timeout
    if "socket_connect_timeout" not in query:
        defaults["socket_connect_timeout"] = timeout
    try:
        if scheme.endswith("-cluster"):
            client = RedisCluster.from_url(
                node_url,
                startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                # A node that stops answering is a failover in progress: find the new owner quickly,
                # without retrying for seconds while the client waits.
                retry=Retry(NoBackoff(), 1),
                **defaults,
            )
            return RedisSessionStore(client, name=url_without_password(url), cluster=True, timeout=timeout)
        if len(nodes) > 1:
            raise BackendURLError(f"{scheme}:// takes one host; use redis-cluster:// for several: {url!r}")
        client = aioredis.Redis.from_url(node_url, **defaults)
    except BackendURLError:
        raise
    except (ValueError, TypeError, RedisError) as exc:
        raise BackendURLError(f"backend {url_without_password(url)!r}: {describe_error(exc)}") from None
    return RedisSessionStore(client, name=url_without_password(url), cluster=False, timeout=timeout)


def url_without_password(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{hosts}" if user else f"***@{hosts}", parts.path, "", ""))
