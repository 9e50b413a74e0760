"""Start and stop local Redis servers from Debian's redis-server: one standalone, or a Redis Cluster.

For the tests, the lab and the demo: ``python -m tcpha.distcache.redis_cluster up --dir DIR`` starts three
primaries and three replicas on 127.0.0.1:7000-7005 (or ``--host`` for a lab address), waits until the
cluster says ``cluster_state:ok`` and every replica is linked, and leaves them running; ``down --dir DIR``
stops them. Each node keeps its data (AOF, fsync every second) and its cluster config in DIR.

Writing this launcher by hand is deliberate: Redis ships ``create-cluster`` only as an example script in its
source tree (not in Debian's package), and the tests need to kill and restart single nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"


class RedisLaunchError(RuntimeError):
    """A node did not start or the cluster did not form; str() is one line."""


@dataclass(frozen=True)
class RedisTls:
    """TLS on every link of the local Redis: clients (client certificates required), replication and the
    cluster bus, all under one CA. The same files serve the nodes, redis-cli and dc_server's URL."""

    ca: Path
    cert: Path
    key: Path

    def client_kwargs(self) -> dict:
        return {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.cert),
                "ssl_keyfile": str(self.key), "ssl_cert_reqs": "required", "ssl_check_hostname": True}

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.cert), "--key", str(self.key)]

    def url_query(self) -> str:
        """dc_server's -backend words for these files (redis-cli's names; see redis_store)."""
        return f"cacert={self.ca}&cert={self.cert}&key={self.key}"

    def server_config(self, cluster: bool) -> list[str]:
        lines = [f"tls-cert-file {self.cert}", f"tls-key-file {self.key}", f"tls-ca-cert-file {self.ca}",
                 "tls-auth-clients yes", "tls-replication yes"]
        return lines + (["tls-cluster yes"] if cluster else [])

    def as_dict(self) -> dict:
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


@dataclass
class RedisNode:
    host: str
    port: int
    workdir: Path
    cluster: bool
    node_timeout_ms: int = 1000
    tls: RedisTls | None = None
    process: subprocess.Popen | None = None
    dc: str | None = None          # the data center the lab puts this node in (see LocalRedisCluster)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, **kwargs) -> redis.Redis:
        """A redis-py client of this node (over TLS when the node has it)."""
        return redis.Redis(self.host, self.port, **kwargs, **(self.tls.client_kwargs() if self.tls else {}))

    def config(self) -> str:
        lines = [
            f"bind {self.host}",
            *([f"port {self.port}"] if self.tls is None else ["port 0", f"tls-port {self.port}",
                                                             *self.tls.server_config(self.cluster)]),
            f"dir {self.workdir}",
            "protected-mode no",
            "daemonize no",
            "save ''",
            "appendonly yes",
            "appendfsync everysec",
            "maxmemory-policy volatile-ttl",
            f"logfile {self.workdir / 'redis.log'}",
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.node_timeout_ms}",
                # A replica whose primary died takes over at once however long the link was down.
                "cluster-replica-validity-factor 0",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        conf.write_text(self.config())
        self.process = subprocess.Popen([REDIS_SERVER, str(conf)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        (self.workdir / "pid").write_text(str(self.process.pid))
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RedisLaunchError(f"redis-server on {self.address} exited with status "
                                           f"{self.process.returncode}; see {self.workdir / 'redis.log'}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisLaunchError(f"redis-server on {self.address} did not answer within {timeout:.0f} s")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if self.process is not None:
            self.process.wait(timeout=10)
            self.process = None
        else:
            _wait_gone(pid, 10)
        (self.workdir / "pid").unlink(missing_ok=True)

    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        try:
            return int((self.workdir / "pid").read_text())
        except (OSError, ValueError):
            return None


@dataclass
class LocalRedisCluster:
    """Three primaries and three replicas (by default) on one host, ports base_port..base_port+5.

    With ``datacenters`` (e.g. ``("east", "west")``) the nodes are tagged by data center and the replicas
    are placed by hand: primary i is in ``datacenters[i % k]`` and its replica j in the next data centers
    (``datacenters[(i + 1 + j) % k]``), so every primary has a replica in another data center.  Redis
    does not know the tags; :meth:`dc_map` gives them in dc_server's ``-dc-map`` form.
    """

    workdir: Path
    host: str = "127.0.0.1"
    base_port: int = 7000
    primaries: int = 3
    replicas_per_primary: int = 1
    node_timeout_ms: int = 1000
    tls: RedisTls | None = None
    datacenters: tuple[str, ...] = ()
    nodes: list[RedisNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = self.primaries * (1 + self.replicas_per_primary)
        self.datacenters = tuple(self.datacenters)
        self.nodes = [RedisNode(self.host, self.base_port + i, self.workdir / str(self.base_port + i),
                                cluster=True, node_timeout_ms=self.node_timeout_ms, tls=self.tls,
                                dc=self._dc_of(i))
                      for i in range(count)]

    def _dc_of(self, index: int) -> str | None:
        k = len(self.datacenters)
        if not k:
            return None
        if index < self.primaries:
            return self.datacenters[index % k]
        primary, j = divmod(index - self.primaries, self.replicas_per_primary)
        return self.datacenters[(primary + 1 + j) % k]

    def replica_nodes(self, primary_index: int) -> list[RedisNode]:
        """The nodes made replicas of primary ``primary_index`` (as placed at start with datacenters)."""
        first = self.primaries + primary_index * self.replicas_per_primary
        return self.nodes[first:first + self.replicas_per_primary]

    def dc_map(self) -> str:
        """``host:port=DC,...`` for dc_server -check-placement -dc-map."""
        return ",".join(f"{n.address}={n.dc}" for n in self.nodes if n.dc is not None)

    @property
    def url(self) -> str:
        hosts = ",".join(n.address for n in self.nodes[: self.primaries])
        if self.tls is None:
            return "redis-cluster://" + hosts
        return f"rediss-cluster://{hosts}?{self.tls.url_query()}"

    def _cli(self, *args: str, timeout: float) -> None:
        result = subprocess.run([REDIS_CLI, *(self.tls.cli_args() if self.tls else []), *args],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RedisLaunchError(f"redis-cli {' '.join(args[:2])} failed: "
                                   + ((result.stdout + result.stderr).strip().splitlines() or ["?"])[-1])

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        if self.datacenters:
            self._start_placed(timeout)
            return
        result = subprocess.run(
            [REDIS_CLI, *(self.tls.cli_args() if self.tls else []), "--cluster", "create",
             *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RedisLaunchError("redis-cli --cluster create failed: " + (result.stdout + result.stderr).strip().splitlines()[-1])
        self.wait_healthy(timeout)

    def _start_placed(self, timeout: float) -> None:
        """The primaries alone, then each replica attached to its primary explicitly (redis-cli's own
        placement only keeps a replica off its primary's host, and here every node is on one host)."""
        primaries = self.nodes[: self.primaries]
        self._cli("--cluster", "create", *(n.address for n in primaries), "--cluster-replicas", "0",
                  "--cluster-yes", timeout=timeout)
        for i, primary in enumerate(primaries):
            client = primary.client(socket_timeout=5)
            try:
                primary_id = client.execute_command("CLUSTER", "MYID")
            finally:
                client.close()
            primary_id = primary_id.decode() if isinstance(primary_id, bytes) else primary_id
            for replica in self.replica_nodes(i):
                self._cli("--cluster", "add-node", replica.address, primary.address, "--cluster-slave",
                          "--cluster-master-id", primary_id, timeout=timeout)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node reports state ok and each primary has its replicas linked."""
        deadline = time.monotonic() + timeout
        while True:
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise RedisLaunchError(f"Redis Cluster on {self.host}:{self.base_port}.. not healthy within {timeout:.0f} s")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        masters_with_replicas = 0
        for node in self.nodes:
            if node.pid() is None:
                continue
            client = node.client(socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
                info = client.info("replication")
                if info.get("role") == "master" and int(info.get("connected_slaves", 0)) >= self.replicas_per_primary:
                    masters_with_replicas += 1
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
        return masters_with_replicas >= self.primaries

    def primary_for(self, key: bytes) -> RedisNode:
        """The node that currently owns the key's hash slot."""
        for node in self.nodes:
            if node.pid() is None:
                continue
            client = node.client(socket_timeout=0.5)
            try:
                slot = client.cluster("keyslot", key)
                for entry in client.cluster("slots"):
                    if entry[0] <= slot <= entry[1]:
                        return next(n for n in self.nodes if n.port == int(entry[2][1]))
            except redis.ConnectionError:
                continue                # a node going down: ask the next one
            finally:
                client.close()
        raise RedisLaunchError("no live node knows the slot map")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGKILL)

    def save_state(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "cluster.json").write_text(json.dumps({
            "host": self.host, "base_port": self.base_port, "primaries": self.primaries,
            "replicas_per_primary": self.replicas_per_primary, "datacenters": list(self.datacenters),
            "tls": self.tls.as_dict() if self.tls else None}))

    @classmethod
    def load_state(cls, workdir: Path) -> "LocalRedisCluster":
        data = json.loads((workdir / "cluster.json").read_text())
        tls = data.pop("tls", None)
        return cls(workdir=workdir, tls=RedisTls(**{k: Path(v) for k, v in tls.items()}) if tls else None, **data)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcpha.distcache.redis_cluster",
                                     description="Start or stop a local Redis Cluster (3 primaries + 3 replicas).")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", required=True, type=Path, help="working directory for the nodes' data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000, help="first port (six are used)")
    parser.add_argument("--datacenters", default="",
                        help="e.g. east,west: tag the nodes by data center and give every primary a replica "
                             "in another one (prints the -dc-map for dc_server -check-placement)")
    parser.add_argument("--tls", nargs=3, metavar=("CA", "CERT", "KEY"), type=Path,
                        help="TLS on every link (clients with certificates, replication, cluster bus) with these "
                             "files; the printed URL is rediss-cluster:// with them")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            cluster = LocalRedisCluster(args.dir, host=args.host, base_port=args.port,
                                        datacenters=tuple(filter(None, args.datacenters.split(","))),
                                        tls=RedisTls(*args.tls) if args.tls else None)
            cluster.save_state()
            try:
                cluster.start()
            except Exception:
                cluster.stop()
                raise
            print(f"Redis Cluster up: {cluster.url}")
            if cluster.datacenters:
                print(f"data centers (-dc-map): {cluster.dc_map()}")
        elif args.action == "down":
            LocalRedisCluster.load_state(args.dir).stop()
            print("Redis Cluster down")
        else:
            cluster = LocalRedisCluster.load_state(args.dir)
            print(f"{cluster.url}: {'healthy' if cluster._healthy() else 'not healthy'}")
    except (RedisLaunchError, OSError, subprocess.SubprocessError) as exc:
        print(f"Error, {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
