"""TLS on the distcache links (extension): dc_server -tls-cert/-tls-key/-tls-cafile, dc_client
-tls-cafile/-tls-cert/-tls-key/-tls-checkhost, DistcacheClient/AsyncDistcacheClient(tls=...).

Real processes on loopback; self-signed certificates (each its own CA) from the lab's make_cert."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import agent_has_upstream, free_port, procs, sockdir, wait_until  # noqa: E402,F401

from tcpha.distcache.aio import AsyncDistcacheClient  # noqa: E402
from tcpha.distcache.client import DistcacheClient, DistcacheError  # noqa: E402
from tcpha.distcache.codec import MessageReader  # noqa: E402
from tcpha.distcache.tls import ClientTls, TlsOptions  # noqa: E402
from tcpha.lab.tls_demo import make_cert  # noqa: E402


@pytest.fixture
def certs(tmp_path):
    """name -> (cert, key): 'server' (localhost, 127.0.0.1), 'other' (another CA, same names),
    'client' and 'stranger' (client certificates from two different CAs)."""
    out = {}
    for name, names in (("server", ["localhost"]), ("other", ["localhost"]), ("client", ["dc-client"]),
                        ("stranger", ["dc-client"])):
        d = tmp_path / name
        d.mkdir()
        cert, key = make_cert(d, names=names, vip="127.0.0.1" if names == ["localhost"] else None)
        out[name] = (str(cert), str(key))
    return out


def tls_server(procs, certs, *extra: str) -> str:
    addr = f"IP:127.0.0.1:{free_port()}"
    cert, key = certs["server"]
    procs.server(addr, "-tls-cert", cert, "-tls-key", key, *extra)
    return addr


def direct(addr: str, certs, **kw) -> DistcacheClient:
    return DistcacheClient(addr, 0, timeout=5, tls=ClientTls(TlsOptions(cafile=certs["server"][0], **kw)))


def test_through_dc_client_to_a_tls_dc_server(procs, certs, sockdir):
    server = tls_server(procs, certs)
    agent = f"UNIX:{sockdir}/agent"
    procs.agent(agent, server, args=("-tls-cafile", certs["server"][0]))
    c = DistcacheClient(agent, 0, timeout=5)
    assert c.add(b"sid-over-tls", b"session data", 60000)
    assert c.get(b"sid-over-tls") == b"session data"
    # The server holds it (read over TLS directly, the name 127.0.0.1 checked against the certificate).
    assert direct(server, certs).get(b"sid-over-tls") == b"session data"
    assert direct(server, certs, checkhost="localhost").has(b"sid-over-tls")


def test_async_client_over_tls(procs, certs):
    server = tls_server(procs, certs)
    tls = ClientTls(TlsOptions(cafile=certs["server"][0]))

    async def go():
        c = await AsyncDistcacheClient.connect(server, 5, tls=tls)
        try:
            assert await c.add(b"async-sid", b"async data", 60000)
            return await asyncio.gather(*(c.get(b"async-sid") for _ in range(50)))
        finally:
            await c.close()
    assert asyncio.run(go()) == [b"async data"] * 50


def test_dc_client_trusting_another_ca_cannot_use_the_server_and_says_why(procs, certs, sockdir):
    server = tls_server(procs, certs)
    agent = f"UNIX:{sockdir}/agent"
    p = procs.agent(agent, server, args=("-tls-cafile", certs["other"][0], "-retry", "200"), upstream=False)
    wait_until(lambda: "certificate verify failed" in p.stderr(), 15, "dc_client to say why")
    c = DistcacheClient(agent, 0, timeout=5)
    with pytest.raises(DistcacheError, match="no cache server"):
        c.add(b"never-stored", b"session data", 60000)
    assert direct(server, certs).get(b"never-stored") is None
    assert p.p.poll() is None, "dc_client must keep running"
    # One line per outage and reason, not one per retry (every 200 ms).
    wait_until(lambda: p.stderr().count("cannot connect") == 1 and "self-signed" in p.stderr(), 5,
               "one line")
    line = [ln for ln in p.stderr().splitlines() if "certificate verify failed" in ln]
    assert len(line) == 1, p.stderr()


def test_failover_past_a_server_whose_certificate_does_not_check_out(procs, certs, sockdir):
    # The first server shows a certificate of another CA: the agent goes on to the second.
    bad = f"IP:127.0.0.1:{free_port()}"
    procs.server(bad, "-tls-cert", certs["other"][0], "-tls-key", certs["other"][1])
    good = tls_server(procs, certs)
    agent = f"UNIX:{sockdir}/agent"
    p = procs.agent(agent, bad, good, args=("-tls-cafile", certs["server"][0], "-retry", "60000"))
    assert DistcacheClient(agent, 0, timeout=5).add(b"on-good", b"session data", 60000)
    assert direct(good, certs).get(b"on-good") == b"session data"
    assert f"cannot connect to cache server {bad}: certificate verify failed" in p.stderr()


def test_wrong_checkhost_is_refused(procs, certs, sockdir):
    server = tls_server(procs, certs)
    with pytest.raises(DistcacheError, match="Hostname mismatch"):
        direct(server, certs, checkhost="cache.example.org").get(b"x")
    agent = f"UNIX:{sockdir}/agent"
    p = procs.agent(agent, server, args=("-tls-cafile", certs["server"][0], "-tls-checkhost", "cache.example.org"),
                    upstream=False)
    wait_until(lambda: "Hostname mismatch" in p.stderr(), 15, "dc_client to say why")
    assert not agent_has_upstream(agent)


def test_unix_listener_with_tls_checks_the_chain(procs, certs, sockdir):
    server = f"UNIX:{sockdir}/server"
    procs.server(server, "-tls-cert", certs["server"][0], "-tls-key", certs["server"][1])
    assert direct(server, certs).add(b"unix-sid", b"session data", 60000)
    with pytest.raises(DistcacheError, match="certificate verify failed"):
        DistcacheClient(server, 0, timeout=5, tls=ClientTls(TlsOptions(cafile=certs["other"][0]))).get(b"unix-sid")


def test_plaintext_client_to_the_tls_listener_gets_nothing(procs, certs, sockdir):
    server = tls_server(procs, certs)
    assert direct(server, certs).add(b"secret-sid", b"secret data", 60000)
    with pytest.raises(DistcacheError):
        DistcacheClient(server, 0, timeout=5).get(b"secret-sid")
    # On the wire: a plaintext GET gets no distcache answer (at most a TLS alert, then the close).
    host, port = server.split(":")[1:]
    s = socket.create_connection((host, int(port)), timeout=5)
    from tcpha.distcache.client import encode_request
    s.sendall(encode_request(7, 1, b"secret-sid"))
    got = b""
    while True:
        data = s.recv(65536)
        if not data:
            break
        got += data
    s.close()
    assert b"secret data" not in got
    try:
        msgs = MessageReader(expect_response=True).feed(got)
    except Exception:
        msgs = []
    assert msgs == []
    # And a plaintext dc_client never gets an upstream.
    agent = f"UNIX:{sockdir}/agent"
    procs.agent(agent, server, args=("-retry", "200"), upstream=False)
    # (an ADD: a GET answered [2], "the proxy lost its server", is a plain miss for the C client)
    with pytest.raises(DistcacheError, match="no cache server|lost its cache server"):
        DistcacheClient(agent, 0, timeout=5).add(b"plain-sid", b"session data", 60000)
    assert direct(server, certs).get(b"plain-sid") is None


def test_client_certificates_required(procs, certs, sockdir):
    server = tls_server(procs, certs, "-tls-cafile", certs["client"][0])
    ca = certs["server"][0]
    # Without a certificate: refused, and the agent says what it suspects.
    lone = f"UNIX:{sockdir}/lone"
    p = procs.agent(lone, server, args=("-tls-cafile", ca, "-retry", "200"), upstream=False)
    wait_until(lambda: "client certificate" in p.stderr(), 15, "dc_client to say why")
    with pytest.raises(DistcacheError):
        DistcacheClient(lone, 0, timeout=5).add(b"from-lone", b"session data", 60000)
    # With one from another CA: refused.
    stranger = f"UNIX:{sockdir}/stranger"
    procs.agent(stranger, server, args=("-tls-cafile", ca, "-tls-cert", certs["stranger"][0],
                                        "-tls-key", certs["stranger"][1], "-retry", "200"), upstream=False)
    with pytest.raises(DistcacheError):
        DistcacheClient(stranger, 0, timeout=5).add(b"from-stranger", b"session data", 60000)
    # With the right one: served.
    member = f"UNIX:{sockdir}/member"
    procs.agent(member, server, args=("-tls-cafile", ca, "-tls-cert", certs["client"][0],
                                      "-tls-key", certs["client"][1]))
    assert DistcacheClient(member, 0, timeout=5).add(b"from-member", b"session data", 60000)
    tls = ClientTls(TlsOptions(cafile=ca, cert=certs["client"][0], key=certs["client"][1]))
    check = DistcacheClient(server, 0, timeout=5, tls=tls)
    assert check.get(b"from-member") == b"session data"
    assert check.get(b"from-lone") is None and check.get(b"from-stranger") is None


@pytest.mark.parametrize("tool,args,message", [
    ("dc_server", ["-tls-cert", "/nonexistent/c.pem"],
     "Error, -tls-cert given an invalid argument ('/nonexistent/c.pem': No such file or directory)"),
    ("dc_server", ["-tls-key", "{server_key}"], "Error, -tls-cafile and -tls-key need -tls-cert"),
    ("dc_server", ["-tls-cert", "{server_cert}", "-tls-key", "{other_key}"],
     "Error, -tls-key given an invalid argument ('{other_key}': not a usable certificate and key"),
    ("dc_server", ["-tls-cert", "{server_cert}", "-tls-key", "{server_key}", "-tls-cafile", "/nonexistent/ca"],
     "Error, -tls-cafile given an invalid argument ('/nonexistent/ca': No such file or directory)"),
    ("dc_server", ["-tls-cert", "{server_cert}", "-tls-key", "{server_key}", "-tls-cafile", "{server_key}"],
     "Error, -tls-cafile given an invalid argument ('{server_key}': no usable CA certificate"),
    ("dc_client", ["-server", "IP:127.0.0.1:1", "-tls-cert", "{server_cert}"], "Error, -tls-cert, -tls-key and "
     "-tls-checkhost need -tls-cafile"),
    ("dc_client", ["-server", "IP:127.0.0.1:1", "-tls-cafile", "/nonexistent/ca"],
     "Error, -tls-cafile given an invalid argument ('/nonexistent/ca': No such file or directory)"),
    ("dc_client", ["-server", "IP:127.0.0.1:1", "-tls-cafile", "{server_cert}", "-tls-key", "{server_key}"],
     "Error, -tls-key needs -tls-cert"),
    ("dc_client", ["-server", "IP:127.0.0.1:1", "-tls-cafile"], "Error, -tls-cafile requires an argument"),
])
def test_option_errors(procs, certs, sockdir, tool, args, message):
    subst = {"server_cert": certs["server"][0], "server_key": certs["server"][1], "other_key": certs["other"][1]}
    args = [a.format(**subst) for a in args]
    message = message.format(**subst)
    if tool == "dc_server":
        args = ["-listen", f"UNIX:{sockdir}/s", *args]
    else:
        args = ["-listen", f"UNIX:{sockdir}/a", *args]
    r = procs.run(f"tcpha.cli.{tool}", *args, timeout=30)
    assert r.returncode == 1
    first = r.stderr.splitlines()[0]
    assert first.startswith(message), r.stderr
    assert "Traceback" not in r.stderr
    if "requires an argument" not in message:
        assert len(r.stderr.splitlines()) == 1, r.stderr


def test_dc_test_over_tls(procs, certs):
    server = tls_server(procs, certs, "-tls-cafile", certs["client"][0])
    mine = ["-tls-cafile", certs["server"][0], "-tls-cert", certs["client"][0], "-tls-key", certs["client"][1]]
    for mode in ([], ["-persistent"]):
        r = procs.run("tcpha.cli.dc_test", "-connect", server, *mine, "-sessions", "5", "-ops", "200", *mode)
        assert r.returncode == 0 and "Info, all tests complete" in r.stderr, r.stderr
    # Trusting another CA: the original's failure lines, after one line saying why.
    r = procs.run("tcpha.cli.dc_test", "-connect", server, "-tls-cafile", certs["other"][0], "-persistent")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"Error, {server}: certificate verify failed: self-signed certificate",
        "Error, 'DC_CTX' creation failed"], r.stderr


def test_dc_snoop_to_a_tls_server(procs, certs, sockdir):
    server = tls_server(procs, certs)
    snoop = f"UNIX:{sockdir}/snoop"
    p = procs.start("tcpha.cli.dc_snoop", "-listen", snoop, "-server", server, "-tls-cafile", certs["server"][0],
                    ready=snoop)
    assert DistcacheClient(snoop, 0, timeout=5).add(b"snooped-sid", b"session data", 60000)
    assert direct(server, certs).get(b"snooped-sid") == b"session data"
    wait_until(lambda: "client->server, message completed" in p.stderr(), 10, "the trace")
    bad = f"UNIX:{sockdir}/snoopbad"
    q = procs.start("tcpha.cli.dc_snoop", "-listen", bad, "-server", server, "-tls-cafile", certs["other"][0],
                    ready=bad)
    with pytest.raises(DistcacheError):
        DistcacheClient(bad, 0, timeout=5).add(b"never", b"session data", 60000)
    wait_until(lambda: "certificate verify failed" in q.stderr(), 10, "dc_snoop to say why")


def test_a_client_that_never_finishes_its_handshake_is_closed_after_stall(procs, certs):
    server = tls_server(procs, certs, "-stall", "1000")
    host, port = server.split(":")[1:]
    s = socket.create_connection((host, int(port)), timeout=20)   # asyncio's own limit would be 60 s
    try:
        assert s.recv(100) == b""
    finally:
        s.close()
