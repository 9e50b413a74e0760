"""TLS end to end: SNI routing at the front end, termination on the back ends, sessions made on
one back end resumed on the other through distcache, a cache outage, and malformed ClientHellos."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tcpha.lab.demo import VPORT
from tcpha.lab.tls_demo import TLS_VPORT
from tcpha.sniff.tls import HANDSHAKE_FAILURE_ALERT

from .conftest import MemoryClient, client_context, tls_get, wait_until

pytestmark = pytest.mark.netns


def fe_log(tls) -> str:
    return tls.lab.log_path("fe", "tcpha-fe").read_text(errors="replace")


def diagnostics(tls) -> str:
    """The daemons' warnings, for an assertion message."""
    lines = []
    for host, name in (("fe", "tcpha-fe"), ("be1", "tcpha-be"), ("be2", "tcpha-be")):
        text = tls.lab.log_path(host, name).read_text(errors="replace").splitlines()
        lines += [f"{host}: {line}" for line in text if " WARNING " in line or " ERROR " in line][-15:]
    return "\n".join(lines)


def be_tls_counters(tls, host: str) -> dict:
    """The `tls` counters of a back end's `status` control file (over its control socket)."""
    from tcpha.cli.ctl import socket_for
    from tcpha.runtime.ctlsock import request
    reply = request(socket_for(str(tls.lab.workdir / "tcpha" / f"run-be-{host}")), {"op": "read", "path": "status"})
    assert reply.get("ok"), reply.get("error")
    return reply["data"]["tls"]


# -- resumption across back ends ------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_session_made_on_be1_is_reused_on_be2(tls_deployment, version, tmp_path):
    tls = tls_deployment
    sess = tmp_path / f"tls{version}.sess"
    first = tls.s_client("a.example", sess_out=sess, version=version)
    assert (first.backend, first.status, first.reused) == ("be1", 200, False), first.output[-2000:]
    assert first.version == f"TLSv{version}"
    assert sess.stat().st_size > 0
    second = tls.s_client("b.example", sess_in=sess, version=version)
    assert (second.backend, second.status, second.reused) == ("be2", 200, True), second.output[-2000:]
    # And back: the session (now also used on be2) still resumes on be1.
    third = tls.s_client("a.example", sess_in=sess, version=version)
    assert (third.backend, third.reused) == ("be1", True)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_python_ssl_client_sees_session_reused_on_the_other_back_end(tls_deployment, version):
    tls = tls_deployment
    ctx = client_context(tls, version)
    be1, be2 = be_tls_counters(tls, "be1"), be_tls_counters(tls, "be2")
    first = tls_get(tls, "a.example", ctx=ctx)
    assert (first.backend, first.status, first.reused) == ("be1", 200, False)
    assert first.session is not None
    second = tls_get(tls, "b.example", ctx=ctx, session=first.session)
    assert (second.backend, second.status) == ("be2", 200)
    assert second.reused is True
    assert second.version == f"TLSv{version}"
    assert second.raw.endswith(b"be2\n")            # the plaintext answer of be2's application, intact
    # What the back ends count (status, and the same counters in metrics): be1 made a full handshake,
    # be2 resumed its session.
    be1_after, be2_after = be_tls_counters(tls, "be1"), be_tls_counters(tls, "be2")
    assert be1_after["handshakes"] > be1["handshakes"]
    assert be2_after["resumed"] > be2["resumed"]


def test_without_an_offered_session_every_handshake_is_full(tls_deployment):
    tls = tls_deployment
    ctx = client_context(tls)
    answers = [tls_get(tls, sni, ctx=ctx) for sni in ("a.example", "b.example", "a.example")]
    assert [(a.backend, a.reused) for a in answers] == [("be1", False), ("be2", False), ("be1", False)]


# -- routing --------------------------------------------------------------------------------------

def test_sni_rules_route_as_written_and_port_80_still_serves_http(tls_deployment):
    tls = tls_deployment
    ctx = client_context(tls)
    assert tls_get(tls, "a.example", ctx=ctx).backend == "be1"
    assert tls_get(tls, "A.Example", ctx=ctx).backend == "be1"          # SNI rules ignore case
    assert tls_get(tls, "b.example", ctx=ctx).backend == "be2"
    # No SNI: matched as "" -> the `sni:^$` default rule -> be1.
    nosni = tls_get(tls, None, ctx=client_context(tls, verify=False))
    assert (nosni.backend, nosni.status) == ("be1", 200)
    # An alpn: rule sees the protocols offered (first match wins: it comes before the sni: rules).
    alpn_ctx = client_context(tls)
    alpn_ctx.set_alpn_protocols(["tcpha-test", "http/1.1"])
    assert tls_get(tls, "a.example", ctx=alpn_ctx).backend == "be2"
    # The same front end still serves plain HTTP on port 80 (`port = 80 443`), by URI rules.
    r = tls.dep.request("/whoami")
    assert (r.status, r.backend) == (200, "be2")
    r = tls.dep.request("/img/logo.jpg")
    assert (r.status, r.backend) == (200, "be1")


def test_tls_connection_matching_no_rule_gets_a_handshake_failure_alert(tls_deployment):
    tls = tls_deployment
    hello = MemoryClient(client_context(tls, verify=False), "c.example").client_hello()
    s = tls.lab.connect("client", tls.dep.vip, TLS_VPORT, timeout=10)
    try:
        s.sendall(hello)
        got = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            got += b
    finally:
        s.close()
    assert got == HANDSHAKE_FAILURE_ALERT
    # And a real client sees a TLS handshake failure (not a hang, not an HTTP page).
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|handshake failure"):
        tls_get(tls, "c.example", ctx=client_context(tls, verify=False))


def test_incomplete_hello_at_peektimeout_is_routed_by_the_default_rule(tls_deployment):
    """Half a ClientHello, then silence past peektimeout (1 s here): the front end routes it as a hello
    without SNI (-> be1 by `sni:^$`), although its SNI (b.example) would have chosen be2; the rest of
    the hello then reaches be1, which completes the handshake."""
    tls = tls_deployment
    marker = "TLS ClientHello not complete within"
    before = fe_log(tls).count(marker)
    client = MemoryClient(client_context(tls), "b.example")
    hello = client.client_hello()
    s = tls.lab.connect("client", tls.dep.vip, TLS_VPORT, timeout=10)
    try:
        s.sendall(hello[:40])
        assert wait_until(lambda: fe_log(tls).count(marker) > before, timeout=10), "no peektimeout routing logged"
        s.sendall(hello[40:])
        answer = client.finish(s, b"GET /whoami HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n")
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"\r\nX-Tcpha-Backend: be1\r\n" in answer


# -- malformed ClientHellos -------------------------------------------------------------------------

def malformed_corpus(hello: bytes) -> list[tuple[str, bytes]]:
    """Truncated, corrupted and hostile first flights built from a real ClientHello (deterministic)."""
    rnd = random.Random(5)
    body = hello[5:]
    corpus: list[tuple[str, bytes]] = []
    for n in (1, 2, 5, 6, 9, 40, len(hello) // 2, len(hello) - 1):
        corpus.append((f"truncated to {n}", hello[:n]))
    for pos in (3, 4, 6, 7, 8, 9, 43, 44, 76, 77):                     # record / handshake / vector lengths
        for value in (0x00, 0xFF):
            b = bytearray(hello)
            b[pos] = value
            corpus.append((f"byte {pos} = {value:#x}", bytes(b)))
    for i in range(24):                                                 # random corruption
        b = bytearray(hello)
        for _ in range(rnd.randint(1, 8)):
            b[rnd.randrange(5, len(b))] = rnd.randrange(256)
        corpus.append((f"corrupted #{i}", bytes(b)))
    corpus += [
        ("record length 0", b"\x16\x03\x01\x00\x00"),
        ("record longer than 2^14+256", b"\x16\x03\x01\xff\xff" + bytes(64)),
        ("server hello type", hello[:5] + b"\x02" + hello[6:]),
        ("handshake length 16 MiB", hello[:5] + b"\x01\xff\xff\xff" + body[4:]),
        ("hello split into 1-byte records",
         b"".join(b"\x16\x03\x01\x00\x01" + body[i:i + 1] for i in range(len(body)))),
        ("zero-length records then hello", b"\x16\x03\x01\x00\x00" * 4 + hello),
        ("hello then garbage", hello + bytes(rnd.randrange(256) for _ in range(300))),
        ("alert record first", b"\x15\x03\x01\x00\x02\x02\x28" + hello),
        ("SSLv2 style", b"\x80\x2e\x01\x00\x02" + bytes(rnd.randrange(256) for _ in range(44))),
        ("0x16 then random", b"\x16" + bytes(rnd.randrange(256) for _ in range(600))),
        ("0x16 0x03 then random", b"\x16\x03" + bytes(rnd.randrange(256) for _ in range(2000))),
        ("fragmented hello longer than peekmax",
         b"".join(b"\x16\x03\x01" + struct.pack(">H", 16384) + (b"\x01\x00\xff\xff" if i == 0 else b"")
                  + bytes(16384 - (4 if i == 0 else 0)) for i in range(2))),
    ]
    return corpus


def send_and_wait_close(tls, data: bytes, half_close: bool) -> str:
    """Send `data`, optionally FIN, read until the server closes; the outcome as a word.

    With FIN, the server must close within 15 s. Without FIN, an incomplete record may legitimately
    be waited for (the back end's TLS stack waits up to its handshake timeout): after 3 s of silence
    the outcome is "waiting" and the client gives up."""
    s = tls.lab.connect("client", tls.dep.vip, TLS_VPORT, timeout=15 if half_close else 3)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                if half_close:
                    return "hang"
                return "waiting"
            if not b:
                break
            got += b
        return "alert" if got[:1] == b"\x15" else "closed" if not got else "data"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        s.close()


def test_malformed_hello_corpus_never_crashes_the_front_end(tls_deployment):
    tls = tls_deployment
    fe = tls.dep.fe_proc
    hello = MemoryClient(client_context(tls, verify=False), "a.example").client_hello()
    corpus = malformed_corpus(hello)
    assert len(corpus) > 60
    # Every item with FIN after it, and every third one also without (the client then stays silent).
    runs = [(name, data, True) for name, data in corpus] + [(name, data, False) for name, data in corpus[::3]]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda r: (r[0], r[2], send_and_wait_close(tls, r[1], r[2])), runs))
    hangs = [(name, fin) for name, fin, outcome in outcomes if outcome == "hang"]
    assert hangs == []
    assert fe.poll() is None, "tcpha-fe exited"
    log = fe_log(tls)
    assert "Traceback" not in log
    assert "exited (" not in log                     # the arbiter never had to replace a worker
    # The front end still routes and hands off TLS and HTTP as before.
    ctx = client_context(tls)
    assert tls_get(tls, "b.example", ctx=ctx).backend == "be2"
    assert tls.dep.request("/whoami").status == 200
    # Unreadable hellos were routed (to the default back end, whose TLS stack refused them), not dropped.
    assert "routed as a ClientHello without SNI" in log


# -- the session cache going away and coming back ------------------------------------------------------

def test_dc_server_outage_means_full_handshakes_and_no_failed_connection(tls_deployment):
    """A client alternating between be1 and be2, always offering its last session, while dc_server is
    stopped and restarted: every connection succeeds; none resumes while the cache is down; resumption
    across back ends comes back once dc_server runs again."""
    tls = tls_deployment
    ctx = client_context(tls)
    results: list[tuple[str, bool, str | None]] = []      # (phase, reused, backend)
    errors: list[str] = []
    phase = ["up"]
    stop = threading.Event()

    def client_loop() -> None:
        session = None
        i = 0
        while not stop.is_set():
            sni = ("a.example", "b.example")[i % 2]
            i += 1
            p = phase[0]
            try:
                a = tls_get(tls, sni, ctx=ctx, session=session, timeout=10)
            except Exception as e:                       # noqa: BLE001 - every failure is counted
                errors.append(f"{p} {sni}: {type(e).__name__}: {e}")
                continue
            if a.status != 200:
                errors.append(f"{p} {sni}: status {a.status}")
            results.append((p, a.reused, a.backend))
            session = a.session

    t = threading.Thread(target=client_loop, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: sum(1 for r in results if r[0] == "up" and r[1]) >= 3, timeout=20)
        tls.services["dc_server"].stop()
        phase[0] = "stopping"
        n = len(results)
        assert wait_until(lambda: len(results) >= n + 3, timeout=20)
        phase[0] = "down"
        n = len(results)
        assert wait_until(lambda: len(results) >= n + 20, timeout=30)
        phase[0] = "restarting"
        tls.restart_dc_server()
        phase[0] = "restarted"
        assert wait_until(lambda: sum(1 for r in results if r[0] == "restarted" and r[1]) >= 3, timeout=30), \
            "resumption did not come back after dc_server restarted"
    finally:
        stop.set()
        t.join(30)
    assert errors == [], diagnostics(tls)
    down = [r for r in results if r[0] == "down"]
    assert len(down) >= 20
    assert not any(reused for _, reused, _ in down)
    assert {be for _, _, be in down} == {"be1", "be2"}


def test_hung_dc_server_costs_full_handshakes_not_connections(tls_deployment):
    """dc_server frozen (SIGSTOP: its connections stay open, nothing answers): cache lookups hit the
    back ends' bounded timeout, handshakes are full, no connection fails; after SIGCONT sessions
    resume across back ends again."""
    import os
    import signal
    tls = tls_deployment
    proc = tls.services["dc_server"].proc
    assert proc is not None and proc.poll() is None
    ctx = client_context(tls)
    errors: list[str] = []
    results: list[tuple[str, bool, str | None]] = []

    def alternate(phase: str, count: int, session=None):
        for i in range(count):
            sni = ("a.example", "b.example")[i % 2]
            try:
                a = tls_get(tls, sni, ctx=ctx, session=session, timeout=10)
            except Exception as e:                       # noqa: BLE001 - every failure is counted
                errors.append(f"{phase} {sni}: {type(e).__name__}: {e}")
                continue
            results.append((phase, a.reused, a.backend))
            session = a.session
        return session

    session = alternate("before", 4)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        session = alternate("hung", 12, session)
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    def resumes_again() -> bool:
        alternate("after", 2, alternate("after", 1))     # a new session on be1, offered to be1 then be2
        return any(phase == "after" and reused for phase, reused, _ in results)
    assert wait_until(resumes_again, timeout=30)
    assert errors == [], diagnostics(tls)
    before = [r for r in results if r[0] == "before"]
    hung = [r for r in results if r[0] == "hung"]
    assert sum(reused for _, reused, _ in before) >= 2
    assert len(hung) == 12 and not any(reused for _, reused, _ in hung)


def test_200_tls_connections_20_at_a_time_all_answered(tls_deployment):
    """Concurrent handshakes (full and resumed) share each back end's event loop: none fails, every
    answer is complete, and every offered session is resumed across back ends."""
    tls = tls_deployment
    ctx = client_context(tls)
    seed = tls_get(tls, "a.example", ctx=ctx)

    def one(i: int):
        sni = ("a.example", "b.example")[i % 2]
        a = tls_get(tls, sni, ctx=ctx, session=seed.session if i % 4 < 2 else None, path="/100k.bin")
        return i, a.status, a.backend, a.reused, len(a.raw.split(b"\r\n\r\n", 1)[-1])

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(200)))
    size = len(tls.dep.origins["be1"].expected("100k.bin"))
    bad = [r for r in results if r[1] != 200 or r[4] != size or r[2] != ("be1", "be2")[r[0] % 2]]
    assert bad == [], diagnostics(tls)
    # Never a resumption without an offered session. Every offered one resumes, unless a cache lookup
    # exceeded its bounded timeout on this loaded machine (then a full handshake, by design, and the back
    # end says so in a WARNING): no miss goes unexplained.
    assert not any(r[3] for r in results if r[0] % 4 >= 2)
    missed = [r[0] for r in results if r[0] % 4 < 2 and not r[3]]
    if missed:
        cache_failures = [line for line in diagnostics(tls).splitlines()
                          if "TLS session cache" in line and " failed (" in line]
        assert cache_failures, f"offered sessions not resumed with no cache failure logged: {missed}"

