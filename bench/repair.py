#!/usr/bin/env python3
"""Benchmark the kernel-facing hot path: TCP_REPAIR dump/restore and nft element operations.

Run by hand as root (not in CI):  python3 bench/repair.py [--n 2000] [--out bench/results/repair.md]

Everything runs inside a throw-away network namespace (created and removed here): loopback connections
for dump/restore, and an nft netdev table hooked on that namespace's `lo` for the element operations.
Reported per operation: median and p99 wall time, and CPU time (thread CPU, user+system), because the
machine is shared and wall time includes waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import socket
import statistics
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute, netns as pr_netns

from tcpha import repair
from tcpha.steering import FlowKey, FlowSteering
from tcpha.steering.netns import enter_netns
from tcpha.steering.nft import Nft


def measure(fn, items) -> dict[str, float]:
    walls, cpus = [], []
    for item in items:
        c0 = time.thread_time_ns()
        w0 = time.perf_counter_ns()
        fn(item)
        w1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        walls.append((w1 - w0) / 1000)
        cpus.append((c1 - c0) / 1000)
    walls.sort()
    return {
        "n": len(walls),
        "median": statistics.median(walls),
        "p99": walls[min(len(walls) - 1, int(len(walls) * 0.99))],
        "cpu": sum(cpus) / len(cpus),
    }


def connections(listener: socket.socket, n: int, payload: bytes) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(n):
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        c.sendall(payload)
        pairs.append((c, s))
    # Wait until every request is in its server's receive queue (it is what the FE would have peeked).
    for _, s in pairs:
        s.recv(len(payload), socket.MSG_PEEK | socket.MSG_WAITALL)
    return pairs


REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: tcpha-bench\r\n\r\n"
REQUEST_LEN = len(REQUEST)


def bench_repair(n: int) -> dict[str, dict]:
    request = REQUEST
    listener = socket.create_server(("127.0.0.1", 0), backlog=n + 16)
    pairs = connections(listener, n, request)
    states: list = []
    dumped = measure(lambda p: states.append(repair.dump(p[1])), pairs)
    blobs: list[bytes] = []
    encoded = measure(lambda st: blobs.append(st.to_bytes()), states)
    decoded_states: list = []
    decoded = measure(lambda b: decoded_states.append(repair.TcpState.from_bytes(b)), blobs)
    for _, s in pairs:
        repair.discard(s)
    restored_socks: list[socket.socket] = []
    restored = measure(lambda st: restored_socks.append(repair.restore(st)), decoded_states)
    # Check the restored connections really work (a sample) before believing the numbers.
    for (c, _), r in list(zip(pairs, restored_socks))[:: max(1, n // 20)]:
        r.settimeout(5)
        assert r.recv(len(request), socket.MSG_WAITALL) == request
        r.sendall(b"ok")
        c.settimeout(5)
        assert c.recv(2) == b"ok"
    for (c, _), r in zip(pairs, restored_socks):
        c.close()
        r.close()
    listener.close()
    return {"dump": dumped, "TcpState.to_bytes": encoded, "TcpState.from_bytes": decoded, "restore": restored,
            "_state_bytes": {"n": len(blobs[0]), "median": 0, "p99": 0, "cpu": 0}}


def bench_nft(n: int) -> dict[str, dict]:
    table = "tcphabench"
    fs = FlowSteering(table=table, ifname="lo", vip="10.9.0.100", ports=[80], flow_timeout=600)
    fs.install()
    flows = [FlowKey(f"10.9.{1 + i // 60000}.{2 + (i // 250) % 250}", 1024 + i % 60000, "10.9.0.100", 80)
             for i in range(n)]
    mac = "02:00:00:00:00:0b"
    out = {}
    out["freeze (nfnetlink)"] = measure(fs.freeze, flows)
    out["forward + thaw (nfnetlink, 1 transaction)"] = measure(lambda f: fs.forward(f, mac), flows)
    out["unforward (nfnetlink)"] = measure(fs.unforward, flows)
    batch = 100
    groups = [flows[i:i + batch] for i in range(0, n, batch)]
    per = measure(lambda g: fs.forward_many([(f, mac) for f in g]), groups)
    out[f"forward_many, per element ({batch}/transaction)"] = {k: (v / batch if k != "n" else v * batch)
                                                                for k, v in per.items()}
    fs.unforward_many(flows)
    # The same element add through libnftables (text commands), for comparison.
    nft = Nft()
    sample = flows[: min(n, 500)]
    out["add element via libnftables (text)"] = measure(
        lambda f: nft.run(f"add element netdev {table} forward {{ {f.nft()} timeout 600s : {mac} }}"), sample)
    fs.unforward_many(sample)
    # Element operations with a big map already loaded (does the cost grow with the table?).
    big = [FlowKey(f"10.8.{i // 60000}.{2 + (i // 250) % 250}", 1024 + i % 60000, "10.9.0.100", 80)
           for i in range(100_000)]
    fs.forward_many([(f, mac) for f in big])
    out["forward + thaw with 100k flows in the map"] = measure(lambda f: fs.forward(f, mac), flows)
    fs.remove()
    fs.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="operations per measurement (default 2000)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "repair.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/repair.py: needs root (TCP_REPAIR, namespaces, nftables)", file=sys.stderr)
        return 2
    name = f"tcphabench{secrets.token_hex(3)}"
    pr_netns.create(name)
    try:
        enter_netns(name)  # this process is dedicated to the benchmark: the main thread moves for good
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        results = bench_repair(args.n)
        results.update(bench_nft(args.n))
    finally:
        pr_netns.remove(name)
    load = os.getloadavg()
    lines = [
        "# Kernel hot path: TCP_REPAIR and nft element operations",
        "",
        f"`python3 bench/repair.py --n {args.n}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"kernel {platform.release()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} (shared machine: CPU time is the steadier figure).",
        "",
        "| operation | n | median wall µs | p99 wall µs | mean CPU µs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for op, r in results.items():
        if op.startswith("_"):
            continue
        lines.append(f"| {op} | {r['n']} | {r['median']:.1f} | {r['p99']:.1f} | {r['cpu']:.1f} |")
    lines += ["", f"TcpState.to_bytes() of a connection holding a {REQUEST_LEN}-byte peeked request: "
                  f"{results['_state_bytes']['n']} bytes.", "",
              "Per handoff the FE does freeze + dump + forward/thaw + discard (close); the BE does restore.", ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
