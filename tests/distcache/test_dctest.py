"""dc_test: runs against dc_server, through dc_client and through dc_snoop; exact output lines,
option errors, failure detection and exit codes, -progress, the -timing and -clients extensions.
Every Info line is on stderr, as in the original; only -timing/-clients write (their timing lines)
to stdout."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import PY, fake_servers, free_port, procs, sockdir, wait_until  # noqa: E402,F401

from tcpha.distcache.codec import Op  # noqa: E402

ELAPSED = re.compile(r"^Info, elapsed time = \d+\.\d{3} seconds$")
RATE = re.compile(r"^Info, operations per second = \d+$")


def _dc_test(procs, *args):
    return procs.run("tcpha.cli.dc_test", *args, timeout=300)


def _check_success(r, sessions, ops):
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"Info, {sessions} sessions generated, will run {ops} random tests"
    assert lines[-1] == "Info, all tests complete"
    assert r.stdout == ""
    return lines


@pytest.mark.parametrize("persistent", [True, False])
def test_against_dc_server(procs, sockdir, persistent):
    addr = f"UNIX:{sockdir}/srv"
    procs.server(addr)
    args = ["-connect", addr, "-sessions", "30", "-ops", "3000"] + (["-persistent"] if persistent else [])
    lines = _check_success(_dc_test(procs, *args), 30, 3000)
    assert len(lines) == 2


def test_timing_extension(procs, sockdir):
    addr = f"UNIX:{sockdir}/srv"
    procs.server(addr)
    r = _dc_test(procs, "-connect", addr, "-sessions", "10", "-ops", "300", "-persistent", "-timing")
    assert r.returncode == 0
    assert r.stderr == "Info, 10 sessions generated, will run 300 random tests\nInfo, all tests complete\n"
    timing = r.stdout.splitlines()
    assert len(timing) == 2 and ELAPSED.match(timing[0]) and RATE.match(timing[1]), timing


def test_default_ops_and_tcp(procs):
    addr = f"IP:127.0.0.1:{free_port()}"
    procs.server(addr)
    # -ops defaults to 10 * sessions^2.
    _check_success(_dc_test(procs, "-connect", addr, "-sessions", "12", "-persistent"), 12, 1440)


def test_through_dc_client(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    procs.agent(f"UNIX:{sockdir}/agent", f"UNIX:{sockdir}/srv")
    _check_success(_dc_test(procs, "-connect", f"UNIX:{sockdir}/agent", "-sessions", "30", "-ops", "3000"),
                   30, 3000)
    _check_success(_dc_test(procs, "-connect", f"UNIX:{sockdir}/agent", "-sessions", "30", "-ops", "3000",
                            "-persistent"), 30, 3000)


def test_through_dc_snoop(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    snoop = procs.start("tcpha.cli.dc_snoop", "-listen", f"UNIX:{sockdir}/snoop", "-connect",
                        f"UNIX:{sockdir}/srv", ready=f"UNIX:{sockdir}/snoop")
    _check_success(_dc_test(procs, "-connect", f"UNIX:{sockdir}/snoop", "-sessions", "20", "-ops", "500",
                            "-persistent"), 20, 500)
    frames = [x for x in snoop.stderr().splitlines() if "client->server" in x]
    assert len(frames) >= 500


def test_progress_lines(procs, sockdir):
    addr = f"UNIX:{sockdir}/srv"
    procs.server(addr)
    r = _dc_test(procs, "-connect", addr, "-sessions", "10", "-ops", "250", "-progress", "100", "-persistent")
    lines = _check_success(r, 10, 250)
    assert lines[1:3] == ["Info, total operations =     100", "Info, total operations =     200"]


def test_clients_extension(procs, sockdir):
    addr = f"UNIX:{sockdir}/srv"
    procs.server(addr, "-sessions", "1000")
    r = _dc_test(procs, "-connect", addr, "-sessions", "40", "-ops", "2000", "-persistent", "-clients", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.splitlines() == ["Info, 40 sessions generated, will run 2000 random tests",
                                     "Info, all tests complete"]
    lines = r.stdout.splitlines()
    assert ELAPSED.match(lines[0])
    assert re.match(r"^Info, operations per second = \d+ \(sum of 3 clients\)$", lines[1])


def _lying_server(conn_index, msg):
    # Says every session is present: the first HAVE/GET/REMOVE of an absent session, or the
    # second ADD of a session, exposes it.
    return {Op.ADD: b"\x00", Op.GET: b"wrong data", Op.REMOVE: b"\x00", Op.HAVE: b"\x00"}[msg.op]


def test_failure_is_detected(procs, fake_servers, sockdir):
    srv = fake_servers(sockdir / "liar", policy=_lying_server)
    r = _dc_test(procs, "-connect", srv.address, "-sessions", "5", "-ops", "1000", "-persistent")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert re.match(r"^Info, \d+ tests succeeded before the first failure$", lines[-1]), lines
    assert r.stdout == ""
    assert lines[-2] in (
        "Error, add succeeded and shouldn't have!", "Error, remove succeeded and shouldn't have!",
        "Error, get succeeded and shouldn't have!", "Error, have succeeded and shouldn't have!",
        "Error, received mismatched session")


def test_no_server(procs, sockdir):
    r = _dc_test(procs, "-connect", f"UNIX:{sockdir}/none", "-persistent")
    assert (r.returncode, r.stderr, r.stdout) == (1, "Error, 'DC_CTX' creation failed\n", "")
    r = _dc_test(procs, "-connect", f"UNIX:{sockdir}/none", "-sessions", "3", "-ops", "100")
    assert r.returncode == 1
    # A failed remove/get of an absent session looks like the right answer (as in the original);
    # the first add or have exposes the dead server.
    lines = r.stderr.splitlines()
    assert re.match(r"^Info, \d+ tests succeeded before the first failure$", lines[2])
    assert lines[1] in ("Error, add failed!", "Error, transaction failure")


@pytest.mark.parametrize("args, message", [
    ([], "Error, must provide -connect"),
    (["-connect", "UNIX:/x", "-sessions", "0"], "Error, --sessions given an invalid argument"),
    (["-connect", "UNIX:/x", "-sessions", "513"], "Error, --sessions given an invalid argument"),
    (["-connect", "UNIX:/x", "-sessions", "-1"], "Error, --sessions given an invalid argument"),
    (["-connect", "UNIX:/x", "-timeout", "3601"], "Error, --timeout given an invalid argument"),
    (["-connect", "UNIX:/x", "-timeout", "5"], "Error, -timevar must be strictly smaller than -timeout"),
    (["-connect", "UNIX:/x", "-timeout", "5", "-timevar", "5"],
     "Error, -timevar must be strictly smaller than -timeout"),
    (["-connect", "UNIX:/x", "-datamin", "3"], "Error, -datamin should be at least 4"),
    (["-connect", "UNIX:/x", "-datamax", "4097"], "Error, -datamax should be at most 4096"),
    (["-connect", "UNIX:/x", "-ops", "1000001"], "Error, --ops given an invalid argument"),
    (["-connect", "UNIX:/x", "-progress", "1000001"], "Error, --progress given an invalid argument"),
    (["-connect"], "Error, --connect requires an argument"),
    (["-withcert", "3"], "Error, no OpenSSL support compiled in, -with-cert not available."),
    (["-frob"], 'Error, "-frob" not recognised'),
    (["-connect", "NOPE:x"], "Error, 'DC_CTX' creation failed"),
    (["-connect", "IP:nonexistent.invalid:1"], "Error, 'DC_CTX' creation failed"),
])
def test_option_errors(procs, args, message):
    r = _dc_test(procs, *args)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == message
    assert "Traceback" not in r.stderr


def test_help_exits_0(procs):
    r = _dc_test(procs, "-help")
    assert r.returncode == 0
    assert r.stderr.splitlines()[1] == "Usage: dc_test [options]     where 'options' are from;"
