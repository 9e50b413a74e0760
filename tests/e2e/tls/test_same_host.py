"""TLS on the same-host path: tcpha-fe passes the accepted socket (SCM_RIGHTS) to a tcpha-be on its own
host, which terminates TLS exactly as on a handed-off connection."""

from __future__ import annotations

import hashlib

import pytest

from tcpha.lab.demo import LabDeployment
from tcpha.lab.http import start_http
from tcpha.lab.tls_demo import TlsLab, make_cert

from .conftest import client_context, tls_get

pytestmark = pytest.mark.netns


def test_same_host_back_end_terminates_tls_on_a_passed_socket(lab):
    tls = TlsLab(LabDeployment(lab), cache=False)
    dep = tls.dep
    tls.cert, tls.key = make_cert(dep.dir, vip=dep.vip)
    path = str(dep.dir / "be.sock")
    origin = start_http(lab, "fe", port=8080, files={"a.bin": 300_000})
    dep.start_backend("fe", unixpath=path, **tls.be_options("fe"))
    dep.start_fe(port="80 443", servers=[f"unix:{path}"], rules=[f"unix:{path} sni:.*", f"unix:{path} ^/"])
    ctx = client_context(tls)
    big = tls_get(tls, "a.example", ctx=ctx, path="/a.bin")
    assert (big.status, big.backend, big.reused) == (200, "fe", False)
    body = big.raw.split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(body).digest() == hashlib.sha256(origin.expected("a.bin")).digest()
    # Its own sessions resume (OpenSSL's per-process cache: no sessioncache configured).
    again = tls_get(tls, "b.example", ctx=ctx, session=big.session)
    assert (again.status, again.backend, again.reused) == (200, "fe", True)
    # Plain HTTP on port 80 still goes the splice way.
    assert dep.request("/whoami").body == b"fe\n"
