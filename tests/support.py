"""Helpers shared by every test area: one way to wait for an event; labs with their prefixes.

Tests poll for state that another process changes (a control file, a log line, a counter). A poll that
runs before that state exists must be told apart from a failure: `wait_until` treats a condition that
returns something false *or raises* as "not yet", and only at the deadline fails, naming what it waited
for and the last exception seen, so a timeout reads as what it is.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

# Every lab prefix handed out in this pytest run; at the end of the session anything still named with
# one of them (namespaces and the processes inside) is removed and reported (tests/conftest.py,
# pytest_sessionfinish).
RUN_PREFIXES: set[str] = set()


def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str | None = None,
               interval: float = 0.02) -> T:
    """Poll `cond` until it returns something truthy and return that value.

    A condition that raises counts as "not yet" (a control socket not bound yet, a file not written
    yet). After `timeout` seconds an AssertionError names `what` (or the condition) and the last value
    or exception, so `assert wait_until(...)` and a bare `wait_until(...)` both fail with a reason.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = cond()
        except Exception as exc:  # noqa: BLE001 - "not yet"; reported at the deadline
            value, last_error = None, exc  # type: ignore[assignment]
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            label = what or getattr(cond, "__name__", "condition")
            detail = f"; last error: {last_error!r}" if last_error is not None else f"; last value: {value!r}"
            raise AssertionError(f"timed out after {timeout} s waiting for {label}{detail}")
        time.sleep(interval)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (client side, server side): relays set TCP options."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        outer = socket.create_connection(lsock.getsockname())
        inner, _ = lsock.accept()
    finally:
        lsock.close()
    return outer, inner


def running(pids) -> list[int]:
    """The pids of `pids` that still run: a zombie does not, and one that exits while it is being
    looked at (between listing and reading its /proc entry) does not either."""
    import psutil
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def child_pids(pid: int) -> list[int]:
    """The running children of `pid` (see `running`)."""
    import psutil
    try:
        return running(c.pid for c in psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return []


def require_tool(name: str) -> str:
    """The path of a program the tests need; a missing one is a set-up failure, never a silent skip.

    scripts/install-deps installs every program the suite uses, so on a machine set up as CI is, a
    missing tool means a broken install step, which a skip would hide.
    """
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install-deps (the tests need it)", pytrace=False)
    return path


def fixed_client_port(lab, host: str = "client") -> int:
    """A source port for a test that binds its client to a fixed port (a client reusing its port).

    Chosen below `host`'s ephemeral range (net.ipv4.ip_local_port_range), which the kernel never hands
    out to a connect(): a port inside it can be held at that moment by another connection of the same
    namespace (a module's shared lab), and the bind then fails with EADDRINUSE (seen in CI).
    """
    import random

    low = int(lab.sysctl(host, "net.ipv4.ip_local_port_range").split()[0])
    return random.randrange(10000, low)


def new_prefix() -> str:
    """A lab prefix for this run. Unlike the run_prefix fixture (one per test), several labs may be made
    at once: prefixes in use are skipped."""
    from tcpha.lab.netns import lab_namespaces

    while True:
        prefix = "t" + secrets.token_hex(2) + str(os.getpid() % 10)
        if prefix not in RUN_PREFIXES and not lab_namespaces(prefix):
            RUN_PREFIXES.add(prefix)
            return prefix


def up_lab(prefix: str, datapath: Any = None) -> Iterator[Any]:
    """For a fixture: yields an up NamespaceLab (DEFAULT_TOPOLOGY) whose tcpha daemons use `datapath`
    (tcpha.lab.deploy.DataPath; None: the environment's), and takes it down after, even on failure."""
    from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab

    the_lab = NamespaceLab(DEFAULT_TOPOLOGY, prefix)
    the_lab.datapath = datapath
    the_lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()
