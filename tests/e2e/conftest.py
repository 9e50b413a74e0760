"""Fixtures for the end-to-end tests: tcpha deployed in a namespace lab (tcpha.lab.demo.LabDeployment)."""

from __future__ import annotations

import pytest

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
