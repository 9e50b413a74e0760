#!/usr/bin/env python3
"""Quick measurement of the distcache tools (run by hand, not in CI).

    python3 bench/distcache-tools/run.py [--ops 50000] [--out bench/results/distcache-tools.md]

dc_test (ours) against dc_server, 512 sessions, random ops: -persistent, -clients 4 -persistent,
a new connection per operation, and -persistent through dc_client; over a UNIX socket and TCP
loopback.  Then the asyncio client's pipelined rate (GETs of 100-byte sessions), one future per
request in windows of 5000, and batches (get_many) of 5000.  The machine is shared: the load
average is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tcpha.distcache.address import connect_socket, parse_address  # noqa: E402
from tcpha.distcache.aio import AsyncDistcacheClient  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(addr: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            connect_socket(parse_address(addr), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {addr}")


def start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def dc_test(addr: str, *args: str) -> tuple[float, float]:
    """(ops/s, dc_test CPU seconds per operation)."""
    c0 = _children_cpu()
    r = subprocess.run([sys.executable, "-m", "tcpha.cli.dc_test", "-connect", addr, "-sessions", "512", "-timing", *args],
                       capture_output=True, text=True, timeout=600)
    cpu = _children_cpu() - c0
    if r.returncode != 0:
        raise RuntimeError(f"dc_test failed: {r.stdout} {r.stderr}")
    ops = int(args[args.index("-ops") + 1]) * (int(args[args.index("-clients") + 1]) if "-clients" in args else 1)
    return float(re.search(r"operations per second = (\d+)", r.stdout).group(1)), cpu / ops


async def pipelined(addr: str, total: int, window: int, batch: bool) -> tuple[float, float]:
    c = await AsyncDistcacheClient.connect(addr, timeout=30)
    ids = [os.urandom(32) for _ in range(512)]
    await c.remove_many(ids)
    assert all(await c.add_many([(i, os.urandom(100), 600000) for i in ids]))
    keys = [ids[j & 511] for j in range(window)]
    c0 = time.process_time()
    t0 = time.perf_counter()
    done = 0
    while done < total:
        if batch:
            res = await c.get_many(keys)
            assert None not in res
        else:
            futs = [c.get(k) for k in keys]
            for f in futs:
                if await f is None:
                    raise RuntimeError("miss")
        done += window
    rate = done / (time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / done
    await c.close()
    return rate, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=50000)
    ap.add_argument("--out", default=str(ROOT / "bench/results/distcache-tools.md"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dcb-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    rows = []
    load0 = os.getloadavg()[0]
    try:
        for kind in ("UNIX", "TCP"):
            addr = f"UNIX:{tmp}/srv" if kind == "UNIX" else f"IP:127.0.0.1:{free_port()}"
            agent = f"UNIX:{tmp}/agent-{kind}"
            procs.append(start("tcpha.cli.dc_server", "-listen", addr, "-sessions", "4096"))
            wait_listening(addr)
            procs.append(start("tcpha.cli.dc_client", "-listen", agent, "-server", addr))
            wait_listening(agent)
            n = str(a.ops)
            srv = psutil.Process(procs[-2].pid)

            def measure(what, target, fn, count):
                s0 = sum(srv.cpu_times()[:2])
                rate, client_cpu = fn()
                server_cpu = (sum(srv.cpu_times()[:2]) - s0) / count
                rows.append((kind, what, rate, target, client_cpu * 1e6, server_cpu * 1e6))

            measure("dc_test -persistent", "25,000", lambda: dc_test(addr, "-persistent", "-ops", n), a.ops)
            measure("dc_test -persistent -clients 4 (sum)", "57,000",
                    lambda: dc_test(addr, "-persistent", "-clients", "4", "-ops", n), 4 * a.ops)
            measure("dc_test, connection per operation", "11,000",
                    lambda: dc_test(addr, "-ops", str(a.ops // 5)), a.ops // 5)
            measure("dc_test -persistent through dc_client", "",
                    lambda: dc_test(agent, "-persistent", "-ops", n), a.ops)
            measure("aio pipelined GET, a future each (windows of 5000)", "150,000",
                    lambda: asyncio.run(pipelined(addr, 6 * a.ops, 5000, False)), 6 * a.ops)
            measure("aio pipelined GET, get_many batches of 5000", "150,000",
                    lambda: asyncio.run(pipelined(addr, 6 * a.ops, 5000, True)), 6 * a.ops)
            for p in procs:
                p.terminate()
                p.wait(5)
            procs.clear()
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()[0]
    lines = [
        "# distcache tools: quick measurement",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python3 bench/distcache-tools/run.py "
        f"--ops {a.ops}` on {os.cpu_count()} cores shared with other work (load average {load0:.2f} at the start, "
        f"{load1:.2f} at the end). dc_server, dc_client, dc_test and the asyncio client are all ours (Python "
        f"{sys.version.split()[0]}); client and server share the cores. 512 sessions, random ops.",
        "",
        "| transport | load | ops/s | target (the C tools here) | client CPU µs/op | dc_server CPU µs/op |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, what, rate, target, ccpu, scpu in rows:
        lines.append(f"| {kind} | {what} | {rate:,.0f} | {target} | {ccpu:.1f} | {scpu:.1f} |")
    lines += [
        "",
        "Client CPU is the dc_test process(es) or the asyncio client; on a shared machine it shows what",
        "the tools cost independently of the load (the rate is bounded by client + server + switches,",
        "serially, for dc_test; by the slower of the two for pipelined requests).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
