#!/usr/bin/env python3
"""Benchmark the front end's per-flow steering calls: nft (nfnetlink transactions) against bpf (map calls).

Run by hand as root (not in CI):  python3 bench/steering.py [--flows 5000] [--runs 3] [--out bench/results/steering.md]

In a throw-away network namespace (created here, removed at the end, also on error) with one veth pair,
each implementation is installed on the same interface and, per flow, does what a handoff does:
freeze(flow) then forward_many([(flow, MAC, id)]) (one call each, as the worker does without batching),
then unforward_closed([(flow, id)]) (the back end's FlowClosed). Reported: wall and CPU µs per
freeze+forward pair and per unforward, median of --runs; also the batched forms (freeze_many /
forward_many over all flows at once) per flow.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcpha.steering import BpfFlowSteering, FlowKey, FlowSteering  # noqa: E402

MAC = "02:be:00:00:00:01"
VIP = "10.212.0.1"


def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def run_case(kind: str, ns: str, flows: int) -> dict[str, float]:
    cls = BpfFlowSteering if kind == "bpf" else FlowSteering
    s = cls(table="bench", ifname="fe0", vip=VIP, ports=[80], netns=ns, flow_timeout=600)
    s.install()
    keys = [FlowKey(f"10.213.{i // 250}.{i % 250 + 1}", 10000 + i % 50000, VIP, 80) for i in range(flows)]
    try:
        def pairs() -> None:
            for i, k in enumerate(keys):
                s.freeze(k)
                s.forward_many([(k, MAC, i + 1)])

        def closes() -> None:
            for i, k in enumerate(keys):
                s.unforward_closed([(k, i + 1)])

        def batched() -> None:
            s.freeze_many(keys)
            s.forward_many([(k, MAC, i + 1) for i, k in enumerate(keys)])
            s.unforward_many(keys)

        pw, pc = _timed(pairs)
        cw, cc = _timed(closes)
        bw, bc = _timed(batched)
    finally:
        s.remove()
        s.close()
    us = 1e6 / flows
    return {"pair_wall": pw * us, "pair_cpu": pc * us, "close_wall": cw * us, "close_cpu": cc * us,
            "batch_wall": bw * us, "batch_cpu": bc * us}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/steering.md")
    args = ap.parse_args()
    ns = "bst" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "fe0", "type", "veth", "peer", "name", "pe0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "fe0", "up"], check=True)
        results: dict[str, list[dict[str, float]]] = {"nft": [], "bpf": []}
        load = os.getloadavg()[0]
        for _ in range(args.runs):
            for kind in ("nft", "bpf"):
                results[kind].append(run_case(kind, ns, args.flows))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    rows = []
    for kind, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append(f"| {kind} | {med['pair_wall']:.1f} | {med['pair_cpu']:.1f} | {med['close_wall']:.1f} | "
                    f"{med['close_cpu']:.1f} | {med['batch_wall']:.1f} | {med['batch_cpu']:.1f} |")
    text = "\n".join([
        "# Front-end steering: nft transactions against BPF map calls", "",
        f"`python3 bench/steering.py --flows {args.flows} --runs {args.runs}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {platform.release()}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average {load:.1f} at the start (shared machine).", "",
        "Per flow, µs, median of the runs. pair: freeze(flow) + forward_many([(flow, MAC, id)]), one call each "
        "(the worker's unbatched path); close: unforward_closed([(flow, id)]) (reads the entry's handoff id, "
        "then removes it); batched: freeze_many + forward_many + unforward_many over all flows, per flow.", "",
        "| steering | pair wall | pair CPU | close wall | close CPU | batched wall | batched CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows, "",
    ])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
