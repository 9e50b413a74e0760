"""`sessionkeys` on the back ends: a TLS session made on be1 resumes on be2 through the front end and the
cache while every cached session is sealed (AES-256-GCM); a bad key file is a config error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import wait_until

from .conftest import client_context, lab_rules, tls_get

@pytest.mark.netns
def test_sealed_sessions_resume_across_back_ends(lab):
    from tcpha.lab.demo import LabDeployment
    from tcpha.lab.tls_demo import TlsLab

    dep = LabDeployment(lab)
    keys = dep.dir / "sessionkeys"
    dep.dir.mkdir(parents=True, exist_ok=True)
    keys.write_text("ab" * 32 + "\n")
    keys.chmod(0o600)
    tls = TlsLab(dep)
    rundir = str(dep.dir / "run-fe")
    tls.start(be={"sessionkeys": str(keys)}, fe={"rules": lab_rules(lab), "rundir": rundir, "dtcinterval": 1})
    for version in ("1.2", "1.3"):
        ctx = client_context(tls, version)
        first = tls_get(tls, "a.example", ctx=ctx)
        assert first.status == 200 and first.backend == "be1" and not first.reused
        second = tls_get(tls, "b.example", ctx=ctx, session=first.session)
        assert second.status == 200 and second.backend == "be2" and second.reused, version
    for host in ("be1", "be2"):
        log = lab.log_path(host, "tcpha-be").read_text(errors="replace")
        assert f"sealed with {keys}" in log, log[-2000:]
    # The back ends report their session cache counters in their health checks' Pongs: the front end's
    # status document (the status page's) shows the hit rate: be2 resumed both sessions it was offered.
    from tcpha.cli.ctl import socket_for
    from tcpha.runtime.ctlsock import request

    def cache_counters():
        doc = request(socket_for(rundir), {"op": "read", "path": "status"})["data"]
        be2 = [b for b in doc["backends"] if b["name"].startswith(lab.ip("be2"))][0]
        return doc["tls_session_cache"] if be2["session_hits"] >= 2 else None
    counters = wait_until(cache_counters, 15, "the back ends' session counters in the status document")
    assert counters["hits"] >= 2 and counters["lookups"] >= counters["hits"]
    assert counters["hit_rate"] == counters["hits"] / counters["lookups"]


def test_a_bad_session_key_file_is_a_config_error(tmp_path):
    keys = tmp_path / "sessionkeys"
    keys.write_text("not a key\n")
    keys.chmod(0o600)
    conf = tmp_path / "tcphabe.conf"
    conf.write_text(f"raddr = 10.0.0.2\nvaddr = 10.0.0.100\nauthkey = {tmp_path}/authkey\n"
                    f"tlscert = {tmp_path}/cert.pem\nsessionkeys = {keys}\n")
    (tmp_path / "authkey").write_text("cd" * 32 + "\n")
    (tmp_path / "authkey").chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "tcpha.be", "-c", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"{conf}:5: sessionkeys: {keys}:1: a session key is 64 hex digits "
                                             f"(tcpha-keygen writes one)"], r.stderr
