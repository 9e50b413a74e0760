"""Two TLS server processes (separate contexts, separate processes) sharing one dc_server: a session
made on A is resumed on B, with Python's ssl client and with openssl s_client, for TLS 1.2 and 1.3;
a cache that goes down or never answers costs full handshakes, never a failed connection."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

from .conftest import client_context, s_client, visit, wait_for

VERSIONS = ["TLSv1_2", "TLSv1_3"]


@pytest.mark.parametrize("version", VERSIONS)
def test_session_made_on_a_resumes_on_b_python_client(dc_server, tls_server, certs, version):
    cache, _ = dc_server()
    a = tls_server("A", cache)
    b = tls_server("B", cache)
    client = client_context(certs, version)

    first = visit(a.port, client)
    assert first.line == f"A reused=0 {version.replace('_', '.')}"
    assert not first.reused and first.session is not None
    on_b = visit(b.port, client, first.session)
    assert on_b.line.startswith("B reused=1") and on_b.reused
    back_on_a = visit(a.port, client, on_b.session)
    assert back_on_a.line.startswith("A reused=1") and back_on_a.reused
    # B found A's session in the cache (it had no other way to know it).
    stats = json.loads(visit(b.port, client, send=b"stats\n").line)
    assert stats["lookups"] == 1 and stats["hits"] == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_session_made_on_a_resumes_on_b_openssl_s_client(dc_server, tls_server, certs, tmp_path, version):
    cache, _ = dc_server()
    a = tls_server("A", cache)
    b = tls_server("B", cache)
    sess = str(tmp_path / "sess.pem")
    tag = version.replace("_", ".")

    out = s_client(a.port, version, certs.cert, sess_out=sess)
    assert re.search(rf"^New, {re.escape(tag)},", out, re.M), out
    assert "A reused=0" in out
    assert (tmp_path / "sess.pem").read_text().startswith("-----BEGIN SSL SESSION PARAMETERS-----")

    out = s_client(b.port, version, certs.cert, sess_in=sess)
    assert re.search(rf"^Reused, {re.escape(tag)},", out, re.M), out
    assert "B reused=1" in out


def test_cache_down_full_handshakes_zero_failures_and_back(dc_server, tls_server, certs, procs):
    cache, dc = dc_server()
    a = tls_server("A", cache, "--retry-interval", "0.2")
    b = tls_server("B", cache, "--retry-interval", "0.2")
    client = client_context(certs, "TLSv1_3")
    assert visit(b.port, client, visit(a.port, client).session).reused

    procs.stop(dc)
    failures, reused = 0, 0
    session = None
    for i in range(40):
        try:
            v = visit((a, b)[i % 2].port, client, session)
            session = v.session
            reused += v.reused
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            failures += 1
            print("failed:", exc)
    assert failures == 0
    assert reused == 0  # nothing can be stored or found while the cache is down

    dc_server(cache)  # the same address again

    def resumes_across():
        return visit(b.port, client, visit(a.port, client).session).reused

    wait_for(resumes_across, 15, "resumption across servers after dc_server restarted", interval=0.1)
    for server in (a, b):
        log = server.log()
        assert log.count("failed (") == 1, log      # one line per outage, not one per handshake
        assert log.count("answers again") == 1, log


def test_cache_that_never_answers_bounds_the_handshake(tls_server, certs):
    # A listener that never accepts: connects succeed (backlog), requests are never answered.
    black = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        address = "IP:127.0.0.1:%d" % black.getsockname()[1]
        timeout = 1.0  # large against a handshake's few ms, even on a loaded machine
        a = tls_server("A", address, "--timeout", str(timeout), "--retry-interval", "30")
        b = tls_server("B", address, "--timeout", str(timeout), "--retry-interval", "0")
        client = client_context(certs, "TLSv1_2")

        # The ADD of a full handshake is posted, never waited for: even this cache costs it nothing.
        first = visit(a.port, client)
        assert first.line.startswith("A reused=0")
        assert first.seconds < timeout * 0.8
        # The first lookup waits out the timeout, once ...
        v = visit(a.port, client, first.session)
        assert not v.reused and timeout * 0.9 <= v.seconds < timeout + 2
        # ... then the cache is marked down on A: the next handshakes do not wait at all.
        for _ in range(3):
            v = visit(a.port, client, first.session)
            assert not v.reused and v.seconds < timeout * 0.8

        # B retries the cache on every handshake: the lookup is bounded by the timeout, the store posted.
        t0 = time.monotonic()
        v = visit(b.port, client, first.session)
        assert not v.reused and v.line.startswith("B reused=0")
        assert timeout * 0.9 <= time.monotonic() - t0 < timeout + 2
    finally:
        black.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_concurrent_handshakes_resume_across_servers(dc_server, tls_server, certs, version):
    """Many handshakes at once in each server (threads: the callbacks run concurrently, each
    taking a cache connection from the pool): every one resumes on the other server."""
    from concurrent.futures import ThreadPoolExecutor

    cache, _ = dc_server()
    servers = (tls_server("A", cache), tls_server("B", cache))
    client = client_context(certs, version)
    seeds = [visit(servers[i % 2].port, client) for i in range(8)]   # made on A, B, A, ...

    def resume(i: int):
        return visit(servers[(i + 1) % 2].port, client, seeds[i % 8].session)  # on the other one

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(resume, range(64)))
    assert all(r.reused and r.server_reused for r in results), [r.line for r in results if not r.reused]
    for server in servers:
        stats = json.loads(visit(server.port, client, send=b"stats\n").line)
        assert stats["hits"] == 32 and stats["errors"] == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_cache_operations_per_handshake_seen_by_a_real_dc_server(dc_server, tls_server, procs, certs, tmp_path,
                                                                  version):
    """What each handshake asks of dc_server, counted on the wire by dc_snoop -decode between the
    servers and dc_server: a full handshake one ADD; a TLS 1.2 resumption one GET; a TLS 1.3
    resumption one GET and one ADD (the single new ticket: num_tickets = 1), and no REMOVE (OpenSSL
    removes a used stateful ticket only with early data, which is off)."""
    import subprocess
    import sys

    cache, _ = dc_server()
    snoop_addr = f"UNIX:{tmp_path}/snoop"
    trace = tmp_path / "snoop.out"
    procs.add(subprocess.Popen([sys.executable, "-m", "tcpha.cli.dc_snoop", "-listen", snoop_addr, "-connect", cache,
                                "-decode"], stdout=subprocess.DEVNULL, stderr=open(trace, "w")))  # the trace is on stderr
    wait_for(lambda: os.path.exists(snoop_addr[5:]), 10, "dc_snoop")
    a = tls_server("A", snoop_addr)
    b = tls_server("B", snoop_addr)
    client = client_context(certs, version)

    def requests() -> list[str]:
        return re.findall(r"client->server.*?op=(\w+)", trace.read_text())

    def settled(count: int) -> list[str]:
        # Posted ADDs reach dc_server after the handshake: wait until they have all arrived.
        return wait_for(lambda: (lambda r: r if len(r) >= count else None)(requests()), 10,
                        f"{count} requests at dc_server")

    first = visit(a.port, client)
    assert settled(1) == ["ADD"]
    session, resumptions = first.session, 4
    for i in range(resumptions):
        v = visit((b, a)[i % 2].port, client, session)
        assert v.reused and v.server_reused
        session = v.session
    per_resumption = ["GET", "ADD"] if version == "TLSv1_3" else ["GET"]
    seen = settled(1 + resumptions * len(per_resumption))
    assert seen == ["ADD"] + per_resumption * resumptions
    assert "REMOVE" not in requests()
    # The answers of the posted ADDs are read (at later operations) and counted: stored, none refused.
    # (Each stats visit is itself a full handshake, whose ADD reads the answers that have arrived.)
    def counters() -> list[dict]:
        return [json.loads(visit(s.port, client, send=b"stats\n").line) for s in (a, b)]

    last = wait_for(lambda: (lambda c: c if sum(x["stored"] for x in c) >= seen.count("ADD") else None)(counters()),
                    10, "the answers of the posted ADDs to be counted")
    assert all(x["not_stored"] == 0 and x["errors"] == 0 for x in last)
