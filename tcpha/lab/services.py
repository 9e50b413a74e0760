"""Shared services on lab hosts: the distcache session cache and a Redis Cluster behind it.

    srv = start_dc_server(lab)                       # dc_server on the cache host, IP:10.77.0.20:9001
    agents = {h.name: start_dc_client(lab, h.name, srv.address) for h in lab.topology.backends}
    agents["be1"].address                            # "UNIX:/tmp/tcpha-lab-.../be1-scache"
    cluster = start_redis_cluster(lab)               # 3 primaries + 3 replicas on the cache host

Every process runs inside the host's namespace and is owned by the lab: lab.down() stops it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from tcpha.distcache.client import DistcacheClient, DistcacheError

from .netns import LabError, NamespaceLab

DC_SERVER_PORT = 9001
REDIS_BASE_PORT = 7000


def tool_argv(command: str, module: str) -> list[str]:
    """argv for one of our console scripts: the installed script, else `python -c` on its main()."""
    path = shutil.which(command)
    if path:
        return [path]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


@dataclass
class LabService:
    host: str
    address: str          # distcache address (IP:HOST:PORT / UNIX:PATH) or URL
    proc: subprocess.Popen | None
    lab: NamespaceLab
    dc_map: str | None = None  # Redis Cluster with datacenters: host:port=DC,... for dc_server -dc-map

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_dc_server(lab: NamespaceLab, host: str = "cache", *, port: int = DC_SERVER_PORT,
                    args: list[str] | None = None, timeout: float = 10.0) -> LabService:
    """dc_server listening on the host's LAN address; `args` adds options (e.g. ["-backend", URL])."""
    ip = lab.ip(host)
    argv = [*tool_argv("dc_server", "tcpha.cli.dc_server"), "-listen", f"IP:{ip}:{port}", *(args or [])]
    proc = lab.spawn(host, argv, name=f"dc_server-{port}", ready_tcp=(ip, port), timeout=timeout)
    return LabService(host=host, address=f"IP:{ip}:{port}", proc=proc, lab=lab)


def start_dc_client(lab: NamespaceLab, host: str, server: str, *, listen: str | None = None,
                    args: list[str] | None = None, timeout: float = 10.0,
                    wait_upstream: bool = True) -> LabService:
    """dc_client on `host` forwarding to `server`; by default it listens on a UNIX socket in the lab's
    scratch directory (UNIX sockets are per file system, not per namespace, so the path is unique).
    Ready when it answers from its cache server (wait_upstream=False: when it listens)."""
    if listen is None:
        sock_dir = lab.workdir / "scache"
        sock_dir.mkdir(exist_ok=True)
        listen = f"UNIX:{sock_dir / f'{host}-scache'}"
    argv = [*tool_argv("dc_client", "tcpha.cli.dc_client"), "-listen", listen, "-server", server, *(args or [])]
    kind, _, rest = listen.partition(":")
    if kind.upper() == "UNIX":
        proc = lab.spawn(host, argv, name="dc_client", ready_path=rest, timeout=timeout)
    elif kind.upper() == "IP":
        addr, _, port = rest.rpartition(":")
        proc = lab.spawn(host, argv, name="dc_client", ready_tcp=(addr or lab.ip(host), int(port)),
                         timeout=timeout)
    else:
        raise LabError(f"dc_client listen address {listen!r}: use UNIX:PATH or IP:ADDR:PORT")
    service = LabService(host=host, address=listen, proc=proc, lab=lab)
    if wait_upstream:
        _wait_agent_connected(service, timeout)
    return service


def _wait_agent_connected(agent: LabService, timeout: float) -> None:
    """Until the agent has its cache server: it listens before its first connection upstream is made,
    and answers a request in between with an empty reply (the original's rule, as when the server is
    down), which a client counts as a failed store or lookup."""
    def probe() -> bool:
        with DistcacheClient(agent.address, timeout=1.0) as c:
            c.has(b"tcpha-lab-agent-ready")
        return True

    deadline = time.monotonic() + timeout
    while True:
        try:
            agent.lab.call(agent.host, probe)
            return
        except DistcacheError as e:
            if time.monotonic() > deadline or not agent.running():
                agent.stop()
                raise LabError(f"{agent.host}: dc_client has no cache server after {timeout:g} s ({e}): "
                               f"{agent.lab.log_tail(agent.host, 'dc_client')}") from None
            time.sleep(0.02)


def start_redis_cluster(lab: NamespaceLab, host: str = "cache", *, base_port: int = REDIS_BASE_PORT,
                        timeout: float = 60.0, datacenters: tuple[str, ...] = (),
                        tls: Any = None) -> LabService:
    """A Redis Cluster (3 primaries + 3 replicas, Debian's redis-server) on the host's LAN address,
    through tcpha.distcache.redis_cluster. The nodes live in the host's namespace, so lab.down() stops
    them even though the launcher exits after starting them. address: the redis-cluster:// URL.
    datacenters (e.g. ("east", "west")): every primary gets a replica in another data center; the
    service's dc_map says which node is where (for dc_server -check-placement -dc-map). tls (a
    tcpha.distcache.redis_cluster.RedisTls): TLS on every link, and address is a rediss-cluster:// URL."""
    if shutil.which("redis-server") is None:
        raise LabError("redis-server is not installed (scripts/install-deps installs it)")
    data = lab.workdir / f"redis-{host}-{base_port}"
    argv = [sys.executable, "-m", "tcpha.distcache.redis_cluster", "up", "--dir", str(data),
            "--host", lab.ip(host), "--port", str(base_port)]
    if datacenters:
        argv += ["--datacenters", ",".join(datacenters)]
    if tls is not None:
        argv += ["--tls", str(tls.ca), str(tls.cert), str(tls.key)]
    try:
        r = lab.run(host, argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabError(f"{host}: Redis Cluster did not form within {timeout:g}s") from None
    if r.returncode != 0:
        raise LabError(f"{host}: Redis Cluster failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    url = next((line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("Redis Cluster up")),
               None)
    if url is None:
        raise LabError(f"{host}: Redis Cluster launcher said: {r.stdout.strip()!r}")

    def stop_cluster() -> None:
        lab.run(host, [sys.executable, "-m", "tcpha.distcache.redis_cluster", "down", "--dir", str(data)],
                capture_output=True, timeout=30)
    lab.add_cleanup(stop_cluster)
    dc_map = next((line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("data centers")),
                  None)
    return LabService(host=host, address=url, proc=None, lab=lab, dc_map=dc_map)
