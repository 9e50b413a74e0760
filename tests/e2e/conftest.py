"""Fixtures for the end-to-end tests: tcpha deployed in a namespace lab (tcpha.lab.demo.LabDeployment)."""

from __future__ import annotations

import re

import pytest

from tcpha.lab.deploy import DataPath
from tests.support import new_prefix, up_lab

# Every test here that deploys tcpha runs once over each data path of --datapaths (tests/conftest.py;
# default splice+bpf,bpf+nft): the back ends' relay (splice or the BPF sockmap) and the front end's
# steering (the tc BPF program or the nft table). Why a parametrisation and not one pytest run per path
# (TCPHA_LAB_RELAY / TCPHA_LAB_STEERING, which the lab still reads outside this suite): one command
# (scripts/test, hence CI) covers every path; each test id names the path it ran on
# (test_x[relay-bpf+steering-nft]); `-k steering-nft` or --datapaths picks one. Two paths cover each
# relay and each steering once, not every pair: the relay works on the back end and the steering on the
# front end, independent of each other; all four would double the suite's cost again (about 5 min per
# path on CI's 2 cores). The lab fixtures below are those of tests/conftest.py with the data path set
# on the lab, so a test's deployment (tcpha.lab.deploy) writes it into every daemon's configuration;
# they are module-scoped per path, so the tests of a module run over one path, then the other, each on a
# lab of its own. Tests that deploy nothing (test_cli) do not ask for a lab and run once.


def pytest_generate_tests(metafunc):
    if "datapath" in metafunc.fixturenames:
        paths = DataPath.parse_list(metafunc.config.getoption("datapaths"))
        metafunc.parametrize("datapath", paths, ids=[p.id for p in paths], indirect=True, scope="module")


@pytest.fixture(scope="module")
def datapath(request):
    """The data path (relay, steering) of this test's daemons: one of --datapaths."""
    return request.param


def lab_on(prefix, datapath):
    """up_lab (tests/support.py), and at the end a check that the daemons ran on `datapath`: every
    start-up line of a tcpha-be names its relay and every tcpha-fe its steering, so a path that was
    silently not taken (a setting lost on the way) fails here instead of passing under the wrong id."""
    labs = up_lab(prefix, datapath)
    the_lab = next(labs)
    try:
        yield the_lab
        wrong = datapath_mismatches(the_lab, datapath)
        assert not wrong, f"daemons not on {datapath.id}: " + "; ".join(wrong)
    finally:
        labs.close()


# the start-up lines (tcpha/be/server.py, tcpha/steering/choose.py): "relay: bpf (relay = bpf: ...)",
# "flow steering: nft (steering = nft)"
STARTUP_LINES = {"tcpha-be": re.compile(r"\brelay: (\w+) \(relay = "),
                 "tcpha-fe": re.compile(r"\bflow steering: (\w+) \(steering = ")}


def datapath_mismatches(the_lab, datapath):
    """What in the lab's daemon logs says the daemons did not run on `datapath`: a start-up line naming
    another relay or steering, or a daemon's log without its start-up line."""
    expect = {"tcpha-be": datapath.relay, "tcpha-fe": datapath.steering}
    wrong = []
    for log_file in sorted((the_lab.workdir / "logs").glob("*.log")):
        for daemon, kind in expect.items():
            if daemon not in log_file.name:
                continue
            kinds = STARTUP_LINES[daemon].findall(log_file.read_text(errors="replace"))
            if not kinds:
                wrong.append(f"{log_file.name}: no start-up line")
            elif kind not in (None, "auto") and set(kinds) != {kind}:
                wrong.append(f"{log_file.name}: {', '.join(sorted(set(kinds)))}")
    return wrong


@pytest.fixture
def lab(run_prefix, datapath):
    """tests/conftest.py's `lab`, its daemons on this test's data path."""
    yield from lab_on(run_prefix, datapath)


@pytest.fixture(scope="module")
def lab_module(datapath):
    """tests/conftest.py's `lab_module` (shared by a module's tests on one data path)."""
    yield from lab_on(new_prefix(), datapath)

# Rules of the shared deployment: images (by URI or by Host) to be1, everything under / except
# /private/ to be2; /private/... matches no rule (503 written by the front end).
RULES_BE1_BE2 = ["{be1} jpg$", "{be1} host:^img\\.", "{be2} ^/(?!private/)"]


def lab_rules(lab, rules=RULES_BE1_BE2):
    return [r.format(be1=lab.ip("be1"), be2=lab.ip("be2")) for r in rules]


@pytest.fixture(scope="module")
def deployment(lab_module):
    """tcpha-fe + tcpha-be on be1/be2 + nginx origins, shared by one module's tests."""
    from tcpha.lab.demo import LabDeployment
    dep = LabDeployment(lab_module)
    dep.start(fe={"rules": lab_rules(lab_module)})
    yield dep


@pytest.fixture
def fresh(lab):
    """A LabDeployment on a lab of its own (nothing started yet)."""
    from tcpha.lab.demo import LabDeployment
    yield LabDeployment(lab)
