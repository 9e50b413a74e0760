"""bench/rehandoff: keep-alive connections whose requests alternate back ends, tcpha (rehandoff = on)
against HAProxy (one thread, the same rules), 1 KiB / 100 KiB / 1 MiB.

    sudo python3 bench/rehandoff.py [--duration 8] [--connections 16] [--out bench/results/rehandoff.md]
    sudo python3 bench/rehandoff.py --check [--duration 3]     # every response checked, nothing written

`wrk -tN -cN` with keep-alive (its default) and a Lua script that cycles through `/SIZE.jpg` (rule
`jpg$ -> be1`) and `/SIZE.bin` (rule `.* -> be2`). One connection per wrk thread, so that each thread's
cycle is its connection's: every request names the other back end than the one before it, and with tcpha
every request but a connection's first is a move. For each size, measured seconds apart: HAProxy 2.6
(bench/handoff/run.py's configuration: one thread, `path_end jpg`, on the fe host next to tcpha-fe),
tcpha with the alternating paths, and tcpha with `/SIZE.bin` only (the same connections, no move: what
the moves cost on top of relaying through a rehandoff back end).

Moves per second come from tcpha's `conn` table (each row counts its connection's moves), read every
0.25 s during the run: the sum of each connection's highest count, over wrk's duration (a move between
the last reading and the connection's close is missed; the connections live through the run). CPU: user+system of tcpha-fe
(arbiter and worker) or haproxy, and of the two tcpha-be, from /proc. Every run is checked against the
back ends' nginx access logs: each `.jpg` on be1, everything else on be2, status 200, as many entries as
wrk counted responses (give or take those in flight at the end). --check also checks each response in
wrk (one connection per wrk thread): its body (length, first and last 32 bytes) names a file, the
X-Tcpha-Backend header nginx adds names the back end: the rule's for that file, status 200, and the
other file than the connection's previous response (the requests alternate: responses in order).

Runs in a namespace lab of its own (removed at the end); ~2 minutes at --duration 8. Not run in CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [("1 KiB", "1k", 1 << 10), ("100 KiB", "100k", 100 << 10), ("1 MiB", "1m", 1 << 20)]
TOOLS = ["wrk", "haproxy", "nginx", "ip", "nft"]


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"bench/rehandoff: {msg}", file=sys.stderr)
    sys.exit(2)


def preflight() -> None:
    """One clear line and exit status 2 when something the bench needs is missing."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        fail(f"missing tool(s): {', '.join(missing)} (scripts/install-deps installs them)")
    if os.geteuid() != 0:
        fail("must run as root (it builds a namespace lab)")
    for mod in ("psutil",):
        if importlib.util.find_spec(mod) is None:
            fail(f"missing Python module {mod} (pip install -e .[bench])")


def handoff_bench():
    """bench/handoff/run.py as a module (its HAProxy configuration, wrk parser and CPU accounting)."""
    spec = importlib.util.spec_from_file_location("bench_handoff_run", ROOT / "bench" / "handoff" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lua_string(b: bytes) -> str:
    return '"' + "".join(f"\\{c}" for c in b) + '"'


def wrk_script(paths: list[str], expect: dict[str, tuple[str, int, bytes, bytes]] | None) -> str:
    """A wrk script cycling through `paths` on each thread; with `expect` (path -> back end, length,
    first and last 32 bytes) it checks every response and prints `CHECK good bad` at the end."""
    lua = ["local paths = {" + ", ".join(f'"{p}"' for p in paths) + "}",
           "local reqs = {}",
           "local i = 0",
           "init = function(args)",
           "  for k, p in ipairs(paths) do reqs[k] = wrk.format('GET', p) end",
           "end",
           "request = function()",
           "  i = i % #paths + 1"]
    if expect is None:
        lua += ["  return reqs[i]", "end"]
        return "\n".join(lua) + "\n"
    # The response names the file by its body and the back end by nginx's header: it must be the back end
    # the file's rule names, and (the requests alternating) another file than the connection's previous
    # response. (Not a queue of sent requests: wrk calls thread 0's request() once more to check it.)
    lua += ["  return reqs[i]", "end",
            "good = 0", "bad = 0", "why = ''", "local last = 0",
            "local expect = {"]
    for p in paths:
        be, size, head, tail = expect[p]
        lua.append(f"  {{be = '{be}', size = {size}, head = {lua_string(head)}, tail = {lua_string(tail)}}},")
    lua += ["}",
            "response = function(status, headers, body)",
            "  local be = nil",
            "  for name, v in pairs(headers) do if string.lower(name) == 'x-tcpha-backend' then be = v end end",
            "  local k = nil",
            "  for j, e in ipairs(expect) do",
            "    if #body == e.size and body:sub(1, 32) == e.head and body:sub(-32) == e.tail then k = j end",
            "  end",
            "  if status == 200 and k and be == expect[k].be and (#paths == 1 or k ~= last) then",
            "    good = good + 1",
            "  else",
            "    bad = bad + 1",
            "    if why == '' then why = string.format('%s after %s: status %s, back end %s, %d bytes', "
            "k and paths[k] or 'no file', last > 0 and paths[last] or '-', status, tostring(be), #body) end",
            "  end",
            "  last = k or 0",
            "end",
            "local threads = {}",
            "setup = function(thread) table.insert(threads, thread) end",
            "done = function(summary, latency, requests)",
            "  local g, b, w = 0, 0, ''",
            "  for _, t in ipairs(threads) do",
            "    g = g + t:get('good'); b = b + t:get('bad')",
            "    if w == '' then w = t:get('why') end",
            "  end",
            "  io.write(string.format('CHECK %d %d %s\\n', g, b, w))",
            "end"]
    return "\n".join(lua) + "\n"


class ConnPoller:
    """Reads tcpha's `conn` every `interval` s during a run: the moves seen so far at each reading."""

    def __init__(self, rundir: str, interval: float = 0.25):
        from tcpha.cli.ctl import socket_for
        self.sock = socket_for(rundir)
        self.interval = interval
        self.readings: list[tuple[float, int, int]] = []     # (time, moves so far, rows)
        self._seen: dict[str, int] = {}                       # client address -> most moves seen
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ConnPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from tcpha.runtime.ctlsock import request
        while not self._stop.wait(self.interval):
            t0 = time.monotonic()
            try:
                reply = request(self.sock, {"op": "read", "path": "conn"})
            except OSError as e:
                self.errors.append(str(e))
                continue
            if not reply.get("ok"):
                self.errors.append(str(reply.get("error")))
                continue
            rows = reply["data"]
            # a connection being moved has no row for a moment, and a closed one none at all: count each
            # connection's highest figure seen so far
            for r in rows:
                key = r["client"]
                self._seen[key] = max(self._seen.get(key, 0), int(r.get("moves") or 0))
            # the table was read somewhere between the question and the answer (the answer waits for a
            # busy worker): the middle of the two
            self.readings.append(((t0 + time.monotonic()) / 2, sum(self._seen.values()), len(rows)))

    def total(self) -> int:
        """The moves seen: each connection's highest count (its row leaves the table when it closes, so
        the moves after the last reading before that are missed: read often)."""
        return self.readings[-1][1] if self.readings else 0


def access_check(dep, start: dict[str, int], wrk_requests: int, connections: int) -> tuple[int, int, list[str]]:
    """The entries nginx logged on each back end since `start` (entries per host): how many, how many on a
    back end their rule does not name, and what is wrong (more of those than connections, a status other
    than 200, a count that does not match wrk's).

    A request held for a move when its client closes is passed to the application of the back end that
    holds the connection (docs/kernel.md: a client that closes mid-move): when wrk stops, up to one per
    connection lands on the other back end, with nobody to read its response. More than that is an error."""
    problems: list[str] = []
    total = misrouted = 0
    for host in ("be1", "be2"):
        entries = dep.origins[host].access_entries()[start[host]:]
        total += len(entries)
        wrong = [e["uri"] for e in entries if (e["uri"].endswith(".jpg")) != (host == "be1")]
        misrouted += len(wrong)
    if misrouted > connections:
        problems.append(f"{misrouted} request(s) on a back end their rule does not name (more than the "
                        f"{connections} connections wrk closed)")
    for host in ("be1", "be2"):
        entries = dep.origins[host].access_entries()[start[host]:]
        bad = [e for e in entries if e["status"] != 200]
        if bad:
            problems.append(f"{len(bad)} status(es) other than 200 on {host} (first {bad[0]['status']})")
    # wrk counts the responses it completed; nginx also logs those in flight when wrk stops
    if not wrk_requests <= total <= wrk_requests + 2 * connections:
        problems.append(f"nginx logged {total} requests, wrk counted {wrk_requests}")
    return total, misrouted, problems


def run(args: argparse.Namespace) -> str:
    hb = handoff_bench()
    from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab
    from tcpha.lab.demo import APP_PORT, LabDeployment
    from tcpha.lab.http import file_content

    files = {}
    for _, stem, size in SIZES:
        files[f"{stem}.bin"] = size
        files[f"{stem}.jpg"] = size
    prefix = "m" + secrets.token_hex(2) + str(os.getpid() % 10)
    lab = NamespaceLab(DEFAULT_TOPOLOGY, prefix)
    started = time.time()
    loads = [os.getloadavg()]
    rows: list[tuple[str, str, dict]] = []
    problems: list[str] = []
    try:
        lab.up()
        dep = LabDeployment(lab, files=files, origin_access_log=True)
        dep.start_origins(kind="nginx")
        for host in dep.backends:
            dep.start_backend(host, dbglevel=2)
        dep.start_fe(dbglevel=2, startservers=1, maxclients=1024, rehandoff="on")
        fe_ip = lab.ip("fe")
        cfg = dep.dir / "haproxy.cfg"
        cfg.write_text(hb.HAPROXY_CFG.format(fe=fe_ip, listen=hb.HAPROXY_PORT, be1=lab.ip("be1"),
                                             be2=lab.ip("be2"), port=APP_PORT))
        hap = lab.spawn("fe", ["haproxy", "-db", "-f", str(cfg)], name="haproxy",
                        ready_tcp=(fe_ip, hb.HAPROXY_PORT), timeout=10)
        fe_pids, be_pids = [dep.fe_proc.pid], [p.pid for p in dep.be_procs.values()]
        rundir = str(lab.workdir / "tcpha" / "run-fe")
        c, d = args.connections, args.duration

        def wrk(url: str, paths: list[str], pids: list[int], bes: list[int], moves: bool) -> dict:
            expect = None
            if args.check:
                expect = {p: ("be1" if p.endswith(".jpg") else "be2", files[p[1:]],
                              file_content(p[1:], files[p[1:]])[:32], file_content(p[1:], files[p[1:]])[-32:])
                          for p in paths}
            script = dep.dir / "paths.lua"
            script.write_text(wrk_script(paths, expect))
            start = {h: len(dep.origins[h].access_entries()) for h in ("be1", "be2")}
            argv = ["wrk", f"-t{c}", f"-c{c}", f"-d{d}s", "--latency", "-s", str(script), url]
            cpu0, be0 = hb.cpu_seconds(pids), hb.cpu_seconds(bes)
            t0 = time.monotonic()
            poller = ConnPoller(rundir) if moves else None
            if poller:
                poller.__enter__()
            try:
                proc = lab.run("client", argv, capture_output=True, text=True, timeout=d + 60)
            finally:
                if poller:
                    poller.__exit__(None, None, None)
            wall = time.monotonic() - t0
            r = hb.parse_wrk(proc.stdout)
            r["cpu"] = hb.cpu_seconds(pids) - cpu0
            r["be_cpu"] = hb.cpu_seconds(bes) - be0
            r["wall"] = wall
            r["moves_seen"] = poller.total() if poller else 0
            r["moves_s"] = r["moves_seen"] / d if poller and poller.readings else float("nan")
            r["poll_errors"] = poller.errors[:3] if poller else []
            m = re.search(r"^CHECK (\d+) (\d+) ?(.*)$", proc.stdout, re.M)
            r["check"] = (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None
            if proc.returncode != 0 or r["requests"] <= 0:
                problems.append(f"{url} {paths}: wrk exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
            r["logged"], r["misrouted"], bad = access_check(dep, start, max(r["requests"], 0), c)
            if moves and paths[1:] and r["moves_s"] != r["moves_s"]:
                bad.append(f"no move rate: {len(poller.readings)} conn readings, errors {poller.errors[:2]}")
            problems.extend(f"{url} {paths}: {b}" for b in bad)
            if args.check and (r["check"] is None or r["check"][1] or r["check"][0] < r["requests"]):
                problems.append(f"{url} {paths}: wrk's check: {r['check']}")
            return r

        for label, stem, _ in SIZES:
            alt = [f"/{stem}.jpg", f"/{stem}.bin"]
            h = wrk(f"http://{fe_ip}:{hb.HAPROXY_PORT}/", alt, [hap.pid], [], False)
            t = wrk(f"http://{dep.vip}/", alt, fe_pids, be_pids, True)
            s = wrk(f"http://{dep.vip}/", [f"/{stem}.bin"], fe_pids, be_pids, True)
            rows += [(label, "haproxy", h), (label, "tcpha", t), (label, "tcpha, no move", s)]
            loads.append(os.getloadavg())
            print(f"{label}: HAProxy {h['rps']:.0f} req/s, tcpha {t['rps']:.0f} req/s "
                  f"({t['moves_s']:.0f} moves/s), tcpha without moves {s['rps']:.0f} req/s; "
                  f"load {loads[-1][0]:.1f}", file=sys.stderr)
        lab.stop(hap)
        dep.stop_fe()
    finally:
        lab.down()
    return report(args, rows, loads, started, problems)


def _f(v: float, fmt: str) -> str:
    return "-" if v != v else format(v, fmt)


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(args: argparse.Namespace, rows: list[tuple[str, str, dict]], loads: list, started: float,
           problems: list[str]) -> str:
    by = {(label, path): r for label, path, r in rows}
    c, d = args.connections, args.duration
    out = ["# bench/rehandoff: keep-alive requests alternating back ends, tcpha vs HAProxy", "",
           f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} by `python3 bench/rehandoff.py "
           f"--duration {d} --connections {c}{' --check' if args.check else ''}` on {os.cpu_count()} cores "
           f"(`{os.uname().release}`), {(time.time() - started) / 60:.1f} minutes; load average (1 min) "
           f"{' -> '.join(f'{l[0]:.1f}' for l in loads)} at the start and after each size.", "",
           "**The machine was shared** with other test runs while this ran (the load average above): the "
           "lab's client, front end, back ends, nginx and wrk share its cores with them. Compare the ratios, "
           "each between points measured seconds apart.", "",
           f"`wrk -t{c} -c{c} -d{d}s -s paths.lua`: keep-alive, one connection per thread, each connection "
           "alternating `/SIZE.jpg` (rule `jpg$ -> be1`) and `/SIZE.bin` (rule `.* -> be2`), so that every "
           "request after a connection's first names the other back end. HAProxy 2.6: one thread, the same "
           "rules (`path_end jpg`); tcpha: `rehandoff = on`, one front-end worker; \"tcpha, no move\": the "
           "same connections asking for `/SIZE.bin` only. Moves/s: from tcpha's `conn` (the rows' move "
           "counts, read every 0.25 s: each connection's last count, summed, over wrk's duration). CPU: user+system from /proc of tcpha-fe or haproxy (FE) and of the "
           "two tcpha-be (BE); nginx's is in neither.", "",
           "| size | path | req/s | MB/s | moves/s | FE CPU us/req | FE CPU us/move | BE CPU us/req | "
           "BE CPU us/move | p50 ms | p99 ms | errors | nginx logged (other BE) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, path, r in rows:
        n = r["requests"]
        moves = r["moves_s"] * d if path == "tcpha" else float("nan")
        out.append(f"| {label} | {path} | {_f(r['rps'], '.0f')} | {_f(r['mbs'], '.1f')} | "
                   f"{_f(r['moves_s'], '.0f') if path == 'tcpha' else '-'} | {_f(_div(r['cpu'], n) * 1e6, '.0f')} | "
                   f"{_f(_div(r['cpu'], moves) * 1e6, '.0f')} | "
                   f"{_f(_div(r['be_cpu'], n) * 1e6, '.0f') if path != 'haproxy' else '-'} | "
                   f"{_f(_div(r['be_cpu'], moves) * 1e6, '.0f')} | {_f(r['p50'], '.2f')} | {_f(r['p99'], '.2f')} | "
                   f"{r['errors']} | {r['logged']} ({r['misrouted']}) |")
    out += ["", "## Against the targets, and what a move costs", ""]
    for label, _, _ in SIZES:
        h, t, s = by[(label, "haproxy")], by[(label, "tcpha")], by[(label, "tcpha, no move")]
        ratio = _div(t["rps"], h["rps"])
        target = {"100 KiB": 1.5, "1 MiB": 4.0}.get(label)
        verdict = "" if target is None else (f" (target >= {target:g}x: " + ("met" if ratio >= target else "**missed**") + ")")
        per_move = _div(t["cpu"] / d - s["cpu"] / d * _div(t["rps"], s["rps"]), t["moves_s"]) * 1e6
        be_per_move = _div(t["be_cpu"] / d - s["be_cpu"] / d * _div(t["rps"], s["rps"]), t["moves_s"]) * 1e6
        out.append(f"- {label}: tcpha {_f(ratio, '.2f')}x HAProxy{verdict}; {t['moves_seen']} moves seen in `conn` for "
                   f"{t['logged']} requests nginx served on {args.connections} connections (at most "
                   f"{t['logged'] - args.connections} changes of back end); without moves tcpha serves {_f(s['rps'], '.0f')} "
                   f"req/s ({_f(_div(s['rps'], h['rps']), '.2f')}x HAProxy). CPU per move over the no-move run's "
                   f"per-request cost: FE {_f(per_move, '.0f')} us, BE {_f(be_per_move, '.0f')} us.")
    out += ["", "## Routing check", ""]
    stray = [(label, path, r["misrouted"]) for label, path, r in rows if r["misrouted"]]
    if stray:
        out.append("Requests nginx logged on the back end their rule does not name (the table's last column): "
                   + ", ".join(f"{label} {path}: {n}" for label, path, n in stray) + f" (at most one per "
                   f"connection, {args.connections}, is expected: a request held for a move when wrk closes its "
                   "connection is passed to the application of the back end holding it, whose answer nobody "
                   "reads; wrk never received a response from the wrong back end" + (" (--check)" if args.check
                   else "") + ").")
        out.append("")
    if problems:
        out += [f"- **{p}**" for p in problems]
    else:
        out.append("Every run: nginx's access logs show each `.jpg` on be1 and everything else on be2, all "
                   "status 200, as many entries as wrk counted responses (plus those in flight at the end)"
                   + ("; and wrk checked every response (back end header, status, length, first and last "
                      "32 bytes): " + ", ".join(f"{label} {path} {r['check'][0]}" for label, path, r in rows
                                                if r["check"]) + " responses right, none wrong."
                      if args.check else "."))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="seconds per wrk run (9 runs)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (one per wrk thread)")
    p.add_argument("--check", action="store_true", help="check every response in wrk too; prints, writes nothing "
                   "unless --out is given")
    p.add_argument("--out", default=None, help="results file (default bench/results/rehandoff.md; none with --check)")
    args = p.parse_args(argv)
    if args.duration < 2 or args.connections < 1:
        p.error("--duration must be >= 2 and --connections >= 1")
    preflight()
    sys.path.insert(0, str(ROOT))
    from tcpha.lab.netns import LabError
    try:
        text = run(args)
    except LabError as e:
        fail(str(e).splitlines()[0] if str(e) else repr(e))
    print(text)
    out = args.out or (None if args.check else str(ROOT / "bench" / "results" / "rehandoff.md"))
    if out:
        Path(out).write_text(text)
    return 1 if "## Routing check\n\n- **" in text else 0


if __name__ == "__main__":
    sys.exit(main())
