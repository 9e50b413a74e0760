"""bench/handoff: wrk through tcpha, through HAProxy with the same rules, and directly to a back end.

    sudo python3 bench/handoff/run.py [--duration 5] [--connections 32] [--out bench/results/handoff.md]
    sudo python3 bench/handoff/run.py --fe-only [--repeat 3] [--profile /tmp/fe.prof]

--fe-only measures only the front end's handoff path (bench/results/fe-profile.md): 1 KiB through tcpha
at --connections and at 128 clients, --repeat times, printing req/s and FE CPU per handoff (no direct,
HAProxy or latency rows). --profile PREFIX runs the front end's worker under cProfile (TCPHA_PROFILE:
tcpha.fe.worker) and prints its top functions after the run; the profiler's own cost inflates the CPU
figures of such a run, so measure with and without it apart.

Runs in a namespace lab of its own (removed at the end): client, fe, be1, be2; nginx on the back ends
(port 8080); a new connection per request (`Connection: close`), 1 KiB, 100 KiB and 1 MiB responses.
For each path it records req/s, MB/s, the front end's CPU seconds per GB served (tcpha-fe or haproxy
processes, user+system, from /proc), p50/p99 latency; then, one connection at a time, the latency
tcpha adds to a request; and the front end's CPU time per handoff. Not run in CI (it takes ~1 minute
and its numbers depend on the machine): results go to the file named by --out.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import pstats
import re
import secrets
import sys
import time
from pathlib import Path

import psutil

from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab
from tcpha.lab.demo import APP_PORT, LabDeployment

SIZES = [("1 KiB", "1k.bin"), ("100 KiB", "100k.bin"), ("1 MiB", "1m.bin")]

HAPROXY_CFG = """global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind {fe}:80
    acl img path_end jpg
    use_backend be1 if img
    default_backend be2
backend be1
    server be1 {be1}:{port}
backend be2
    server be2 {be2}:{port}
"""


def parse_wrk(out: str) -> dict:
    def num(pattern: str, default: float = float("nan")) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    def latency(p: str) -> float:
        m = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
    mbs = float(m.group(1)) * {"B": 1e-6, "KB": 1024 / 1e6, "MB": 1024 ** 2 / 1e6, "GB": 1024 ** 3 / 1e6}[m.group(2)] if m else float("nan")
    return {
        "requests": int(num(r"(\d+) requests in")),
        "rps": num(r"Requests/sec:\s+([\d.]+)"),
        "mbs": mbs,
        "p50": latency("50"), "p99": latency("99"),
        "errors": int(num(r"Socket errors:.*?(\d+)", 0)) + int(num(r"Non-2xx or 3xx responses: (\d+)", 0)),
        "raw": out,
    }


def cpu_seconds(pids: list[int], system: list[float] | None = None) -> float:
    """User+system CPU seconds of pids and their children; the system part is added to system[0]."""
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
                total += t.user + t.system
                if system is not None:
                    system[0] += t.system
            except psutil.NoSuchProcess:
                pass
    return total


class Bench:
    def __init__(self, lab: NamespaceLab, dep: LabDeployment, duration: int, connections: int):
        self.lab = lab
        self.dep = dep
        self.duration = duration
        self.connections = connections

    def wrk(self, url: str, connections: int | None = None, pids: list[int] = ()) -> dict:
        c = connections or self.connections
        argv = ["wrk", "-t1", f"-c{c}", f"-d{self.duration}s", "--latency", "-H", "Connection: close", url]
        sys_before, sys_after = [0.0], [0.0]
        before = cpu_seconds(list(pids), sys_before)
        out = self.lab.run("client", argv, capture_output=True, text=True, timeout=self.duration + 60).stdout
        used = cpu_seconds(list(pids), sys_after) - before
        r = parse_wrk(out)
        r["cpu"] = used
        r["cpu_sys"] = sys_after[0] - sys_before[0]
        gb = r["mbs"] * self.duration / 1000 if r["mbs"] == r["mbs"] else 0
        r["cpu_per_gb"] = used / gb if gb and pids else float("nan")
        r["cpu_per_req_us"] = used / r["requests"] * 1e6 if r["requests"] and pids else float("nan")
        return r


def run(args: argparse.Namespace) -> str:
    prefix = "b" + secrets.token_hex(2) + str(os.getpid() % 10)
    lab = NamespaceLab(DEFAULT_TOPOLOGY, prefix)
    rows: list[tuple[str, str, dict]] = []
    extra: list[str] = []
    try:
        lab.up()
        dep = LabDeployment(lab)
        dep.start_origins(kind="nginx")
        for host in dep.backends:
            dep.start_backend(host, dbglevel=2)
        if args.profile:                       # the front end only: the back ends are already running
            os.environ["TCPHA_PROFILE"] = args.profile
        try:
            dep.start_fe(dbglevel=2, startservers=1, maxclients=1024)
        finally:
            os.environ.pop("TCPHA_PROFILE", None)
        bench = Bench(lab, dep, args.duration, args.connections)
        be2 = lab.ip("be2")
        fe_pid = dep.fe_proc.pid
        if args.fe_only:
            return fe_only(args, bench, dep, fe_pid)

        for label, name in SIZES:
            rows.append((label, "direct", bench.wrk(f"http://{be2}:{APP_PORT}/{name}")))
            rows.append((label, "tcpha", bench.wrk(f"http://{dep.vip}/{name}", pids=[fe_pid])))

        # latency added by the handoff, one connection at a time (no queueing)
        lat_direct = bench.wrk(f"http://{be2}:{APP_PORT}/1k.bin", connections=1)
        lat_tcpha = bench.wrk(f"http://{dep.vip}/1k.bin", connections=1, pids=[fe_pid])
        be_pids = [p.pid for p in dep.be_procs.values()]
        # handoff rate from one worker with more clients
        peak = bench.wrk(f"http://{dep.vip}/1k.bin", connections=128, pids=[fe_pid])
        dep.stop_fe()

        cfg = dep.dir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(fe=lab.ip("fe"), be1=lab.ip("be1"), be2=be2, port=APP_PORT))
        hap = lab.spawn("fe", ["haproxy", "-db", "-f", str(cfg)], name="haproxy",
                        ready_tcp=(lab.ip("fe"), 80), timeout=10)
        for label, name in SIZES:
            rows.append((label, "haproxy", bench.wrk(f"http://{lab.ip('fe')}/{name}", pids=[hap.pid])))
        lab.stop(hap)

        extra.append(f"- Latency added by tcpha, one connection at a time (1 KiB): p50 "
                     f"{lat_tcpha['p50'] - lat_direct['p50']:.2f} ms, p99 {lat_tcpha['p99'] - lat_direct['p99']:.2f} ms "
                     f"(direct p50/p99 {lat_direct['p50']:.2f}/{lat_direct['p99']:.2f} ms, through tcpha "
                     f"{lat_tcpha['p50']:.2f}/{lat_tcpha['p99']:.2f} ms).")
        extra.append(f"- Handoffs from one worker, 128 clients, 1 KiB: {peak['rps']:.0f} handoffs/s, front-end CPU "
                     f"{peak['cpu_per_req_us']:.0f} us per handoff ({peak['cpu'] / args.duration * 100:.0f}% of a core), "
                     f"{peak['errors']} errors.")
        extra.append(f"- Front-end CPU per handed-off connection at 32 clients: " + ", ".join(
            f"{label} {r['cpu_per_req_us']:.0f} us" for label, path, r in rows if path == "tcpha") + ".")
    finally:
        lab.down()

    out = ["# bench/handoff results", "",
           f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python3 bench/handoff/run.py "
           f"--duration {args.duration} --connections {args.connections}` on {os.cpu_count()} cores "
           f"(`{os.uname().release}`); the lab's client, FE, back ends, nginx and wrk share these cores "
           f"(and, during this run, whatever else the machine was doing).",
           "`wrk -t1 -c{c} -d{d}s -H 'Connection: close'` from the client host: a new connection per request. "
           "tcpha: one front-end worker (startservers = 1), rules `jpg$ -> be1`, `.* -> be2`; HAProxy 2.6 with "
           "the same rules (`path_end jpg`), one thread; direct: the client to nginx on be2.".format(
               c=args.connections, d=args.duration), "",
           "| size | path | req/s | MB/s | FE CPU s/GB | FE CPU us/req | p50 ms | p99 ms | errors |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, path, r in rows:
        def f(v: float, fmt: str) -> str:
            return "-" if v != v else format(v, fmt)
        out.append(f"| {label} | {path} | {f(r['rps'], '.0f')} | {f(r['mbs'], '.1f')} | {f(r['cpu_per_gb'], '.2f')} | "
                   f"{f(r['cpu_per_req_us'], '.0f')} | {f(r['p50'], '.2f')} | {f(r['p99'], '.2f')} | {r['errors']} |")
    by = {(label, path): r for label, path, r in rows}
    out.append("")
    for label, _ in SIZES:
        d, t, h = by[(label, "direct")], by[(label, "tcpha")], by[(label, "haproxy")]
        out.append(f"- {label}: tcpha {t['mbs'] / d['mbs'] * 100:.0f}% of direct throughput, "
                   f"{t['mbs'] / h['mbs']:.2f}x HAProxy; FE CPU per GB tcpha {t['cpu_per_gb']:.2f} s, "
                   f"HAProxy {h['cpu_per_gb']:.2f} s.")
    out += extra
    return "\n".join(out) + "\n"


def fe_only(args: argparse.Namespace, bench: Bench, dep: LabDeployment, fe_pid: int) -> str:
    """1 KiB handoffs at --connections and at 128 clients, --repeat times: req/s and FE CPU per handoff."""
    load = os.getloadavg()
    lines = [f"fe-only {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
             f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    for i in range(args.repeat):
        for c in (args.connections, 128):
            r = bench.wrk(f"http://{dep.vip}/1k.bin", connections=c, pids=[fe_pid])
            sys_us = r["cpu_sys"] / r["requests"] * 1e6 if r["requests"] else float("nan")
            lines.append(f"  run {i + 1} c{c}: {r['rps']:.0f} req/s, FE CPU {r['cpu_per_req_us']:.0f} us/handoff "
                         f"({sys_us:.0f} us system), {r['errors']} errors, load {os.getloadavg()[0]:.1f}")
    dep.stop_fe()
    if args.profile:
        for path in sorted(glob.glob(f"{args.profile}.*")):
            for key in ("tottime", "cumulative"):
                lines.append(f"-- {path} by {key}")
                buf = io.StringIO()
                pstats.Stats(path, stream=buf).strip_dirs().sort_stats(key).print_stats(30)
                lines.append(buf.getvalue())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "handoff.md"))
    p.add_argument("--fe-only", action="store_true", help="only the front end's 1 KiB handoff rows, printed")
    p.add_argument("--repeat", type=int, default=1, help="--fe-only: how many times to measure")
    p.add_argument("--profile", metavar="PREFIX", help="cProfile the front-end worker into PREFIX.<pid>")
    args = p.parse_args(argv)
    text = run(args)
    if args.fe_only:
        print(text)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from plots import plot_after_run, plot_handoff
    plot_after_run(plot_handoff, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
