"""Redis Cluster placement across data centers: does every primary have a replica in another one?

``dc_server -backend redis-cluster://HOST:PORT,... -check-placement -dc-map MAP`` reads the cluster's
topology (``CLUSTER NODES`` from the first node of the URL that answers) and prints one line per primary
that serves slots; a primary none of whose healthy replicas is in another data center is reported
``BAD``, and the exit status is 1.  Redis knows nothing of data centers, so the operator says where each
node is: ``-dc-map host:port=DC,host:port=DC,...`` or ``-dc-map @FILE`` (one ``host:port=DC`` a line,
``#`` comments), with the addresses as the cluster announces them (``CLUSTER NODES``).  A node of the
cluster missing from the map is an error: a check that guesses would pass a bad layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis

from tcpha.distcache.address import DC_NAME
from tcpha.distcache.redis_store import BackendURLError, _split_url, _tls_options, url_without_password

__all__ = ["PlacementError", "PlacementReport", "ClusterNodeInfo", "parse_dc_map", "parse_cluster_nodes",
           "check_placement", "check_cluster_placement"]


class PlacementError(ValueError):
    """A bad -dc-map, an unreachable cluster or an incomplete map; str() is one line."""


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of CLUSTER NODES, the parts the check needs."""
    node_id: str
    address: str                 # host:port as announced
    flags: frozenset[str]
    primary_id: str | None       # for a replica
    slots: tuple[str, ...]       # slot ranges as printed ("0-5460"), primaries only

    @property
    def healthy(self) -> bool:
        return not self.flags & {"fail", "fail?", "handshake", "noaddr"}


def parse_dc_map(text: str) -> dict[str, str]:
    """``host:port=DC,...`` or ``@FILE`` -> {host:port: DC}."""
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path) as fp:
                lines = fp.read().splitlines()
        except OSError as exc:
            raise PlacementError(f"-dc-map {path}: {exc.strerror or exc}") from None
        entries = [(f"{path}:{n}", line.split("#", 1)[0].strip()) for n, line in enumerate(lines, 1)]
        entries = [(where, item) for where, item in entries if item]
    else:
        entries = [("-dc-map", item.strip()) for item in text.split(",")]
    dc_map: dict[str, str] = {}
    for where, item in entries:
        node, sep, dc = item.partition("=")
        host, colon, port = node.strip().rpartition(":")
        dc = dc.strip()
        if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PlacementError(f"{where}: expected host:port=DC, got {item!r}")
        if not DC_NAME.fullmatch(dc):
            raise PlacementError(f"{where}: bad data center name {dc!r} (letters, digits, _ . -)")
        key = f"{host.strip('[]')}:{int(port)}"
        if key in dc_map and dc_map[key] != dc:
            raise PlacementError(f"{where}: {key} is in two data centers ({dc_map[key]} and {dc})")
        dc_map[key] = dc
    if not dc_map:
        raise PlacementError("-dc-map is empty")
    return dc_map


def parse_cluster_nodes(text: str) -> list[ClusterNodeInfo]:
    """The reply of CLUSTER NODES (``id ip:port@cport[,hostname] flags master ping pong epoch link slots...``)."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        flags = frozenset(f for f in parts[2].split(",") if f != "myself")
        nodes.append(ClusterNodeInfo(parts[0], f"{host.strip('[]')}:{port}", flags,
                                     None if parts[3] == "-" else parts[3],
                                     tuple(s for s in parts[8:] if not s.startswith("["))))
    return nodes


@dataclass
class PrimaryPlacement:
    primary: ClusterNodeInfo
    dc: str
    replicas: list[tuple[ClusterNodeInfo, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return any(dc != self.dc for _, dc in self.replicas)

    def line(self) -> str:
        slots = " ".join(self.primary.slots)
        replicas = ", ".join(f"{r.address} ({dc})" for r, dc in self.replicas) or "none"
        if self.ok:
            return f"ok: primary {self.primary.address} ({self.dc}), slots {slots}: replicas {replicas}"
        why = "no healthy replica" if not self.replicas else f"every replica in {self.dc}"
        return f"BAD: primary {self.primary.address} ({self.dc}), slots {slots}: {why}: replicas {replicas}"


@dataclass
class PlacementReport:
    primaries: list[PrimaryPlacement]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.primaries)

    @property
    def bad(self) -> list[PrimaryPlacement]:
        return [p for p in self.primaries if not p.ok]

    def lines(self) -> list[str]:
        bad = len(self.bad)
        summary = (f"placement ok: each of {len(self.primaries)} primaries has a replica in another data center"
                   if not bad else f"placement BAD: {bad} of {len(self.primaries)} primaries have no replica "
                   "in another data center")
        return [p.line() for p in self.primaries] + [summary]


def check_placement(nodes: list[ClusterNodeInfo], dc_map: dict[str, str]) -> PlacementReport:
    """Every primary serving slots, with its healthy replicas and their data centers."""
    missing = sorted(n.address for n in nodes if n.address not in dc_map and "noaddr" not in n.flags)
    if missing:
        raise PlacementError(f"cluster node(s) not in -dc-map: {', '.join(missing)}")
    primaries = [n for n in nodes if "master" in n.flags and n.slots and n.healthy]
    if not primaries:
        raise PlacementError("the cluster has no healthy primary serving slots")
    report = PlacementReport([PrimaryPlacement(p, dc_map[p.address]) for p in primaries])
    by_id = {p.primary.node_id: p for p in report.primaries}
    for n in nodes:
        if "slave" in n.flags and n.healthy and n.primary_id in by_id:
            by_id[n.primary_id].replicas.append((n, dc_map[n.address]))
    report.primaries.sort(key=lambda p: p.primary.address)
    return report


def check_cluster_placement(url: str, dc_map: dict[str, str], timeout: float = 5.0) -> PlacementReport:
    """Read CLUSTER NODES from the first node of a redis-cluster:// (rediss-cluster://) URL that answers."""
    if not url.split("://", 1)[0].endswith("-cluster"):
        raise PlacementError(f"-check-placement needs -backend redis-cluster:// or rediss-cluster://, "
                             f"not {url_without_password(url)!r}")
    try:
        plain, tls = _tls_options(url)
        _, hosts, node_url = _split_url(plain)
    except BackendURLError as exc:
        raise PlacementError(f"-backend: {exc}") from None
    errors = []
    parts = urlsplit(node_url)
    userinfo = parts.netloc.rpartition("@")[0]
    for host, port in hosts:
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        netloc = f"{userinfo}@{hostport}" if userinfo else hostport
        client = redis.Redis.from_url(urlunsplit(parts._replace(netloc=netloc)), socket_timeout=timeout,
                                      socket_connect_timeout=timeout, **tls)
        try:
            raw = client.execute_command("CLUSTER", "NODES")
        except (redis.RedisError, OSError) as exc:
            errors.append(f"{host}:{port}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
            continue
        finally:
            client.close()
        return check_placement(parse_cluster_nodes(raw.decode() if isinstance(raw, bytes) else raw), dc_map)
    raise PlacementError("no cluster node answered CLUSTER NODES (" + "; ".join(errors) + ")")
