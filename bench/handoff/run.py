"""bench/handoff: wrk through tcpha, through HAProxy with the same rules, and directly to a back end.

    sudo python3 bench/handoff/run.py [--duration 5] [--connections 32] [--out bench/results/handoff.md]
    sudo python3 bench/handoff/run.py --fe-only [--repeat 3] [--profile /tmp/fe.prof]
    sudo python3 bench/handoff/run.py --sweep [--duration 4]      # bench/results/handoff-sweep.{md,png}
    ... [--be appsource=local] [--fe steering=nft] [--py-spy-be /tmp/be]

--sweep measures req/s and the front end's and back end's CPU per request against the response size
(1 KiB to 4 MiB) for direct, HAProxy and each tcpha data path (relay splice|bpf x steering nft|bpf), and
checks the targets of the BPF data path (bench/results/handoff-sweep.md, and the PNG drawn from it by
bench/plots.py). Each data path is measured in a round of its own, with direct and HAProxy measured next
to it size by size, so that every ratio compares points taken seconds apart (on a shared machine the
load moves over minutes). ~8 minutes at --duration 4. Its raw results also go to /tmp/handoff-sweep-*.json;
--report FILE writes the results file and the PNG again from such a file, without measuring.

--fe-only measures only the front end's handoff path (bench/results/fe-profile.md): 1 KiB through tcpha
at --connections and at 128 clients, --repeat times, printing req/s and FE CPU per handoff (no direct,
HAProxy or latency rows). --profile PREFIX runs the front end's worker under cProfile (TCPHA_PROFILE:
tcpha.fe.worker) and prints its top functions after the run; the profiler's own cost inflates the CPU
figures of such a run, so measure with and without it apart. --py-spy-be PREFIX samples be2's tcpha-be
(the back end of the 1 KiB handoffs) with py-spy during the 128-client runs and prints its top functions.
--fe/--be OPTION=VALUE set an option of tcpha-fe / tcpha-be (an A/B: `--be appsource=local`).

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
import json
import os
import pstats
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab
from tcpha.lab.demo import APP_PORT, LabDeployment

SIZES = [("1 KiB", "1k.bin"), ("100 KiB", "100k.bin"), ("1 MiB", "1m.bin")]
# --sweep: (label, file, bytes)
SWEEP_SIZES = [("1 KiB", "1k.bin", 1 << 10), ("4 KiB", "4k.bin", 4 << 10), ("16 KiB", "16k.bin", 16 << 10),
               ("64 KiB", "64k.bin", 64 << 10), ("100 KiB", "100k.bin", 100 << 10),
               ("256 KiB", "256k.bin", 256 << 10), ("1 MiB", "1m.bin", 1 << 20), ("4 MiB", "4m.bin", 4 << 20)]
# --sweep: tcpha's data paths, (relay, steering)
DATA_PATHS = [("splice", "nft"), ("splice", "bpf"), ("bpf", "nft"), ("bpf", "bpf")]
HAPROXY_PORT = 8000      # --sweep: HAProxy runs next to tcpha-fe on the fe host, on fe's own address

HAPROXY_CFG = """global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind {fe}:{listen}
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

    def wrk(self, url: str, connections: int | None = None, pids: list[int] = (),
            be_pids: list[int] = ()) -> dict:
        """wrk against url; CPU of pids (the front end: tcpha-fe or haproxy) and of be_pids (tcpha-be)."""
        c = connections or self.connections
        argv = ["wrk", "-t1", f"-c{c}", f"-d{self.duration}s", "--latency", "-H", "Connection: close", url]
        sys_before, sys_after = [0.0], [0.0]
        before = cpu_seconds(list(pids), sys_before)
        be_before = cpu_seconds(list(be_pids))
        out = self.lab.run("client", argv, capture_output=True, text=True, timeout=self.duration + 60).stdout
        used = cpu_seconds(list(pids), sys_after) - before
        be_used = cpu_seconds(list(be_pids)) - be_before
        r = parse_wrk(out)
        r["cpu"] = used
        r["be_cpu"] = be_used
        r["cpu_sys"] = sys_after[0] - sys_before[0]
        gb = r["mbs"] * self.duration / 1000 if r["mbs"] == r["mbs"] else 0
        r["cpu_per_gb"] = used / gb if gb and pids else float("nan")
        r["cpu_per_req_us"] = used / r["requests"] * 1e6 if r["requests"] and pids else float("nan")
        r["be_cpu_per_req_us"] = be_used / r["requests"] * 1e6 if r["requests"] and be_pids else float("nan")
        return r


def run(args: argparse.Namespace) -> str:
    prefix = "b" + secrets.token_hex(2) + str(os.getpid() % 10)
    lab = NamespaceLab(DEFAULT_TOPOLOGY, prefix)
    rows: list[tuple[str, str, dict]] = []
    extra: list[str] = []
    try:
        lab.up()
        dep = LabDeployment(lab)
        if args.sweep:
            dep.files.update({name: size for _, name, size in SWEEP_SIZES})
        dep.start_origins(kind="nginx")
        if args.sweep:
            return sweep(args, lab, dep)
        for host in dep.backends:
            dep.start_backend(host, **{"dbglevel": 2, **args.be})
        if args.profile:                       # the front end only: the back ends are already running
            os.environ["TCPHA_PROFILE"] = args.profile
        try:
            dep.start_fe(**{"dbglevel": 2, "startservers": 1, "maxclients": 1024, **args.fe})
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
        cfg.write_text(HAPROXY_CFG.format(fe=lab.ip("fe"), listen=80, be1=lab.ip("be1"), be2=be2, port=APP_PORT))
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

def _log_size(lab: NamespaceLab, host: str, name: str) -> int:
    try:
        return lab.log_path(host, name).stat().st_size
    except OSError:
        return 0


def _log_lines(lab: NamespaceLab, host: str, name: str, *needles: str, start: int = 0) -> list[str]:
    """The lines of a lab daemon's log from byte `start` on that contain one of needles (what the daemon
    chose at start: the logs are appended to by each start)."""
    try:
        text = lab.log_path(host, name).read_bytes()[start:].decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if any(n in line for n in needles)]


def _restart_tcpha(args: argparse.Namespace, lab: NamespaceLab, dep: LabDeployment, relay: str,
                   steering: str) -> list[str]:
    """tcpha-be on every back end with `relay`, tcpha-fe with `steering`; the start-up lines saying which
    relay, steering and application source are in force."""
    dep.stop_fe()
    for proc in dep.be_procs.values():
        lab.stop(proc, grace=5)
    dep.be_procs.clear()
    be = dep.backends[-1]
    be_start, fe_start = _log_size(lab, be, "tcpha-be"), _log_size(lab, "fe", "tcpha-fe")
    for host in dep.backends:
        # dbglevel 3 (notices): the start-up lines saying what is in use; nothing per connection
        dep.start_backend(host, **{"dbglevel": 3, **args.be, "relay": relay})
    dep.start_fe(**{"dbglevel": 3, "startservers": 1, "maxclients": 1024, **args.fe, "steering": steering})
    chosen = _log_lines(lab, be, "tcpha-be", "relay:", "application connections", start=be_start)
    chosen += _log_lines(lab, "fe", "tcpha-fe", "flow steering:", start=fe_start)
    return [re.sub(r"^.*?(relay:|application connections|flow steering:)", r"\1", line) for line in chosen]


def sweep(args: argparse.Namespace, lab: NamespaceLab, dep: LabDeployment) -> str:
    """Every size of SWEEP_SIZES through direct, HAProxy and one tcpha data path, for each data path."""
    bench = Bench(lab, dep, args.duration, args.connections)
    be2, fe_ip = lab.ip("be2"), lab.ip("fe")
    cfg = dep.dir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(fe=fe_ip, listen=HAPROXY_PORT, be1=lab.ip("be1"), be2=be2, port=APP_PORT))
    hap = lab.spawn("fe", ["haproxy", "-db", "-f", str(cfg)], name="haproxy",
                    ready_tcp=(fe_ip, HAPROXY_PORT), timeout=10)
    started = time.time()
    loads = [os.getloadavg()]
    rows: list[tuple[int, str, str, dict]] = []       # (round, size, path, wrk result)
    rounds: list[dict] = []
    for n, (relay, steering) in enumerate(DATA_PATHS, 1):
        name = f"tcpha {relay}+{steering}"
        chosen = _restart_tcpha(args, lab, dep, relay, steering)
        fe_pids, be_pids = [dep.fe_proc.pid], [p.pid for p in dep.be_procs.values()]
        t0 = time.time()
        for label, fname, _ in SWEEP_SIZES:
            rows.append((n, label, "direct", bench.wrk(f"http://{be2}:{APP_PORT}/{fname}")))
            rows.append((n, label, "haproxy", bench.wrk(f"http://{fe_ip}:{HAPROXY_PORT}/{fname}", pids=[hap.pid])))
            rows.append((n, label, name, bench.wrk(f"http://{dep.vip}/{fname}", pids=fe_pids, be_pids=be_pids)))
            print(f"round {n} {label}: " + ", ".join(f"{path} {r['rps']:.0f} req/s ({r['errors']} errors)"
                                                   for _, _, path, r in rows[-3:]), file=sys.stderr)
        lat_direct = bench.wrk(f"http://{be2}:{APP_PORT}/1k.bin", connections=1)
        lat = bench.wrk(f"http://{dep.vip}/1k.bin", connections=1, pids=fe_pids, be_pids=be_pids)
        # the same for HAProxy: what an L7 proxy adds on the same machine at the same moment (a control
        # for how much of tcpha's added latency is waiting for a CPU on a busy machine)
        lat_haproxy = bench.wrk(f"http://{fe_ip}:{HAPROXY_PORT}/1k.bin", connections=1, pids=[hap.pid])
        peak = bench.wrk(f"http://{dep.vip}/1k.bin", connections=128, pids=fe_pids, be_pids=be_pids)
        loads.append(os.getloadavg())
        rounds.append({"n": n, "name": name, "relay": relay, "steering": steering, "chosen": chosen,
                       "lat_direct": lat_direct, "lat": lat, "lat_haproxy": lat_haproxy, "peak": peak, "start": t0, "end": time.time(),
                       "load": loads[-1]})
    lab.stop(hap)
    dep.stop_fe()
    raw = Path(f"/tmp/handoff-sweep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json")
    raw.write_text(json.dumps({"rows": [(n, label, path, {k: v for k, v in r.items() if k != "raw"})
                                        for n, label, path, r in rows],
                               "rounds": rounds, "loads": loads, "started": started,
                               "args": {"duration": args.duration, "connections": args.connections,
                                        "fe": args.fe, "be": args.be}}, default=str))
    print(f"raw results: {raw}", file=sys.stderr)
    return sweep_report(args, rows, rounds, loads, started)


def _f(v: float, fmt: str) -> str:
    return "-" if v != v else format(v, fmt)


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def sweep_report(args: argparse.Namespace, rows: list[tuple[int, str, str, dict]], rounds: list[dict],
                 loads: list[tuple[float, float, float]], started: float) -> str:
    by = {(n, label, path.split()[0]): r for n, label, path, r in rows}
    ended = rounds[-1].get("end") if rounds else None          # --report: the sweep's own end, not now
    minutes = ((ended or time.time()) - started) / 60
    out = ["# bench/handoff --sweep: req/s and CPU per request against response size", "",
           f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} by `python3 bench/handoff/run.py "
           f"--sweep --duration {args.duration} --connections {args.connections}"
           + "".join(f" --fe {k}={v}" for k, v in args.fe.items())
           + "".join(f" --be {k}={v}" for k, v in args.be.items())
           + f"` on {os.cpu_count()} cores (`{os.uname().release}`), {minutes:.1f} minutes; load average "
           f"(1 min) {' -> '.join(f'{l[0]:.1f}' for l in loads)} at the start and after each round.",
           "",
           f"The lab's client, front end, back ends, nginx and wrk share the machine's {os.cpu_count()} cores (a "
           "load average above about 3 means something else ran too). Absolute figures move with the load; "
           "compare the ratios, each taken from points measured seconds apart in the same round.",
           "",
           f"`wrk -t1 -c{args.connections} -d{args.duration}s -H 'Connection: close'` from the client host: a new "
           "connection per request. Each round restarts tcpha with one data path (relay x steering) and "
           "measures, size by size, direct (the client to nginx on be2), HAProxy 2.6 (one thread, same rules, "
           "on the fe host) and tcpha (one front-end worker). FE CPU: tcpha-fe (arbiter and worker) or "
           "haproxy; BE CPU: the tcpha-be processes (user+system from /proc). The BPF relay's per-packet "
           "work runs in softirq context and is charged to whatever process the CPU was running, so its BE "
           "CPU counts only set-up and tear-down: its per-byte cost shows in req/s, not in the BE column.",
           "", "What each round's daemons said they use:", ""]
    for rd in rounds:
        out.append(f"- round {rd['n']} ({rd['name']}): " + "; ".join(rd["chosen"] or ["(no start-up line found)"]))
    out += ["", "## Ratios and CPU per request, by data path", "",
            "tcpha's req/s against direct's and HAProxy's measured next to it (same round, same size); CPU in "
            "µs per request.", "",
            "| size | " + " | ".join(f"{rd['name']} / direct | / HAProxy" for rd in rounds) + " |",
            "| --- | " + " | ".join("---: | ---:" for _ in rounds) + " |"]
    for label, _, _ in SWEEP_SIZES:
        cells = []
        for rd in rounds:
            t, d, h = by[(rd["n"], label, "tcpha")], by[(rd["n"], label, "direct")], by[(rd["n"], label, "haproxy")]
            cells += [f"{_f(_div(t['rps'], d['rps']) * 100, '.0f')}%", f"{_f(_div(t['rps'], h['rps']), '.2f')}x"]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "## Targets (the kernel carries the bytes)", ""]
    out += sweep_targets(by, rounds)
    out += ["", "## Every point", "",
            "| round | size | path | req/s | MB/s | FE CPU us/req | BE CPU us/req | p50 ms | p99 ms | errors |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, label, path, r in rows:
        out.append(f"| {n} | {label} | {path} | {_f(r['rps'], '.0f')} | {_f(r['mbs'], '.1f')} | "
                   f"{_f(r['cpu_per_req_us'], '.0f')} | {_f(r['be_cpu_per_req_us'], '.0f')} | "
                   f"{_f(r['p50'], '.2f')} | {_f(r['p99'], '.2f')} | {r['errors']} |")
    out += ["", "One connection at a time (1 KiB) and one worker at 128 clients (1 KiB), per round:", "",
            "| round | path | direct p50 / p99 ms | tcpha p50 / p99 ms | added p50 ms | HAProxy p50 / p99 ms | "
            "HAProxy added p50 ms | 128 clients: handoffs/s | FE us | BE us | errors |",
            "| ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    nan = {"p50": float("nan"), "p99": float("nan")}
    for rd in rounds:
        d, t, pk, h = rd["lat_direct"], rd["lat"], rd["peak"], rd.get("lat_haproxy", nan)
        out.append(f"| {rd['n']} | {rd['name']} | {d['p50']:.2f} / {d['p99']:.2f} | {t['p50']:.2f} / {t['p99']:.2f} "
                   f"| {t['p50'] - d['p50']:.2f} | {_f(h['p50'], '.2f')} / {_f(h['p99'], '.2f')} | "
                   f"{_f(h['p50'] - d['p50'], '.2f')} | {pk['rps']:.0f} | {_f(pk['cpu_per_req_us'], '.0f')} | "
                   f"{_f(pk['be_cpu_per_req_us'], '.0f')} | {pk['errors']} |")
    return "\n".join(out) + "\n"


def sweep_targets(by: dict, rounds: list[dict]) -> list[str]:
    """The targets (listed below, one row each), met or missed, for each data path of the sweep."""
    def check(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out = ["| target | " + " | ".join(rd["name"] for rd in rounds) + " |",
           "| --- | " + " | ".join("---" for _ in rounds) + " |"]

    def row(title: str, cell) -> None:
        out.append(f"| {title} | " + " | ".join(cell(rd) for rd in rounds) + " |")

    def ratio(rd: dict, label: str, against: str) -> float:
        return _div(by[(rd["n"], label, "tcpha")]["rps"], by[(rd["n"], label, against)]["rps"])

    row("1 MiB >= 85% of direct", lambda rd: f"{ratio(rd, '1 MiB', 'direct') * 100:.0f}% "
        f"{check(ratio(rd, '1 MiB', 'direct') >= 0.85)}")
    for label, want in (("1 MiB", 4.0), ("100 KiB", 1.5), ("1 KiB", 0.7)):
        row(f"{label} >= {want:g}x HAProxy", lambda rd, label=label, want=want:
            f"{ratio(rd, label, 'haproxy'):.2f}x {check(ratio(rd, label, 'haproxy') >= want)}")
    for key, title, limit in (("cpu_per_req_us", "FE CPU per handoff <= 120 µs (1 KiB, 32 clients)", 120),
                              ("be_cpu_per_req_us", "BE CPU per handoff <= 150 µs (1 KiB, 32 clients)", 150)):
        row(title, lambda rd, key=key, limit=limit:
            f"{by[(rd['n'], '1 KiB', 'tcpha')][key]:.0f} µs {check(by[(rd['n'], '1 KiB', 'tcpha')][key] <= limit)}")
    row("added latency p50 <= 0.5 ms (one connection at a time)", lambda rd:
        f"{rd['lat']['p50'] - rd['lat_direct']['p50']:.2f} ms "
        f"{check(rd['lat']['p50'] - rd['lat_direct']['p50'] <= 0.5)}")
    return out


def fe_only(args: argparse.Namespace, bench: Bench, dep: LabDeployment, fe_pid: int) -> str:
    """1 KiB handoffs at --connections and at 128 clients, --repeat times: req/s and FE CPU per handoff."""
    load = os.getloadavg()
    lines = [f"fe-only {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
             f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    if args.fe or args.be:
        lines.append(f"  options: fe {args.fe or '-'}, be {args.be or '-'}")
    be_pids = [p.pid for p in dep.be_procs.values()]
    spied: list[str] = []
    for i in range(args.repeat):
        for c in (args.connections, 128):
            spy = None
            if args.py_spy_be and c == 128:
                # the back end that takes the 1 KiB handoffs (rule `.* -> be2`), sampled during the run
                out = f"{args.py_spy_be}.{i + 1}.txt"
                spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--function", "--format", "raw", "-r", "200",
                                        "-d", str(args.duration), "-o", out, "--pid", str(dep.be_procs["be2"].pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                spied.append(out)
            r = bench.wrk(f"http://{dep.vip}/1k.bin", connections=c, pids=[fe_pid], be_pids=be_pids)
            if spy is not None:
                spy.wait(timeout=60)
            sys_us = r["cpu_sys"] / r["requests"] * 1e6 if r["requests"] else float("nan")
            lines.append(f"  run {i + 1} c{c}: {r['rps']:.0f} req/s, FE CPU {r['cpu_per_req_us']:.0f} us/handoff "
                         f"({sys_us:.0f} us system), BE CPU {r['be_cpu_per_req_us']:.0f} us/handoff, "
                         f"{r['errors']} errors, load {os.getloadavg()[0]:.1f}")
    dep.stop_fe()
    for path in spied:
        lines += [f"-- {path}: py-spy samples of tcpha-be on be2 at 128 clients, by function (self, total)"]
        lines += spy_summary(Path(path))
    if args.profile:
        for path in sorted(glob.glob(f"{args.profile}.*")):
            for key in ("tottime", "cumulative"):
                lines.append(f"-- {path} by {key}")
                buf = io.StringIO()
                pstats.Stats(path, stream=buf).strip_dirs().sort_stats(key).print_stats(30)
                lines.append(buf.getvalue())
    return "\n".join(lines) + "\n"


def spy_summary(path: Path, top: int = 30) -> list[str]:
    """py-spy's raw (collapsed stacks) output as the functions with most samples, self and total."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    try:
        text = path.read_text()
    except OSError as e:
        return [f"  (no samples: {e})"]
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [re.sub(r" \(([^)]*/)?([^/)]+)\)", r" (\2)", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    out = [f"  {samples} samples"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  self {n / samples * 100:5.1f}%  total {total[name] / samples * 100:5.1f}%  {name}")
    out.append("  by total:")
    for name, n in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  total {n / samples * 100:5.1f}%  {name}")
    return out


def options(items: list[str]) -> dict[str, str]:
    """--fe/--be KEY=VALUE arguments as config options."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: expected OPTION=VALUE")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "handoff.md"))
    p.add_argument("--fe-only", action="store_true", help="only the front end's 1 KiB handoff rows, printed")
    p.add_argument("--repeat", type=int, default=1, help="--fe-only: how many times to measure")
    p.add_argument("--profile", metavar="PREFIX", help="cProfile the front-end worker into PREFIX.<pid>")
    p.add_argument("--sweep", action="store_true",
                   help="req/s and FE/BE CPU per request against response size, every data path "
                        "(default --out bench/results/handoff-sweep.md, and its PNG)")
    p.add_argument("--py-spy-be", metavar="PREFIX", help="--fe-only: sample be2's tcpha-be with py-spy during "
                   "the 128-client runs into PREFIX.N.txt and print its top functions")
    p.add_argument("--report", metavar="JSON", help="--sweep: write the results file and plot again from the "
                   "raw results a sweep left in /tmp (no measuring)")
    p.add_argument("--fe", action="append", default=[], metavar="OPTION=VALUE", help="a tcpha-fe option")
    p.add_argument("--be", action="append", default=[], metavar="OPTION=VALUE", help="a tcpha-be option")
    args = p.parse_args(argv)
    try:
        args.fe, args.be = options(args.fe), options(args.be)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.report:
        args.sweep = True
    if args.sweep and args.out == p.get_default("out"):
        args.out = str(Path(args.out).with_name("handoff-sweep.md"))
    if args.report:                     # a sweep's raw results written again (no measuring)
        raw = json.loads(Path(args.report).read_text())
        args.duration, args.connections = raw["args"]["duration"], raw["args"]["connections"]
        args.fe, args.be = raw["args"]["fe"], raw["args"]["be"]
        text = sweep_report(args, [tuple(r) for r in raw["rows"]], raw["rounds"], raw["loads"], raw["started"])
    else:
        text = run(args)
    if args.fe_only:
        print(text)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from plots import plot_after_run, plot_handoff, plot_sweep
    plot_after_run(plot_sweep if args.sweep else plot_handoff, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
