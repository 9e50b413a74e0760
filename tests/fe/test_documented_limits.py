"""Behaviour docs/operations.md promises that no other test reached: a Restored that arrives after
`handofftimeout`, and health damping (`sys/rise`, `sys/fall`) changed while the front end runs."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tcpha.lab.http import start_http
from tcpha.lab.demo import APP_PORT
from tests.support import wait_until

pytestmark = pytest.mark.netns


def _backend(prod, name: str) -> dict:
    return [b for b in prod.ctl_json("status")["backends"] if b["name"] == name][0]


def test_restored_after_handofftimeout_is_refused_and_the_next_back_end_answers(prod):
    """docs/operations.md, "Limits worth knowing": a back end whose Restored comes after `handofftimeout`
    has restored a connection the front end already took back; both sides log it, the client gets its
    answer, byte-exact, from the next back end, and the late copy never sends the client a byte (it is
    closed when no Steered comes)."""
    be2 = f"{prod.lab.ip('be2')}:666"
    # Checks far apart: the stopped back end must not be taken out by health checks during the test.
    prod.start(fe={"rules": prod.rules("{be2} .*", "{be1} .*"), "handofftimeout": 1, "dtcinterval": 60})
    assert prod.dep.request("/index.html").backend == "be2"
    be2_proc = prod.dep.be_procs["be2"]
    answer: dict = {}

    def fetch():
        try:
            answer["r"] = prod.dep.request("/1k.bin", headers={"Connection": "close"}, timeout=20)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            answer["error"] = e

    os.kill(be2_proc.pid, signal.SIGSTOP)                 # be2 reads nothing: its Restored will be late
    stopped = True
    try:
        client = threading.Thread(target=fetch)
        client.start()
        wait_until(lambda: "timed out" in prod.fe_log(), 15, "the front end's handoff timeout")
        client.join(20)
        os.kill(be2_proc.pid, signal.SIGCONT)             # be2 now restores and answers Restored, late
        stopped = False
    finally:
        if stopped:
            os.kill(be2_proc.pid, signal.SIGCONT)
    assert "r" in answer, answer.get("error")
    r = answer["r"]
    assert r.status == 200 and r.backend == "be1"
    assert r.body == prod.dep.origins["be1"].expected("1k.bin")
    be2_log = prod.lab.log_path("be2", "tcpha-be")
    wait_until(lambda: "'restored' for unknown or timed-out handoff" in prod.fe_log(), 15,
               "the front end logging the late Restored")
    wait_until(lambda: "no Steered within" in be2_log.read_text(errors="replace"), 15,
               "be2 closing the copy it restored too late")
    # be2 is still in service and takes the next connection normally.
    assert _backend(prod, be2)["status"] == "up"
    assert prod.dep.request("/index.html").backend == "be2"


def test_rise_and_fall_written_live_govern_the_next_checks(prod):
    """docs/operations.md, control files: `sys/fall` and `sys/rise` change the damping of a running front
    end: with fall raised from 1 to 3 a back end goes out only on the third failed check in a row, and
    with rise raised from 1 to 2 it comes back only on the second good one."""
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"rules": prod.rules("{be2} .*", "{be1} .*"), "dtcinterval": 0.5, "rise": 1, "fall": 1,
                   "healthtimeout": 0.4, "dbglevel": 4})           # 4: each failed check is logged
    assert prod.ctl("set", "sys/fall", "3").returncode == 0
    assert prod.ctl("set", "sys/rise", "2").returncode == 0
    assert prod.ctl_json("sys/fall") in (3, "3") and prod.ctl_json("sys/rise") in (2, "2")
    before = len(prod.fe_log())
    prod.dep.origins.pop("be2").stop()                    # nginx on be2 gone: its checks fail
    wait_until(lambda: _backend(prod, be2)["status"] == "down", 15, "be2 taken out")
    log = prod.fe_log()[before:]
    failed = [line for line in log.splitlines() if f"back end {be2}: check failed (" in line]
    assert [line.split("check failed (")[1].split(")")[0] for line in failed] == ["1/3", "2/3"], failed
    assert f"back end {be2} is DOWN" in log
    before = len(prod.fe_log())
    prod.dep.origins["be2"] = start_http(prod.lab, "be2", port=APP_PORT, files=prod.dep.files, name="again")
    wait_until(lambda: _backend(prod, be2)["status"] == "up", 15, "be2 put back")
    assert f"back end {be2} is UP: 2 good check(s) in a row" in prod.fe_log()[before:]
