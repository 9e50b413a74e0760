#!/usr/bin/env python3
"""Benchmark the back end's relays: splice (tcpha.relay) against BPF sockmap (tcpha.bpf.relay).

Run by hand as root (not in CI):  python3 bench/relay.py [--mb 1024] [--runs 3] [--out bench/results/relay.md]

Everything runs inside a throw-away network namespace (created here, removed at the end, also on error):
each relay joins two loopback TCP connections, `peer <-> client` and `app <-> server`, as on a back end.
A second process plays the client and the application (one thread per socket, blocking send/recv) and
moves --mb MiB per connection in the chosen direction; this process runs the relay in an asyncio loop.

Reported per case (median of --runs): throughput, and CPU per GiB moved, twice:
- relay process: this process's user+system time (for splice: the relay's whole cost; for bpf: set-up
  and tear-down only, the copying runs in softirq and kworker context, charged to no process), and
- machine: every CPU's non-idle time from /proc/stat (relay + the endpoints + softirq + kworkers); the
  endpoints are the same in every case, so the difference between relays is the relays' cost. The
  machine is shared: the load average is recorded, and the machine figure is only as steady as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcpha.relay import SpliceRelay  # noqa: E402
from tcpha.bpf.relay import BpfRelay  # noqa: E402
from tcpha.steering.netns import enter_netns  # noqa: E402

BLOCK = 256 * 1024


def machine_busy() -> int:
    """Non-idle jiffies of all CPUs (user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]          # minus idle, iowait


def pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    outer = socket.create_connection(lsock.getsockname())
    inner, _ = lsock.accept()
    lsock.close()
    return outer, inner


def endpoints(conns: list[tuple[socket.socket, socket.socket]], relay_side: list[socket.socket], nbytes: int,
              direction: str, ready, go) -> None:
    """Child process: per connection, the sender writes nbytes then shuts down, the receiver reads to EOF
    (and the other side of each connection shuts down at once so that both directions end)."""
    for s in relay_side:              # the parent's: a copy here would keep a closed relay's socket open
        s.close()
    payload = os.urandom(BLOCK)
    threads = []

    def send(sock: socket.socket) -> None:
        left = nbytes
        view = memoryview(payload)
        while left:
            n = sock.send(view[:min(left, BLOCK)])
            left -= n
        sock.shutdown(socket.SHUT_WR)

    def receive(sock: socket.socket, expect: int) -> None:
        buf = bytearray(BLOCK)
        got = 0
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
        assert got == expect, f"received {got} of {expect}"

    for peer, server in conns:
        peer.setblocking(True)
        server.setblocking(True)
        src, dst = (server, peer) if direction == "down" else (peer, server)
        threads.append(threading.Thread(target=send, args=(src,)))
        threads.append(threading.Thread(target=receive, args=(dst, nbytes)))
        threads.append(threading.Thread(target=lambda s=dst: s.shutdown(socket.SHUT_WR)))
        threads.append(threading.Thread(target=receive, args=(src, 0)))
    ready.set()
    go.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def one_run(kind: str, nconn: int, nbytes: int, direction: str) -> dict[str, float]:
    conns, relays_socks = [], []
    for _ in range(nconn):
        peer, client = pair()
        app, server = pair()
        conns.append((peer, server))
        relays_socks.append((client, app))
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=endpoints, args=(conns, [s for p in relays_socks for s in p], nbytes, direction, ready, go),
                        daemon=True)
    child.start()
    for peer, server in conns:
        peer.close()
        server.close()
    ready.wait()

    async def relay_all() -> tuple[float, float, int, float]:
        loop = asyncio.get_running_loop()
        left = len(relays_socks)
        done = asyncio.Event()

        def finished(_r) -> None:
            nonlocal left
            left -= 1
            if not left:
                done.set()

        relays = []
        for client, app in relays_socks:
            if kind == "splice":
                relays.append(SpliceRelay(loop, client, app, finished))
            else:
                relays.append(BpfRelay(loop, client, app, finished))
        c0, b0, w0 = time.process_time(), machine_busy(), time.perf_counter()
        for r in relays:
            r.start()
        go.set()
        await done.wait()
        w1, b1, c1 = time.perf_counter(), machine_busy(), time.process_time()
        moved = sum(r.bytes_up + r.bytes_down for r in relays)
        return w1 - w0, c1 - c0, moved, (b1 - b0) / os.sysconf("SC_CLK_TCK")

    wall, cpu, moved, busy = asyncio.run(relay_all())
    child.join()
    assert child.exitcode == 0, f"endpoints failed (exit {child.exitcode})"
    assert moved == nconn * nbytes, f"moved {moved}, expected {nconn * nbytes}"
    gib = moved / (1 << 30)
    return {"gbps": moved * 8 / wall / 1e9, "relay_s_per_gib": cpu / gib, "machine_s_per_gib": busy / gib}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="MiB per connection (default 1024)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default="splice,bpf", help="relays to compare, comma-separated: splice, bpf")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "relay.md"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/relay.py: needs root (network namespace, BPF)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/relay.py: terminated"))   # finally: runs
    kinds = args.kinds.split(",")
    ns = "bnch" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        enter_netns(ns)
        cases = [(1, args.mb, "down"), (1, args.mb, "up"), (8, max(1, args.mb // 8), "down")]
        rows = []
        load = os.getloadavg()[0]
        for nconn, mb, direction in cases:
            for kind in kinds:
                results = [one_run(kind, nconn, mb << 20, direction) for _ in range(args.runs)]
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                rows.append((kind, nconn, mb, direction, med))
                print(f"{kind:12} {nconn} x {mb} MiB {direction:4}: {med['gbps']:6.2f} Gbit/s, "
                      f"relay {med['relay_s_per_gib']:.3f} s/GiB, machine {med['machine_s_per_gib']:.3f} s/GiB",
                      flush=True)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    lines = [
        "# Back-end relay: splice against BPF sockmap",
        "",
        f"`python3 bench/relay.py --mb {args.mb} --runs {args.runs}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {platform.release()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load:.1f} at the start "
        "(shared machine).",
        "",
        "Loopback TCP in a namespace: client <-> relay <-> application, as on a back end. Median of the runs.",
        "`bpf`: sockhash with stream parser + stream verdict. CPU per GiB moved: the relay process (user+system),",
        "and the whole machine",
        "(/proc/stat non-idle: relay, endpoints, softirq, kworkers; the endpoints cost the same in every row).",
        "",
        "| relay | connections | MiB each | direction | Gbit/s | relay process CPU s/GiB | machine CPU s/GiB |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for kind, nconn, mb, direction, med in rows:
        lines.append(f"| {kind} | {nconn} | {mb} | {direction} | {med['gbps']:.2f} | "
                     f"{med['relay_s_per_gib']:.3f} | {med['machine_s_per_gib']:.3f} |")
    if load > (os.cpu_count() or 1):
        lines += ["", f"Load average {load:.1f} on {os.cpu_count()} CPUs: the machine was saturated by other work, so the",
                  "machine column is about CPUs x wall time per GiB, not the relays' cost; the relay-process column",
                  "holds (with bpf the copying runs in softirq and kworkers, charged to no process)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
