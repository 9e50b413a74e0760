"""tcpha-keygen: a new key file, mode 0600, never overwritten silently, loadable as authkey."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from tcpha.cli.keygen import main
from tcpha.config import read_authkey


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_a_private_random_key(tmp_path, capsys):
    path = tmp_path / "authkey"
    old = os.umask(0)  # the key stays private whatever the umask
    try:
        assert main([str(path)]) == 0
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    content = path.read_text()
    assert len(content) == 65 and content.endswith("\n") and int(content, 16) > 0
    assert read_authkey(str(path)) == content.strip().encode()
    assert "wrote a new 256-bit key" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["authkey"]  # no temporary file left


def test_two_keys_differ(tmp_path):
    assert main([str(tmp_path / "a")]) == 0 and main([str(tmp_path / "b")]) == 0
    assert (tmp_path / "a").read_text() != (tmp_path / "b").read_text()


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "authkey"
    path.write_text("precious\n")
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tcpha-keygen: {path} already exists; use --force")
    assert path.read_text() == "precious\n"
    assert main(["--force", str(path)]) == 0
    assert path.read_text() != "precious\n" and _mode(path) == 0o600


def test_missing_directory_is_one_line(tmp_path, capsys):
    path = tmp_path / "no" / "such" / "authkey"
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"tcpha-keygen: cannot write {path}: No such file or directory\n"


def test_installed_command(tmp_path):
    exe = shutil.which("tcpha-keygen")
    argv = [exe] if exe else [sys.executable, "-m", "tcpha.cli.keygen"]
    path = tmp_path / "k"
    first = subprocess.run(argv + [str(path)], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(argv + [str(path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    usage = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "PATH" in usage.stderr
