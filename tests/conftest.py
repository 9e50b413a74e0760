"""Fixtures shared by every test area. Each area keeps its own in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import secrets
import signal
import threading

import pytest

from tests.support import RUN_PREFIXES, new_prefix, up_lab


@pytest.fixture
def run_prefix() -> str:
    """A short prefix unique to this test, for namespaces, links and nft tables.

    Kept to 6 characters so that '<prefix>-<name>' fits in IFNAMSIZ (15).
    """
    prefix = "t" + secrets.token_hex(2) + str(os.getpid() % 10)
    RUN_PREFIXES.add(prefix)
    return prefix


def pytest_addoption(parser):
    # Read by tests/e2e/conftest.py, which runs every end-to-end test over each data path given here.
    parser.addoption(
        "--datapaths", default="splice+bpf,bpf+nft", metavar="RELAY+STEERING,...",
        help="data paths the e2e tests run over, each RELAY+STEERING with RELAY auto|bpf|splice and "
             "STEERING auto|bpf|nft (default: splice+bpf,bpf+nft: each relay and each steering once)")


def pytest_configure(config):
    from tcpha.lab.deploy import DataPath

    try:
        DataPath.parse_list(config.getoption("datapaths"))
    except ValueError as e:
        raise pytest.UsageError(f"--datapaths: {e}") from None
    # A run stopped with SIGTERM (`timeout`, a CI runner's cancel) would die without its fixtures'
    # teardown and the session's clean-up below, leaving namespaces and daemons behind: make it an
    # interruption (as Ctrl-C), which pytest ends with both.
    if threading.current_thread() is threading.main_thread():
        global _SESSION_PID
        _SESSION_PID = os.getpid()
        signal.signal(signal.SIGTERM, _terminated)


_SESSION_PID = 0


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a second SIGTERM ends the run at once
    if os.getpid() != _SESSION_PID:
        # a child forked by a library (pyroute2's netns helpers) and stopped by its parent: die as it
        # expects, never run on as a copy of the test session
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_runtest_setup(item):
    # Namespace tests need root; CI runs as root, so running them as a user is a set-up error,
    # reported as a failure with one clear line rather than skipped or turned into an expected failure.
    if os.geteuid() != 0 and item.get_closest_marker("netns"):
        pytest.fail("needs root and network namespaces: run the suite as root (CI does)", pytrace=False)
    if os.geteuid() != 0 and item.get_closest_marker("root"):
        pytest.fail("needs root: run the suite as root (CI does)", pytrace=False)


# --- the namespace lab (owner: lab) -----------------------------------------------------------------

@pytest.fixture
def lab(run_prefix):
    """An up NamespaceLab (DEFAULT_TOPOLOGY: client, fe, be1, be2, cache) with this test's prefix.

    Torn down after the test even when it fails: processes started through it, namespaces, links.
    """
    yield from up_lab(run_prefix)


@pytest.fixture
def prod(lab):
    """tcpha deployed in this test's lab, with its control directories (tests/deployment.py: Prod).
    lab.down() stops every process; FUSE mounts die with their mount namespaces."""
    from tests.deployment import Prod

    return Prod(lab)


@pytest.fixture(scope="module")
def lab_module():
    """Like `lab`, shared by the tests of one module (they must not leave state the next test trips on)."""
    yield from up_lab(new_prefix())


@pytest.fixture
def lab_factory():
    """make(topology=None, backends=None) -> an up NamespaceLab with its own prefix; all torn down after."""
    from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab, make_topology

    made = []

    def make(topology=None, backends=None):
        if topology is None:
            topology = make_topology(backends) if backends else DEFAULT_TOPOLOGY
        the_lab = NamespaceLab(topology, new_prefix())
        made.append(the_lab)
        the_lab.up()
        return the_lab

    try:
        yield make
    finally:
        for the_lab in reversed(made):
            the_lab.down()


def pytest_sessionfinish(session, exitstatus):
    # Safety net: whatever a crashed fixture or a test without teardown left under this run's prefixes.
    if not RUN_PREFIXES or os.geteuid() != 0:
        return
    try:
        from tcpha.lab.netns import remove_prefix
    except ImportError:
        return
    leaked = []
    for prefix in sorted(RUN_PREFIXES):
        leaked += remove_prefix(prefix, root_objects=True)
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = f"conftest: removed leaked namespaces/objects: {', '.join(leaked)}"
        if reporter is not None:
            reporter.write_line(line, yellow=True)
        else:
            print(line)
