#!/usr/bin/env python3
"""Our dc_server against the original C dc_server, both driven by the original's own dc_test
(run by hand, not in CI; builds the original in the git-ignored bench/distcache/orig/, or in
$DISTCACHE_ORIG, if it is not there).

    python3 bench/distcache/versus_original.py [--ops N] [--rounds R] [--out bench/results/distcache-vs-original.md]

Loads, each on a UNIX socket, 512 sessions per client, random add/remove/get/have (dc_test's
algorithm), the server with -sessions 4096:
  * C dc_test -persistent, 1 client and 4 clients at once;
  * C dc_test with a new connection per operation (its default), 1 and 4 clients;
plus our pipelined asyncio client (windows of 2000 GETs) against our server.
The original prints no timing, so each client's wall time is measured around its process; the
rate of a load is the total operations over the wall time of the whole load.  Also measured: the
server's CPU time per operation (user+sys of the server process), steadier than the rates on a
shared machine.  The two servers alternate, load by load, `--rounds` times; the median is kept.
Writes the results file and a plot (PNG, same name) next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.distcache.original import ORIGINAL_DIR, build_original, original_version  # noqa: E402
from bench.distcache.run import ServerProc, pipelined  # noqa: E402

TARGET_RATIO = {1: 1.2, 4: 1.5}
TARGET_PIPELINED = 150_000


def run_load(server: ServerProc, dc_test: Path, clients: int, persistent: bool, ops: int) -> dict:
    argv = [str(dc_test), "-connect", server.listen, "-sessions", "512", "-ops", str(ops)]
    if persistent:
        argv.append("-persistent")
    cpu0 = server.cpu()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    errs = [p.communicate(timeout=1800)[1] for p in procs]
    wall = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    for p, err in zip(procs, errs):
        if p.returncode != 0 or "Info, all tests complete" not in err:
            raise RuntimeError(f"dc_test failed (exit {p.returncode}): {err.strip()}")
    total = clients * ops
    return {"rate": total / wall, "server_us_per_op": cpu / total * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100_000, help="operations per dc_test client (persistent)")
    ap.add_argument("--perop-ops", type=int, default=20_000, help="operations per client, connection per op")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipelined-ops", type=int, default=300_000)
    ap.add_argument("--orig", type=Path, default=ORIGINAL_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/distcache-vs-original.md")
    args = ap.parse_args()

    tools = build_original(args.orig)
    servers = {"C dc_server": [str(tools["dc_server"])], "tcpha dc_server": None}
    loads = [(c, p) for p in (True, False) for c in (1, 4)]
    results: dict[tuple[str, int, bool], list[dict]] = {}
    load0 = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="dc-vs-") as tmp:
        for rnd in range(args.rounds):
            for clients, persistent in loads:
                for name, argv in servers.items():
                    srv = ServerProc(f"UNIX:{tmp}/{rnd}-{clients}-{int(persistent)}-{name[0]}.sock",
                                     "-sessions", "4096", argv=argv)
                    try:
                        r = run_load(srv, tools["dc_test"], clients, persistent,
                                     args.ops if persistent else args.perop_ops)
                    finally:
                        srv.stop()
                    results.setdefault((name, clients, persistent), []).append(r)
                    print(rnd, name, clients, "persistent" if persistent else "per-op", r, flush=True)
        pipe = pipelined(f"UNIX:{tmp}/pipe.sock", args.pipelined_ops)
        print("pipelined", pipe, flush=True)
    load1 = os.getloadavg()[0]

    def med(name: str, clients: int, persistent: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, clients, persistent)])

    lines = [
        "# distcache: tcpha dc_server against the original C dc_server",
        "",
        f"Run {started} by `python3 bench/distcache/versus_original.py --ops {args.ops} --perop-ops "
        f"{args.perop_ops} --rounds {args.rounds}` on {os.cpu_count()} cores shared with other work (load "
        f"average {load0:.2f} at the start, {load1:.2f} at the end). Original: {original_version(args.orig)}, "
        "built by `bench/distcache/original.py`. Both servers are driven by the **original's own dc_test** "
        "(C), 512 sessions per client, UNIX socket, servers with `-sessions 4096`; the two servers "
        f"alternate load by load, {args.rounds} rounds, medians shown. Rates are total operations over the "
        "wall time of the load (the original prints no timing). Server CPU per operation is the server "
        "process's user+sys time over the operations: steadier than the rates on a shared machine.",
        "",
        "| load | clients | C ops/s | tcpha ops/s | ratio | target | C server µs/op | tcpha server µs/op |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    plot_rows = []
    for clients, persistent in loads:
        c_rate = med("C dc_server", clients, persistent, "rate")
        t_rate = med("tcpha dc_server", clients, persistent, "rate")
        c_cpu = med("C dc_server", clients, persistent, "server_us_per_op")
        t_cpu = med("tcpha dc_server", clients, persistent, "server_us_per_op")
        label = "dc_test -persistent" if persistent else "dc_test, connection per operation"
        target = f"≥ {TARGET_RATIO[clients]}x"
        lines.append(f"| {label} | {clients} | {c_rate:,.0f} | {t_rate:,.0f} | {t_rate / c_rate:.2f}x | "
                     f"{target} | {c_cpu:.1f} | {t_cpu:.1f} |")
        plot_rows.append((f"{'persistent' if persistent else 'per-op'}\n{clients} client{'s' if clients > 1 else ''}",
                          c_rate, t_rate, c_cpu, t_cpu))
    lines += [
        "",
        f"Pipelined asyncio client (`tcpha.distcache.aio`, windows of 2000 GETs) against tcpha dc_server: "
        f"**{pipe['rate']:,.0f} ops/s** (target {TARGET_PIPELINED:,}), server {pipe['server_us_per_op']:.1f} µs/op.",
        "",
        "Every run:",
        "",
        "| server | clients | load | ops/s | server µs/op |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for (name, clients, persistent), rs in results.items():
        for r in rs:
            lines.append(f"| {name} | {clients} | {'persistent' if persistent else 'per-op'} | "
                         f"{r['rate']:,.0f} | {r['server_us_per_op']:.1f} |")
    png = args.out.with_suffix(".png")
    lines += ["", f"Plot: `{png.name}` (next to this file).", ""]
    args.out.write_text("\n".join(lines))
    _plot(plot_rows, png)
    print(args.out, png)
    return 0


def _plot(rows: list[tuple[str, float, float, float, float]], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(rows))
    w = 0.38
    for ax, (ci, ti), title, unit in ((ax1, (1, 2), "operations per second (higher is better)", "ops/s"),
                                      (ax2, (3, 4), "server CPU per operation (lower is better)", "µs")):
        ax.bar([i - w / 2 for i in x], [r[ci] for r in rows], w, label="C dc_server (original)")
        ax.bar([i + w / 2 for i in x], [r[ti] for r in rows], w, label="tcpha dc_server")
        ax.set_xticks(list(x), [r[0] for r in rows], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle("dc_server driven by the original dc_test (UNIX socket, 512 sessions per client)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
