"""Benchmark: dc_server on the embedded store, on one Redis, and on a local 3+3 Redis Cluster (run by hand).

    python bench/distcache/redis_backends.py [--ops 20000] [--out bench/results/distcache-redis.md]

For each backend: dc_test -persistent with one client and with four clients (-clients 4) against one dc_server;
for the cluster also four clients spread over two dc_servers sharing it. 512 sessions, random operations.
Results go to a Markdown table, with the machine's load average beside each run: every process (dc_test,
dc_server, redis-server x6) shares the same two cores, so read the numbers with it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "redis"))
from conftest import free_port_block  # noqa: E402  (the tests' port picker)

from tcpha.distcache.redis_cluster import LocalRedisCluster, RedisNode  # noqa: E402

RATE = re.compile(r"operations per second = (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["dc_server", "-listen", f"IP:127.0.0.1:{port}", "-backend", backend,
                             "-sessions", "4096"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"IP:127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"dc_server -backend {backend} did not start")
            time.sleep(0.02)


def dc_test(addresses: list[str], clients: int, ops: int) -> int:
    """Total ops/s of `clients` dc_test -persistent processes spread over the addresses."""
    per = max(1, clients // len(addresses))
    procs = [subprocess.Popen(["dc_test", "-connect", a, "-persistent", "-timing", "-sessions", "512", "-ops", str(ops)]
                              + (["-clients", str(per)] if per > 1 else []),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in addresses]
    total = 0
    for p in procs:
        out = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(f"dc_test failed:\n{out}")
        total += int(RATE.findall(out)[-1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--out", default="bench/results/distcache-redis.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dcbench-"))
    node = RedisNode("127.0.0.1", free_port_block(1), work / "single", cluster=False)
    cluster = LocalRedisCluster(work / "cluster", base_port=free_port_block(6))
    rows = []
    try:
        node.start()
        cluster.start()
        for label, backend in (("embedded (memory)", "memory"), ("redis (standalone)", f"redis://{node.address}"),
                               ("redis-cluster (3+3)", cluster.url)):
            proc, addr = start_server(backend)
            try:
                for clients in (1, 4):
                    rate = dc_test([addr], clients, args.ops)
                    rows.append((label, "1 dc_server", clients, rate, os.getloadavg()[0]))
                    print(rows[-1], flush=True)
            finally:
                proc.terminate(); proc.wait()
        procs = [start_server(cluster.url) for _ in range(2)]
        try:
            for clients in (2, 4):
                rate = dc_test([a for _, a in procs], clients, args.ops)
                rows.append(("redis-cluster (3+3)", "2 dc_servers", clients, rate, os.getloadavg()[0]))
                print(rows[-1], flush=True)
        finally:
            for p, _ in procs:
                p.terminate(); p.wait()
    finally:
        cluster.stop()
        node.kill()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# dc_server backends, {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores",
             "", f"dc_test -persistent, 512 sessions, {args.ops} random operations per client.", "",
             "| backend | servers | clients | ops/s (sum) | load avg |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {b} | {s} | {c} | {r} | {l:.1f} |" for b, s, c, r, l in rows]
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from plots import RESULTS, plot_after_run, plot_distcache
    plot_after_run(plot_distcache, out, RESULTS / "distcache.md")


if __name__ == "__main__":
    main()
