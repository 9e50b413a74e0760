"""Health detection: a back end that fails is taken out within one interval + 1 s, the rules
fall through to the next back end, no request fails after detection, and it is put back when it recovers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tcpha.lab.http import start_http
from tcpha.lab.demo import APP_PORT
from tests.deployment import Load
from tests.support import wait_until

pytestmark = pytest.mark.netns


def backend_status(prod, name: str) -> str | None:
    for b in prod.ctl_json("status")["backends"]:
        if b["name"] == name:
            return b["status"]
    return None


def test_backend_killed_under_load_is_taken_out_and_put_back(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"rules": prod.rules("{be1} jpg$", "{be2} .*", "{be1} .*"), "dtcinterval": 1, "rise": 2,
                   "fall": 1, "healthtimeout": 1})
    load = Load(prod, "/index.html", threads=4).start()
    try:
        assert wait_until(lambda: load.backends.get("be2", 0) > 20, 10)
        killed = time.monotonic()
        prod.dep.be_procs["be2"].send_signal(signal.SIGKILL)
        assert wait_until(lambda: backend_status(prod, be2) == "down", 5, interval=0.02)
        detected = time.monotonic()
        detection = detected - killed
        assert detection <= 1 + 1 + 0.3, detection        # one interval + 1 s (+ polling slack)
        before_ok = load.ok
        assert wait_until(lambda: load.ok > before_ok + 50, 15)
        late = [f for f in load.failures if f[0] > detected]
        assert late == [], late[:5]
        window = [f for f in load.failures if killed <= f[0] <= detected]
        print(f"\nbe2 killed: detected after {detection:.2f} s; {len(window)} failed requests before detection, "
              f"0 after; {load.ok} good")
        # back: tcpha-be restarted; up again after `rise` good checks, traffic returns to be2
        prod.start_backend("be2")
        assert wait_until(lambda: backend_status(prod, be2) == "up", 6)
        n = load.backends.get("be2", 0)
        assert wait_until(lambda: load.backends.get("be2", 0) > n + 20, 10)
    finally:
        load.stop()
    assert [f for f in load.failures if f[0] > detected] == []


def test_application_down_is_detected_and_recovery_damped(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"rules": prod.rules("{be2} .*", "{be1} .*"), "dtcinterval": 1, "rise": 3, "fall": 2,
                   "healthtimeout": 0.5})
    assert prod.dep.request("/index.html").backend == "be2"
    prod.dep.origins.pop("be2").stop()                    # nginx on be2 gone; tcpha-be still answers pings
    t0 = time.monotonic()
    assert wait_until(lambda: backend_status(prod, be2) == "down", 5, interval=0.02)
    assert time.monotonic() - t0 <= 2 * 1 + 1 + 0.3        # fall = 2 checks
    st = [b for b in prod.ctl_json("status")["backends"] if b["name"] == be2][0]
    assert f":{APP_PORT}" in st["last_error"]
    # The prober tells the workers after its verdict (the status page has it first): the next
    # requests go to be1 within a moment, not necessarily the very next one.
    assert wait_until(lambda: prod.dep.request("/index.html").backend == "be1", 2, what="requests to go to be1")
    prod.dep.origins["be2"] = start_http(prod.lab, "be2", port=APP_PORT, files=prod.dep.files, name="again")
    t1 = time.monotonic()
    assert wait_until(lambda: backend_status(prod, be2) == "up", 6, interval=0.02)
    assert time.monotonic() - t1 >= 1.5                   # rise = 3: not back on the first good check
    assert wait_until(lambda: prod.dep.request("/index.html").backend == "be2", 2, what="requests to go to be2")


def test_dtcinterval_zero_turns_checks_off_and_a_new_interval_applies_within_a_second(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"dtcinterval": 30, "healthtimeout": 1})
    checks = lambda: [b for b in prod.ctl_json("status")["backends"] if b["name"] == be2][0]["checks"]  # noqa: E731
    n0 = checks()
    assert prod.fe_echo("sys/dtcinterval", "0.5").returncode == 0
    assert wait_until(lambda: checks() >= n0 + 2, 2.5)       # from 30 s to 0.5 s without waiting 30 s
    assert prod.fe_echo("sys/dtcinterval", "0").returncode == 0
    # "Off" is an absence: read the count once the documented bound for a new interval (1 s) has passed,
    # plus the health timeout for a check already in flight, then see it stay still for 4 old intervals.
    time.sleep(1.0 + 1)
    n1 = checks()
    time.sleep(2)
    assert checks() == n1                                    # off


def test_http_health_check_uses_healthpath(prod):
    be1, be2 = f"{prod.lab.ip('be1')}:666", f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"dtcinterval": 1, "healthcheck": "http", "healthpath": "/api/status.json", "rise": 1})
    assert wait_until(lambda: all(b["checks"] >= 1 and b["status"] == "up"
                                  for b in prod.ctl_json("status")["backends"]), 5)
    # reload with a path the origins do not have: 404 takes both out
    prod.dep.write_fe_config(rundir=prod.fe_rundir, dbglevel=3, dtcinterval=1, healthcheck="http",
                             healthpath="/no/such/page", rise=1)
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: backend_status(prod, be1) == "down" and backend_status(prod, be2) == "down", 6)
    st = {b["name"]: b for b in prod.ctl_json("status")["backends"]}
    assert "status 404" in st[be1]["last_error"]
    assert prod.dep.request("/index.html").status == 503
