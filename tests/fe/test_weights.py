"""Weights split traffic (as an HAProxy/LVS operator expects): a rule naming several back ends
(``rule = ADDR,ADDR REGEX``) sends each connection to one of them by smooth weighted round robin; weights
change live through the control files and SIGHUP; weight 0 still means no new handoffs."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support import wait_until

pytestmark = pytest.mark.netns

N = 200
# Tolerance. Each worker runs its own smooth WRR (tcpha.fe.balance): after any number of picks it is within
# one pick of its exact share per back end, so the whole front end is within W picks with W workers that
# took part. The config below allows at most 2 workers at once (startservers 2, maxspareservers 2); with a
# replacement or two the bound stays under 4 (8 is 2x margin). A first-match table would give 200/0, and a
# uniform random pick at 3:1 has a standard deviation of 6.1 requests, so it would also fail often.
TOLERANCE = 8


def _split(prod, n: int = N) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _ in range(n):
        r = prod.dep.request("/index.html", timeout=5)
        assert r.status == 200
        counts[r.backend] = counts.get(r.backend, 0) + 1
    return counts


def _settle(prod) -> None:
    """A weight written through the control files reaches the workers asynchronously (a gate push over their
    runtime links, milliseconds): a `status` read goes through the same control plane loop after it."""
    prod.ctl_json("status")


def test_pool_rule_splits_by_weight_live_and_on_reload(prod):
    be1, be2 = (f"{prod.lab.ip(h)}:666" for h in ("be1", "be2"))
    servers = [f"{prod.lab.ip('be1')} 666 weight=3", f"{prod.lab.ip('be2')} 666 weight=1"]
    fe = {"servers": servers, "rules": prod.rules("{be1},{be2} .*"), "startservers": 2,
          "minspareservers": 1, "maxspareservers": 2}
    prod.start(fe=fe)
    assert prod.fe_cat(f"backends/{be1}/weight") == "3\n"

    counts = _split(prod)
    print(f"\nweights 3:1 -> {counts}")
    assert abs(counts.get("be1", 0) - N * 3 / 4) <= TOLERANCE, counts
    assert counts.get("be1", 0) + counts.get("be2", 0) == N

    # live: be2 to weight 3, be1 to 1 -> the split follows
    assert prod.fe_echo(f"backends/{be1}/weight", "1").returncode == 0
    assert prod.fe_echo(f"backends/{be2}/weight", "3").returncode == 0
    _settle(prod)
    counts = _split(prod)
    print(f"weights 1:3 (control files) -> {counts}")
    assert abs(counts.get("be2", 0) - N * 3 / 4) <= TOLERANCE, counts

    # weight 0: no new handoffs to be2, the pool's other member takes everything
    assert prod.fe_echo(f"backends/{be2}/weight", "0").returncode == 0
    _settle(prod)
    counts = _split(prod, 40)
    assert counts == {"be1": 40}, counts

    # SIGHUP: the weights written in the file (1:1 now) are in force
    prod.dep.write_fe_config(rundir=prod.fe_rundir, dbglevel=3, startservers=2, minspareservers=1,
                             maxspareservers=2, rules=fe["rules"],
                             servers=[f"{prod.lab.ip('be1')} 666 weight=1", f"{prod.lab.ip('be2')} 666 weight=1"])
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "reloaded" in prod.fe_log(), 10), prod.fe_log()[-2000:]
    assert prod.fe_cat(f"backends/{be2}/weight") == "1\n"
    counts = _split(prod)
    print(f"weights 1:1 (reload) -> {counts}")
    assert abs(counts.get("be1", 0) - N / 2) <= TOLERANCE, counts


def test_pool_member_that_refuses_falls_through_to_the_others(prod):
    """be1 stopped (no health checks: dtcinterval 0, so it stays 'up' in the table): every pick of be1 fails
    over to be2 inside the same pool; nothing is lost."""
    prod.start(fe={"rules": prod.rules("{be1},{be2} .*"), "dtcinterval": 0})
    prod.lab.stop(prod.dep.be_procs["be1"], grace=5)
    counts = _split(prod, 20)
    assert counts == {"be2": 20}, counts
