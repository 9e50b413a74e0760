"""The shared-cache fallbacks at the daemon level: the shim's self-check failing inside tcpha-be, and a
session cache that is unreachable from the start. Either way TLS keeps working with full handshakes
(never a failed connection) and the operator gets one clear log line."""

from __future__ import annotations

import sys

import pytest

from tcpha.lab.demo import CONTROL_PORT, LabDeployment, be_config_text
from tcpha.lab.tls_demo import TlsLab

from .conftest import client_context, lab_rules, tls_get, wait_until

pytestmark = pytest.mark.netns

# tcpha-be, with the shim's first self-check (finding and checking libssl) made to fail.
BROKEN_SHIM_BE = """
import sys
import tcpha.tls.openssl as shim
def broken():
    raise shim.ShimError("forced by the test: libssl self-check failed")
shim.libssl = broken
from tcpha.cli.be import main
sys.exit(main(["-c", sys.argv[1]]))
"""


def test_shim_refused_or_cache_unreachable_means_full_handshakes_never_failures(lab):
    tls = TlsLab(LabDeployment(lab), cache=False)      # no dc_server, no dc_client anywhere
    dep = tls.dep
    from tcpha.lab.tls_demo import make_cert
    tls.cert, tls.key = make_cert(dep.dir, vip=dep.vip)
    dep.start_origins()
    # be1: sessioncache set, but the shim's self-check fails inside the daemon.
    conf1 = dep.dir / "tcphabe-be1.conf"
    conf1.write_text(be_config_text(lab, "be1", str(dep.key), dbglevel=4,
                                    **tls.be_options("be1", sessioncache="IP:127.0.0.1:9002")))
    dep.be_procs["be1"] = lab.spawn("be1", [sys.executable, "-c", BROKEN_SHIM_BE, str(conf1)], name="tcpha-be",
                                    ready_tcp=(lab.ip("be1"), CONTROL_PORT), timeout=15)
    # be2: the shim is fine, but nothing listens at the session cache's address.
    dep.start_backend("be2", dbglevel=4, **tls.be_options("be2", sessioncache="IP:127.0.0.1:9002"))
    dep.start_fe(port="80 443", rules=lab_rules(lab))

    ctx = client_context(tls)
    session = None
    answers = []
    for sni in ["a.example", "b.example"] * 5:
        a = tls_get(tls, sni, ctx=ctx, session=session)
        answers.append((a.status, a.backend, a.reused))
        session = a.session
    # Every connection answered by the back end its SNI names; no resumption across back ends.
    assert answers == [(200, "be1" if i % 2 == 0 else "be2", False) for i in range(10)]

    # be1 fell back to "no shared cache": one clear line, and its own (internal) cache still resumes
    # a session it made itself.
    log1 = lab.log_path("be1", "tcpha-be").read_text()
    assert log1.count("TLS session sharing disabled, no shared session cache: forced by the test") == 1
    first = tls_get(tls, "a.example", ctx=ctx)
    again = tls_get(tls, "a.example", ctx=ctx, session=first.session)
    assert (again.backend, again.reused) == ("be1", True)

    # be2 kept the shim but its cache never answered: marked down with one warning (not one per handshake).
    log2 = lab.log_path("be2", "tcpha-be").read_text()
    assert wait_until(lambda: "TLS session cache" in lab.log_path("be2", "tcpha-be").read_text(), timeout=5)
    log2 = lab.log_path("be2", "tcpha-be").read_text()
    assert "failed" in log2 and log2.count("full handshakes, retrying every") == 1
    assert "Traceback" not in log1 + log2
    assert all(p.poll() is None for p in dep.be_procs.values())
