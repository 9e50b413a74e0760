"""bench/slowclients: how long a normal request waits while many slow and idle clients are held open.

    sudo python3 bench/slowclients/run.py [--held 10000] [--samples 20] [--out bench/results/slowclients.md]

Runs in a namespace lab of its own (removed at the end): tcpha-fe with its defaults for workers, maxclients
and peektimeout (10 s) except `--peektimeout`, two tcpha-be with nginx. From the client host it opens
--held connections to the VIP (tcpha.lab.slowclients: half idle, half an unfinished request head,
slowloris), then times --samples normal requests (a new connection each, connect to last byte) while
they are held, and reports p50/p95/max; then waits for the held ones to be answered (408 at peektimeout)
and counts the answers. Not run in CI: the numbers depend on the machine; results go to --out.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab
from tcpha.lab.demo import VPORT, LabDeployment
from tcpha.lab.slowclients import SlowClients, raise_fd_limit, timed_request


def _fe_log_lines(lab: NamespaceLab) -> list[str]:
    try:
        return lab.log_path("fe", "tcpha-fe").read_text(errors="replace").splitlines()
    except OSError:
        return []


def run(held: int, samples: int, peektimeout: float, startservers: int | None) -> dict:
    raise_fd_limit(held + 4096)
    lab = NamespaceLab(DEFAULT_TOPOLOGY, "sl" + secrets.token_hex(2))
    lab.up()
    try:
        dep = LabDeployment(lab)
        options = {"peektimeout": peektimeout}
        if startservers is not None:
            options["startservers"] = startservers
        else:
            options["startservers"] = None          # the front end's default
        dep.start(fe=options)
        crowd = SlowClients(lab, "client", dep.vip, VPORT)
        t0 = time.monotonic()
        crowd.open(held)
        opened = time.monotonic() - t0
        times = []
        spacing = (peektimeout * 0.6) / samples    # spread over the hold, not only right after opening
        for _ in range(samples):
            seconds, status = timed_request(lab, "client", dep.vip, VPORT)
            if status != 200:
                raise RuntimeError(f"a normal request got {status}")
            times.append((time.monotonic() - t0, seconds))
            time.sleep(spacing)
        held_for = time.monotonic() - t0
        answers = crowd.collect(timeout=peektimeout + 30)
        crowd.close()
        deadline = time.monotonic() + 15      # the suppressed counts are logged when their interval ends
        while time.monotonic() < deadline and not any("similar suppressed" in line for line in _fe_log_lines(lab)):
            time.sleep(0.5)
        log = _fe_log_lines(lab)
        return {"held": held, "opened_s": opened, "times": times, "held_for": held_for, "answers": answers,
                "log_lines": len(log), "log_408": sum(" 408: " in line for line in log),
                "suppressed_lines": [line.split(": ", 1)[-1] for line in log if "similar suppressed" in line
                                     and " 408: " in line][:2]}
    finally:
        lab.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--peektimeout", type=float, default=10.0)
    ap.add_argument("--startservers", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/slowclients needs root (network namespaces)", file=sys.stderr)
        return 1
    r = run(args.held, args.samples, args.peektimeout, args.startservers)
    ms = sorted(t * 1000 for _, t in r["times"])
    series = " ".join(f"{at:.1f}s:{t * 1000:.0f}" for at, t in r["times"])
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    count = {k: {str(s): v.count(s) for s in sorted(set(v), key=str)} for k, v in r["answers"].items()}
    text = (f"held {r['held']} connections (half idle, half an unfinished head), opened in {r['opened_s']:.1f} s; "
            f"{len(ms)} normal requests while held: p50 {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, "
            f"max {ms[-1]:.1f} ms\n(time since the first connect: ms) {series}\nheld connections' answers: {count}\n"
            f"front-end log: {r['log_lines']} lines, {r['log_408']} of them a 408 line; "
            f"suppression lines: {r['suppressed_lines']}\n")
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
