"""tcpha-lab up / status / exec / down, as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.netns


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture
def cli(tmp_path):
    """Runs tcpha-lab with a private state directory; removes whatever labs it left at the end."""
    env = dict(os.environ, TCPHA_LAB_STATE_DIR=str(tmp_path / "state"))

    def run(*args, **kw):
        return subprocess.run([sys.executable, "-m", "tcpha.cli.lab", *args], env=env,
                              capture_output=True, text=True, timeout=60, **kw)

    run.state = tmp_path / "state"
    try:
        yield run
    finally:
        run("down", "--all")


def test_up_status_exec_down_round_trip(cli, run_prefix):
    r = cli("up", "--name", run_prefix)
    assert r.returncode == 0, r.stderr
    assert "10.77.0.11/24@eth0" in r.stdout and "be2" in r.stdout
    state = json.loads((cli.state / f"{run_prefix}.json").read_text())
    assert state["prefix"] == run_prefix and len(state["topology"]["hosts"]) == 5
    assert f"{run_prefix}-client" in netns_list()

    r = cli("exec", "client", "ping", "-c", "1", "-W", "2", "10.77.0.12")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("exec", "be1", "sh", "-c", "echo out; exit 7")
    assert (r.returncode, r.stdout) == (7, "out\n")
    r = cli("exec", "be1", "ip", "-o", "-4", "addr", "show", "eth0")
    assert "10.77.0.11/24" in r.stdout

    # a process running in a host shows up in status under that host
    p = subprocess.Popen(["ip", "netns", "exec", f"{run_prefix}-be2", "sleep", "1234"])
    try:
        r = cli("status")
        assert r.returncode == 0, r.stderr
        assert f"lab {run_prefix}: up" in r.stdout
        lines = r.stdout.splitlines()
        be2 = next(i for i, l in enumerate(lines) if l.split()[:1] == ["be2"])
        assert f"pid {p.pid}: sleep 1234" in lines[be2 + 1]
        assert "10.77.0.20/24@eth0" in r.stdout
    finally:
        r = cli("down")
    assert r.returncode == 0, r.stderr
    assert p.wait(5) is not None  # down killed what ran inside the lab
    assert not {n for n in netns_list() if n.startswith(run_prefix + "-")}
    assert not (cli.state / f"{run_prefix}.json").exists()
    r = cli("down", run_prefix)
    assert r.returncode == 2 and "no lab named" in r.stderr


def test_errors_are_one_line(cli, run_prefix):
    r = cli("exec", "client", "true")
    assert r.returncode == 2 and r.stderr.strip() == "tcpha-lab: no lab is up (start one with: tcpha-lab up)"
    assert cli("up", "--name", "BAD_NAME").returncode == 1
    assert cli("up", "--name", run_prefix, "--backends", "0").returncode == 1
    assert cli("up", "--topology", "/nonexistent.toml").stderr.count("\n") == 1
    assert cli("up", "--name", run_prefix).returncode == 0
    r = cli("up", "--name", run_prefix)
    assert r.returncode == 1 and "already up" in r.stderr
    r = cli("exec", "nohost", "true")
    assert r.returncode == 2 and "no host 'nohost'" in r.stderr and "Traceback" not in r.stderr
    r = cli("exec", "client")
    assert r.returncode == 2


def test_several_labs_and_down_all(cli, run_prefix):
    a, b = run_prefix, run_prefix[:-1] + ("x" if run_prefix[-1] != "x" else "y")
    assert cli("up", "--name", a).returncode == 0
    assert cli("up", "--name", b, "--backends", "3").returncode == 0
    r = cli("exec", "client", "true")
    assert r.returncode == 2 and "--name" in r.stderr
    assert cli("exec", "--name", b, "be3", "true").returncode == 0
    assert cli("exec", "--name", a, "be3", "true").returncode == 2
    r = cli("down", "--all")
    assert r.returncode == 0, r.stderr
    assert not {n for n in netns_list() if n.startswith((a + "-", b + "-"))}
    assert cli("status").stdout.strip() == "no lab is up"


def test_down_without_state_file_cleans_by_name(cli, run_prefix):
    assert cli("up", "--name", run_prefix).returncode == 0
    (cli.state / f"{run_prefix}.json").unlink()   # e.g. /run was wiped
    r = cli("down", run_prefix)
    assert r.returncode == 0 and "no state file" in r.stdout
    assert not {n for n in netns_list() if n.startswith(run_prefix + "-")}


def test_up_from_topology_file(cli, run_prefix, tmp_path):
    topo = tmp_path / "three.toml"
    topo.write_text("backends = 3\n")
    r = cli("up", "--name", run_prefix, "--topology", str(topo))
    assert r.returncode == 0, r.stderr
    assert "10.77.0.13/24@eth0" in r.stdout
    assert cli("exec", "be3", "ping", "-c", "1", "-W", "2", "10.77.0.2").returncode == 0
    r = cli("up", "--name", run_prefix + "x", "--topology", str(topo), "--backends", "2")
    assert r.returncode == 2 and "exclude" in r.stderr
