#!/usr/bin/env python3
"""TLS through the front end, in the namespace lab: full vs resumed handshake rates with the shared
session cache and without, and the time to the first response byte added by the handoff.

Run by hand as root (not in CI):   python bench/tls/through_fe.py [--seconds 3] [--clients 2] [--samples 300]
Writes bench/results/tls-fe.md.

For each setup (shared: dc_server on the cache host + a dc_client on each back end, `sessioncache` set;
unshared: no `sessioncache`) a lab is built with tcpha-fe (ports 80 443, SNI rules a.* -> be1, b.* -> be2)
and two tcpha-be terminating TLS in front of the lab's HTTP origin. Clients run in the client host's
namespace, each one connection at a time: connect, handshake, `GET /whoami`, read to the close.
  full      no session offered;
  resumed   the newest session offered, SNI alternating a.example / b.example: every resumption
            crosses back ends (be1 <-> be2), which is what a non-sticky balancer needs.
Time to first byte (TTFB): connect() to the first byte of the HTTP answer, full handshakes, one client,
through VIP:443 vs "direct": the same TLS termination code (tcpha.be.tls, same context settings and
cache) run as a plain TLS server on be1's own address, so the difference is what the handoff adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "tls-fe.md"
DIRECT_PORT = 8443
REQUEST = "GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"


# -- client (runs inside the client host's namespace) --------------------------------------------------

def client_main(args: argparse.Namespace) -> int:
    # Several targets: connections alternate between them, so that a slow moment of this shared
    # machine hits every target alike (the TTFB comparison is made this way).
    targets = []
    for t in args.target.split(","):
        host, _, port = t.rpartition(":")
        targets.append((host, int(port)))
    by_target: list[list[float]] = [[] for _ in targets]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(args.cafile)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[args.version]
    snis = args.sni.split(",")
    session = None
    n = errors = reused = 0
    ttfb: list[float] = []
    deadline = time.monotonic() + args.seconds
    t_start = time.perf_counter()
    while (time.monotonic() < deadline) if not args.count else (n + errors < args.count):
        sni = snis[(n + errors) % len(snis)]
        k = (n + errors) % len(targets)
        addr = targets[k]
        try:
            t0 = time.perf_counter()
            raw = socket.create_connection(addr, timeout=10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if args.mode == "http":                  # plain HTTP: the handoff alone, no TLS
                raw.sendall(REQUEST.format(host=sni).encode())
                data = raw.recv(65536)
                t1 = time.perf_counter()
                while True:
                    b = raw.recv(65536)
                    if not b:
                        break
                    data += b
                raw.close()
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"answer {data[:40]!r}")
                n += 1
                ttfb.append((t1 - t0) * 1000)
                by_target[k].append((t1 - t0) * 1000)
                continue
            with ctx.wrap_socket(raw, server_hostname=sni, session=session if args.mode == "resumed" else None) as s:
                s.sendall(REQUEST.format(host=sni).encode())
                first = s.recv(65536)
                t1 = time.perf_counter()
                data = first
                while True:
                    try:
                        b = s.recv(65536)
                    except ssl.SSLEOFError:
                        break
                    if not b:
                        break
                    data += b
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"answer {data[:40]!r}")
                reused += s.session_reused
                session = s.session
        except Exception:                            # noqa: BLE001 - counted
            errors += 1
            continue
        n += 1
        ttfb.append((t1 - t0) * 1000)
        by_target[k].append((t1 - t0) * 1000)
    wall = time.perf_counter() - t_start
    print(json.dumps({"n": n, "errors": errors, "reused": reused, "wall": wall, "ttfb_ms": ttfb, "by_target": by_target}))
    return 0


# -- direct TLS server on a back end (same code as tcpha-be's termination, no handoff) ----------------

def direct_main(args: argparse.Namespace) -> int:
    from tcpha.be.tls import TlsTermination
    cfg = SimpleNamespace(tlscert=args.cert, tlskey=args.key, tlsports=[DIRECT_PORT],
                          sessioncache=args.cache or None, sessiontimeout=300)
    term = TlsTermination.from_config(cfg)
    assert term is not None

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server((args.listen, DIRECT_PORT), backlog=512)
        lsock.setblocking(False)
        relays: set = set()

        def accept() -> None:
            while True:
                try:
                    client, _ = lsock.accept()
                except BlockingIOError:
                    return
                app = socket.create_connection(("127.0.0.1", args.app_port))
                app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                relay = term.relay(loop, client, app, relays.discard)
                relays.add(relay)
                relay.start()

        loop.add_reader(lsock.fileno(), accept)
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


# -- the driver ---------------------------------------------------------------------------------------

def run_clients(lab, target: str, cafile: str, version: str, mode: str, clients: int, seconds: float,
                snis: str, count: int = 0) -> dict:
    argv = [sys.executable, __file__, "client", "--target", target, "--cafile", cafile, "--version", version,
            "--mode", mode, "--seconds", str(seconds), "--sni", snis, "--count", str(count)]
    procs = [lab.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise SystemExit(f"client failed: {err.strip()[-500:]}")
        outs.append(json.loads(out))
    n = sum(o["n"] for o in outs)
    wall = max(o["wall"] for o in outs)
    ttfb = sorted(x for o in outs for x in o["ttfb_ms"])
    return {"n": n, "errors": sum(o["errors"] for o in outs), "reused": sum(o["reused"] for o in outs),
            "rate": n / wall if wall else 0.0, "ttfb": ttfb,
            "by_target": [sorted(x) for x in outs[0]["by_target"]]}


def interleaved(lab, targets: str, cafile: str, version: str, mode: str, sni: str, count: int) -> tuple[dict, dict]:
    """TTFB through the front end and direct, connections alternating between the two."""
    r = run_clients(lab, targets, cafile, version, mode, 1, 0, sni, count=2 * count)
    fe, direct = r["by_target"]
    return {"ttfb": fe, "errors": r["errors"]}, {"ttfb": direct, "errors": r["errors"]}


def cpu_seconds(dep) -> tuple[float, float]:
    """CPU seconds used so far by tcpha-fe (arbiter + workers) and by both tcpha-be (with children)."""
    import psutil

    def tree(pid: int) -> float:
        total = 0.0
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total
    return tree(dep.fe_proc.pid), sum(tree(p.pid) for p in dep.be_procs.values())


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_setup(shared: bool, args: argparse.Namespace) -> dict:
    from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab
    from tcpha.lab.demo import APP_PORT, LabDeployment
    from tcpha.lab.tls_demo import CACHE_PORT, TLS_VPORT, TlsLab

    lab = NamespaceLab(DEFAULT_TOPOLOGY, "b" + secrets.token_hex(2) + str(os.getpid() % 10))
    rows: dict = {}
    try:
        lab.up()
        tls = TlsLab(LabDeployment(lab), cache=shared)
        tls.start()
        be1 = lab.ip("be1")
        argv = [sys.executable, __file__, "direct", "--listen", be1, "--cert", str(tls.cert), "--key", str(tls.key),
                "--app-port", str(APP_PORT)]
        if shared:
            argv += ["--cache", f"IP:127.0.0.1:{CACHE_PORT}"]
        lab.spawn("be1", argv, name="direct-tls", ready_tcp=(be1, DIRECT_PORT), timeout=15)
        vip = f"{tls.dep.vip}:{TLS_VPORT}"
        for version in ("TLSv1_2", "TLSv1_3"):
            for mode in ("full", "resumed"):
                cpu0 = cpu_seconds(tls.dep)
                r = run_clients(lab, vip, str(tls.cert), version, mode, args.clients, args.seconds,
                                "a.example,b.example")
                cpu1 = cpu_seconds(tls.dep)
                r["fe_us"] = (cpu1[0] - cpu0[0]) / max(r["n"], 1) * 1e6
                r["be_us"] = (cpu1[1] - cpu0[1]) / max(r["n"], 1) * 1e6
                rows[(version, mode)] = r
                print(f"{'shared' if shared else 'unshared'} {version} {mode}: {r['rate']:.0f}/s BE {r['be_us']:.0f} us/conn "
                      f"reused {r['reused']}/{r['n']} errors {r['errors']}", flush=True)
            if shared:
                fe, direct = interleaved(lab, f"{vip},{be1}:{DIRECT_PORT}", str(tls.cert), version, "full",
                                         "a.example", args.samples)
                rows[(version, "ttfb")] = (fe, direct)
                print(f"TTFB {version}: through FE p50 {pct(fe['ttfb'], .5):.2f} p99 {pct(fe['ttfb'], .99):.2f} ms; "
                      f"direct p50 {pct(direct['ttfb'], .5):.2f} p99 {pct(direct['ttfb'], .99):.2f} ms", flush=True)
        if shared:
            # The handoff alone: plain HTTP through VIP:80 (-> be2 by URI rule) vs straight to be2's origin.
            fe, direct = interleaved(lab, f"{tls.dep.vip}:80,{lab.ip('be2')}:{APP_PORT}", str(tls.cert), "TLSv1_3",
                                     "http", "x", args.samples)
            rows[("plain HTTP", "ttfb")] = (fe, direct)
            print(f"TTFB plain HTTP: through FE p50 {pct(fe['ttfb'], .5):.2f} p99 {pct(fe['ttfb'], .99):.2f} ms; "
                  f"direct p50 {pct(direct['ttfb'], .5):.2f} p99 {pct(direct['ttfb'], .99):.2f} ms", flush=True)
    finally:
        lab.down()
    return rows


def write_results(results: dict, args: argparse.Namespace, load: tuple) -> str:
    lines = ["# TLS through the front end: handshake rates and added time to first byte", "",
             f"`python bench/tls/through_fe.py --seconds {args.seconds:g} --clients {args.clients} --samples "
             f"{args.samples}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
             f"{os.cpu_count()} CPUs shared with other work (load average {load[0]:.1f} at start, "
             f"{load[1]:.1f} at end), Python {platform.python_version()}, {ssl.OPENSSL_VERSION}.", "",
             "Namespace lab: client -> tcpha-fe (VIP:443, SNI rules a.* -> be1, b.* -> be2) -> TCP handoff -> "
             "tcpha-be (TLS termination, tcpha.be.tls) -> HTTP origin on the back end; the answer goes from the "
             "back end straight to the client. P-256 certificate. Clients: "
             f"{args.clients} processes in the client namespace, one connection at a time "
             "(connect, handshake, GET, read to close). `resumed` alternates a.example / b.example offering the "
             "newest session, so every resumption crosses back ends.", "",
             "`FE CPU` / `BE CPU`: CPU time of tcpha-fe (all processes) / of both tcpha-be per connection, "
             "from psutil: the BE column is where full and resumed handshakes differ (the clients here are "
             "latency-bound, one connection at a time, so `rate` mostly shows the per-connection latency "
             "of this loaded machine, not the servers' capacity).", "",
             "| setup | TLS | connections | rate /s | FE CPU µs/conn | BE CPU µs/conn | reused | errors | p50 ms | p99 ms |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setup in ("shared", "unshared"):
        for (version, mode), r in results.get(setup, {}).items():
            if mode == "ttfb":
                continue
            lines.append(f"| {setup} | {version.replace('_', '.')} | {mode} | {r['rate']:.0f} | {r['fe_us']:.0f} | "
                         f"{r['be_us']:.0f} | {r['reused']}/{r['n']} | "
                         f"{r['errors']} | {pct(r['ttfb'], .5):.2f} | {pct(r['ttfb'], .99):.2f} |")
    lines += ["", "## Resumed / full (target ≥ 1.5×)", "", "| setup | TLS | rate ratio | BE capacity ratio (CPU/conn full ÷ resumed) |",
              "| --- | --- | ---: | ---: |"]
    for setup in ("shared", "unshared"):
        res = results.get(setup, {})
        for version in ("TLSv1_2", "TLSv1_3"):
            if (version, "full") in res and (version, "resumed") in res:
                ratio = res[(version, "resumed")]["rate"] / max(res[(version, "full")]["rate"], 1e-9)
                cap = res[(version, "full")]["be_us"] / max(res[(version, "resumed")]["be_us"], 1e-9)
                lines.append(f"| {setup} | {version.replace('_', '.')} | {ratio:.2f}× | {cap:.2f}× |")
    lines += ["", "## Time to first response byte: through the front end vs direct (target: ≤ 2 ms added at p99)", "",
              f"{args.samples} sequential full handshakes each, one client, shared setup, connections alternating "
              "between the two paths (so load spikes of this shared machine hit both alike). Direct = the same "
              "termination code as a plain TLS server on be1's address (no front end, no handoff); plain HTTP: "
              "VIP:80 (handed off to be2) vs be2's origin itself.", "",
              "| TLS | path | p50 ms | p90 ms | p99 ms | errors |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    shared = results.get("shared", {})
    for version in ("TLSv1_2", "TLSv1_3", "plain HTTP"):
        if (version, "ttfb") not in shared:
            continue
        fe, direct = shared[(version, "ttfb")]
        for name, r in (("through tcpha-fe", fe), ("direct", direct)):
            lines.append(f"| {version.replace('_', '.')} | {name} | {pct(r['ttfb'], .5):.2f} | {pct(r['ttfb'], .9):.2f} | "
                         f"{pct(r['ttfb'], .99):.2f} | {r['errors']} |")
        lines.append(f"| {version.replace('_', '.')} | **added** | {pct(fe['ttfb'], .5) - pct(direct['ttfb'], .5):+.2f} | "
                     f"{pct(fe['ttfb'], .9) - pct(direct['ttfb'], .9):+.2f} | "
                     f"{pct(fe['ttfb'], .99) - pct(direct['ttfb'], .99):+.2f} | |")
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--cafile", required=True)
    c.add_argument("--version", default="TLSv1_3")
    c.add_argument("--mode", choices=["full", "resumed", "http"], default="full")
    c.add_argument("--seconds", type=float, default=3)
    c.add_argument("--count", type=int, default=0, help="connections to make (0: for --seconds)")
    c.add_argument("--sni", default="a.example")
    d = sub.add_parser("direct")
    d.add_argument("--listen", required=True)
    d.add_argument("--cert", required=True)
    d.add_argument("--key", required=True)
    d.add_argument("--cache")
    d.add_argument("--app-port", type=int, default=8080)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--setups", default="shared,unshared")
    args = p.parse_args(argv)
    if args.cmd == "client":
        return client_main(args)
    if args.cmd == "direct":
        return direct_main(args)
    load0 = os.getloadavg()[0]
    results = {}
    for setup in args.setups.split(","):
        results[setup] = bench_setup(setup == "shared", args)
    print(write_results(results, args, (load0, os.getloadavg()[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
