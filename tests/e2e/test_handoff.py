"""End to end through real daemons in the namespace lab: routing, answers written by the front end,
keep-alive, direct server return, uploads, many handoffs, the steering table's bound."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tcpha.lab.demo import VPORT
from tcpha.lab.deploy import fe_steering
from tests.support import fixed_client_port, wait_until

pytestmark = pytest.mark.netns


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server's FIN; a reset raises (the tests count resets as failures)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def raw_exchange(dep, data: bytes, timeout: float = 10.0) -> bytes:
    s = dep.connect()
    try:
        s.sendall(data)
        return read_all(s, timeout)
    finally:
        s.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def header(raw: bytes, name: bytes) -> bytes | None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def steering_entries(dep) -> int:
    return int(fe_steering(dep.lab, dep.vip, "entries"))


# -- routing ------------------------------------------------------------------------------------

def test_rules_choose_the_back_end(deployment):
    dep = deployment
    img = dep.request("/img/logo.jpg")
    assert (img.status, img.backend) == (200, "be1")
    assert img.body == dep.origins["be1"].expected("img/logo.jpg")
    page = dep.request("/index.html")
    assert (page.status, page.backend) == (200, "be2")
    assert page.body == dep.origins["be2"].expected("index.html")
    # rules are tried in order: the Host rule sends a non-image URI to be1
    by_host = dep.request("/index.html", headers={"Host": "img.example"})
    assert (by_host.status, by_host.backend) == (200, "be1")
    # the back ends hold the VIP without answering ARP for it: only the FE's MAC answers a who-has
    lab = dep.lab

    def who_has() -> set[str]:
        from scapy.all import ARP, Ether, conf, srp
        conf.verb = 0
        # scapy keeps one interface table per process, read in whichever namespace imported it first
        # (another test module may have done so in the root namespace): read it here, in the client's.
        conf.ifaces.reload()
        answered, _ = srp(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=dep.vip), iface=lab.ifname("client"),
                          timeout=1, multi=True)
        return {r.hwsrc.lower() for _, r in answered}
    assert lab.call("client", who_has) == {lab.mac("fe").lower()}


def test_no_rule_matches_gets_503_from_the_front_end(deployment):
    raw = raw_exchange(deployment, b"GET /private/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(raw) == 503
    assert header(raw, b"server") == b"tcpha-fe"
    # the connection was closed cleanly (FIN, not RST: read_all would have raised), and nothing
    # reached a back end
    assert header(raw, b"x-tcpha-backend") is None


def test_malformed_head_gets_400(deployment):
    raw = raw_exchange(deployment, b"GARBAGE WITHOUT VERSION\r\n\r\n")
    assert status_of(raw) == 400
    assert header(raw, b"server") == b"tcpha-fe"


def test_overlong_head_is_refused(deployment):
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    raw = raw_exchange(deployment, big)
    assert status_of(raw) == 400            # docs/rules.md: head longer than peekmax (as nginx and HAProxy)


def test_slow_head_gets_408_after_peektimeout(deployment):
    s = deployment.connect()
    try:
        t0 = time.monotonic()
        s.sendall(b"GET /index.html HTTP/1.1\r\nHost: a\r\n")      # never finished
        raw = read_all(s, timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert status_of(raw) == 408
    assert 1.5 <= elapsed < 6          # peektimeout = 2 s in the lab config


def test_head_split_over_packets_is_reassembled(deployment):
    s = deployment.connect()
    try:
        for part in (b"GET /img/lo", b"go.jpg HTTP/1.1\r\nHo", b"st: a\r\nConnection: close\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(0.05)
        raw = read_all(s)
    finally:
        s.close()
    assert status_of(raw) == 200
    assert header(raw, b"x-tcpha-backend") == b"be1"


@pytest.mark.parametrize("attempt", range(5))
def test_client_that_half_closed_after_its_request_gets_a_clean_answer(deployment, attempt):
    # TCP_REPAIR rebuilds ESTABLISHED connections only; a client that shut down writing after an
    # HTTP/1.0 request cannot be moved once its FIN is in: without a local node it gets 503. When the
    # FIN comes in after the move, the back end's socket is in CLOSE_WAIT before its relay starts, which
    # the BPF relay's SOCKHASH refuses: that relay copies in userspace then (it used to reset the client).
    s = deployment.connect()
    try:
        s.sendall(b"GET /1k.bin HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)          # the FIN follows at once: both are there when peeked
        t0 = time.monotonic()
        raw = read_all(s)
    finally:
        s.close()
    # Either the handoff won the race with the FIN (the FIN, dropped while frozen, is retransmitted
    # to the back end: a normal 200), or the FIN was there first (the front end's 503). Never a
    # hang or a reset.
    if status_of(raw) == 200:
        assert raw.split(b"\r\n\r\n", 1)[1] == deployment.origins["be2"].expected("1k.bin")
    else:
        assert status_of(raw) == 503 and header(raw, b"server") == b"tcpha-fe"
    assert time.monotonic() - t0 < 3


def test_keepalive_requests_stay_on_the_first_back_end(deployment):
    dep = deployment
    conn = http.client.HTTPConnection(dep.vip, VPORT, timeout=10)
    conn.sock = dep.connect()
    seen = []
    try:
        for path in ("/img/logo.jpg", "/index.html", "/1k.bin", "/img/logo.jpg"):
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200
            assert body == dep.origins["be1"].expected(path.lstrip("/"))
            seen.append(r.getheader("X-Tcpha-Backend"))
    finally:
        conn.close()
    assert seen == ["be1"] * 4


# -- direct server return ----------------------------------------------------------------------

def test_20mb_response_bypasses_the_front_end(deployment):
    dep = deployment
    lab = dep.lab
    fe_before = lab.counters("fe").tx_bytes
    client_before = lab.counters("client").rx_bytes
    s = dep.connect(timeout=30)
    digest = hashlib.sha256()
    got = 0
    try:
        s.sendall(b"GET /video/clip.mp4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        digest.update(rest)
        got = len(rest)
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            digest.update(b)
            got += len(b)
    finally:
        s.close()
    size = dep.files["video/clip.mp4"]
    assert got == size
    assert digest.hexdigest() == dep.origins["be2"].sha256("video/clip.mp4")
    client_rx = lab.counters("client").rx_bytes - client_before
    fe_tx = lab.counters("fe").tx_bytes - fe_before
    assert client_rx >= size
    # the front end forwarded the client's ACKs (to the back end) and its own few packets, no data
    assert fe_tx < 0.05 * client_rx, (fe_tx, client_rx)


# -- many handoffs -----------------------------------------------------------------------------

def _one_request(dep, path: str) -> tuple[int, str | None, int]:
    r = dep.request(path, timeout=20)
    return r.status, r.backend, len(r.body)


def test_1000_sequential_handoffs(deployment):
    dep = deployment
    errors = []
    for i in range(1000):
        path = "/img/logo.jpg" if i % 2 else "/1k.bin"
        try:
            status, backend, n = _one_request(dep, path)
        except OSError as e:
            errors.append(f"{i}: {e!r}")
            continue
        want = ("be1", 30_000) if i % 2 else ("be2", 1024)
        if (status, backend, n) != (200, *want):
            errors.append(f"{i}: {status} {backend} {n}")
    assert errors == []


def test_1000_concurrent_handoffs_50_at_a_time(deployment):
    dep = deployment
    paths = ["/img/logo.jpg" if i % 3 == 0 else "/100k.bin" for i in range(1000)]

    def run(path):
        try:
            status, backend, n = _one_request(dep, path)
        except OSError as e:
            return repr(e)
        want = ("be1", 30_000) if path.endswith("jpg") else ("be2", 100 * 1024)
        return None if (status, backend, n) == (200, *want) else f"{path}: {status} {backend} {n}"

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(run, paths))
    errors = [r for r in results if r]
    assert errors == []


def test_steering_table_stays_bounded_after_10000_connections(deployment):
    dep = deployment
    # 10,000 connections come and go (50 at a time); each back end reports its closed flows
    # (FlowClosed) and the front end removes their entries: the table does not grow with them.
    def run(i):
        try:
            return dep.request("/1k.bin" if i % 2 else "/img/logo.jpg", timeout=20).status
        except OSError as e:
            return repr(e)

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(run, range(10_000)))
    assert [r for r in results if r != 200] == []
    assert wait_until(lambda: steering_entries(dep) < 100, timeout=10), steering_entries(dep)
    # and once the last FlowClosed messages are in, nothing is left at all
    assert wait_until(lambda: steering_entries(dep) == 0, timeout=10), steering_entries(dep)


# -- uploads (python origin: it answers POST with the body's sha256) ---------------------------

@pytest.mark.parametrize("first_part", [0, 64 * 1024, 1 << 20])
def test_10mb_upload_partly_in_flight_at_handoff_arrives_exact(fresh, first_part):
    import json
    dep = fresh
    dep.origin_kind = "python"
    dep.start(fe={"rules": [f"{dep.lab.ip('be2')} ^/"]})
    body = hashlib.shake_256(b"upload").digest(10 * 1024 * 1024)
    head = (f"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    s = dep.connect(timeout=30)
    try:
        # The head and the first part of the body in one write: bytes already in the front end's
        # receive queue at handoff travel in the TCP state; the rest streams while the flow is
        # frozen and handed off (dropped and retransmitted) and after it (steered to the back end).
        s.sendall(head + body[:first_part])
        sender = threading.Thread(target=s.sendall, args=(body[first_part:],))
        sender.start()
        raw = read_all(s, timeout=30)
        sender.join()
    finally:
        s.close()
    assert status_of(raw) == 200, raw[:200]
    answer = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert answer["bytes"] == len(body)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert answer["backend"] == "be2"


# -- a client reusing its port ------------------------------------------------------------------

def _forwarded(dep) -> dict:
    return fe_steering(dep.lab, dep.vip, "forwarded")


def _from_port(dep, port: int) -> socket.socket:
    s = dep.lab.socket("client")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.settimeout(10)
    s.connect((dep.vip, VPORT))
    return s


def test_client_reusing_its_port_keeps_its_new_flow_when_the_old_flow_closed_report_comes(deployment):
    """A client's connection to be1 ends; it reuses its port at once for a keep-alive connection that goes
    to be2. be1's FlowClosed for the old connection comes FLOWCLOSED_DELAY (0.5 s) later, on the same
    4-tuple: it carries the old handoff's id, so the new flow's steering entry stays and the new
    connection's next request is answered (it was reset by the front end before ids existed)."""
    dep = deployment
    port = fixed_client_port(dep.lab)
    log_path = dep.lab.log_path("fe", "tcpha-fe")
    log_start = log_path.stat().st_size
    first = _from_port(dep, port)
    try:
        first.sendall(b"GET /img/logo.jpg HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        raw = read_all(first)
    finally:
        first.close()
    assert status_of(raw) == 200 and header(raw, b"X-Tcpha-Backend") == b"be1"
    conn = http.client.HTTPConnection(dep.vip, VPORT, timeout=10)
    conn.sock = _from_port(dep, port)
    try:
        conn.request("GET", "/index.html")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("X-Tcpha-Backend") == "be2"
        r.read()
        flow = next(f for f in _forwarded(dep) if f.client_port == port)

        def old_report_handled() -> bool:
            ignored = f"FlowClosed for {dep.lab.ip('client')}:{port} ignored" in \
                log_path.read_bytes()[log_start:].decode(errors="replace")
            return ignored or flow not in _forwarded(dep)
        wait_until(old_report_handled, timeout=10, what="be1's FlowClosed of the old connection handled")
        assert flow in _forwarded(dep), "the old connection's FlowClosed removed the new flow's entry"
        conn.request("GET", "/1k.bin")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("X-Tcpha-Backend") == "be2"
        assert r.read() == dep.origins["be2"].expected("1k.bin")
    finally:
        conn.close()
    # its own report removes it
    wait_until(lambda: flow not in _forwarded(dep), timeout=10, what="the new flow's entry removed at its end")
