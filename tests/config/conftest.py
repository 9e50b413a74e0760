"""Helpers for the config tests: a key file and a writer of config files."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "authkey"
    path.write_text(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def write_conf(tmp_path: Path) -> Callable[..., str]:
    """write_conf(text, name='x.conf') -> path (str) of a file holding ``text``."""
    def write(text: str, name: str = "test.conf") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


@pytest.fixture
def fe_minimal(keyfile: Path) -> str:
    return f"vaddr = 10.77.0.100\nauthkey = {keyfile}\n"


@pytest.fixture
def be_minimal(keyfile: Path) -> str:
    return (f"raddr = 10.77.0.11\nuaddr = 10.77.0.11\nvaddr = 10.77.0.100\n"
            f"authkey = {keyfile}\n")
