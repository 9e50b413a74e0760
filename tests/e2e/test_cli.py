"""tcpha-fe / tcpha-be command lines: config errors, missing key, --check-config, --help, sd_notify."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tcpha.service import PidFile, sd_notify


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "authkey"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"0123456789abcdef" * 4 + b"\n")
    os.close(fd)
    return path


def fe_conf(tmp_path, text: str):
    path = tmp_path / "tcphafe.conf"
    path.write_text(text)
    return str(path)


GOOD_FE = """vaddr = 10.77.0.100
raddr = 10.77.0.10
authkey = {key}
server = 10.77.0.11 666
rule = 10.77.0.11 jpg$
"""


@pytest.mark.parametrize("module", ["tcpha.fe", "tcpha.be"])
def test_help_lists_the_config_options(module):
    r = run(module, "--help")
    assert r.returncode == 0
    for word in ("--config", "--check-config", "--daemon", "--pidfile", "vaddr", "authkey", "dbglevel"):
        assert word in r.stdout
    if module == "tcpha.fe":
        assert "peekmax" in r.stdout and "connperbe" in r.stdout


def test_check_config_accepts_a_good_file(tmp_path, key):
    r = run("tcpha.fe", "--check-config", "-c", fe_conf(tmp_path, GOOD_FE.format(key=key)))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


@pytest.mark.parametrize("text, where, words", [
    ("vaddr = 10.77.0.100\nbogus = 1\nauthkey = {key}\n", ":2:", "bogus"),
    ("vaddr = 10.77.0.300\nauthkey = {key}\n", ":1:", "10.77.0.300"),
    (GOOD_FE + "rule = 10.77.0.12 .*\n", ":6:", "10.77.0.12"),
    (GOOD_FE + "rule = 10.77.0.11 ([\n", ":6:", "regular expression"),
    ("raddr = 10.77.0.10\nauthkey = {key}\n", ":0:", "vaddr"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, key, text, where, words):
    path = fe_conf(tmp_path, text.format(key=key))
    for extra in ([], ["--check-config"]):
        r = run("tcpha.fe", "-c", path, *extra)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(path + where) and words in lines[0]
        assert "Traceback" not in r.stderr


def test_missing_authkey_is_a_clear_line(tmp_path):
    path = fe_conf(tmp_path, "vaddr = 10.77.0.100\nraddr = 10.77.0.10\n")
    r = run("tcpha.fe", "-c", path)
    assert r.returncode == 2
    assert "authkey" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    path = tmp_path / "tcphabe.conf"
    path.write_text(f"raddr = 10.77.0.11\nuaddr = 10.77.0.11\nvaddr = 10.77.0.100\nauthkey = {tmp_path}/nokey\n")
    r = run("tcpha.be", "-c", str(path))
    assert r.returncode == 2
    assert "nokey" in r.stderr and "tcpha-keygen" in r.stderr


def test_sd_notify_sends_the_state_to_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_pidfile_refuses_a_running_owner(tmp_path):
    path = str(tmp_path / "fe.pid")
    a = PidFile(path)
    a.acquire()
    assert open(path).read().strip() == str(os.getpid())
    with open(path, "w") as f:
        f.write("1\n")                     # init: alive
    with pytest.raises(RuntimeError, match="is running"):
        PidFile(path).acquire()
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    a.release()
    assert not os.path.exists(path)
