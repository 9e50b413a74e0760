"""Settings that do what they say (issue 17 point 8, issue 10 point 4): the back end's `grace` and `metrics`,
a front-end `authkey` change reaching every control connection it makes, and each option's declared reload
mode being what a reload does."""

from __future__ import annotations

import os
import signal

import pytest

from tcpha.lab.demo import DEMO_FILES, write_key
from tcpha.lab.http import file_content
from tcpha.metrics import parse_exposition
from tests.production.conftest import wait_until

pytestmark = pytest.mark.netns

BE_METRICS_PORT = 9119
BIG = "video/clip.mp4"               # 20 MiB, served by be2 (rule '.*')


def _log(prod, host: str, name: str) -> str:
    return prod.lab.log_path(host, name).read_text(errors="replace")


def _read_until_eof(sock) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _backend_status(prod, name: str) -> str | None:
    for b in prod.ctl_json("status")["backends"]:
        if b["name"] == name:
            return b["status"]
    return None


# -- back end: grace ------------------------------------------------------------------------------

def test_be_sigterm_lets_a_relayed_download_finish_within_grace(prod):
    prod.start(be={"grace": 60})
    be2 = prod.dep.be_procs["be2"]
    sock = prod.dep.connect(timeout=30)
    try:
        sock.sendall(f"GET /{BIG} HTTP/1.1\r\nHost: tcpha\r\nConnection: close\r\n\r\n".encode())
        first = sock.recv(1 << 16)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        be2.send_signal(signal.SIGTERM)        # the download is in flight: most of 20 MiB still to come
        assert wait_until(lambda: "waiting up to 60 s for 1 relayed connections" in _log(prod, "be2", "tcpha-be"),
                          15)
        assert be2.poll() is None
        rest = _read_until_eof(sock)
    finally:
        sock.close()
    response = first + rest
    head, _, body = response.partition(b"\r\n\r\n")
    assert body == file_content(BIG, DEMO_FILES[BIG]), (len(body), DEMO_FILES[BIG])
    assert wait_until(lambda: be2.poll() is not None, 30)
    assert "every relayed connection has ended" in _log(prod, "be2", "tcpha-be")


def test_be_grace_bounds_the_wait_for_a_connection_that_does_not_end(prod):
    prod.start(be={"grace": 1})
    be2 = prod.dep.be_procs["be2"]
    sock = prod.dep.connect(timeout=30)
    try:
        sock.sendall(b"GET /index.html HTTP/1.1\r\nHost: tcpha\r\n\r\n")      # keep-alive: stays open
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
        be2.send_signal(signal.SIGTERM)
        assert wait_until(lambda: be2.poll() is not None, 30)
    finally:
        sock.close()
    text = _log(prod, "be2", "tcpha-be")
    assert "waiting up to 1 s for 1 relayed connections" in text
    assert "1 relayed connections still open after grace (1 s); closed" in text


# -- back end: metrics ----------------------------------------------------------------------------

def test_be_metrics_endpoint_counts_handoffs(prod):
    prod.start(be={"metrics": str(BE_METRICS_PORT)})
    for _ in range(3):
        assert prod.dep.request("/index.html").backend == "be2"

    def scrape() -> dict:
        r = prod.lab.run("be2", ["curl", "-sf", f"http://127.0.0.1:{BE_METRICS_PORT}/metrics"],
                         capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        return {name: v for (name, labels), v in parse_exposition(r.stdout).items()}

    m = scrape()
    assert m["tcpha_be_handoffs_total"] >= 3
    assert m["tcpha_be_handoffs_refused_total"] == 0
    assert m["tcpha_be_control_connections"] >= 1
    assert "tcpha_be_relayed_connections" in m and "tcpha_be_registered" not in m


# -- front end: authkey on SIGHUP -----------------------------------------------------------------

def test_fe_authkey_change_reaches_the_workers_links_and_the_health_prober(prod):
    """The key file rewritten, SIGHUP to the front end, then be2 restarted with the new key: the workers'
    control links and the health prober reconnect to it with the new key (be1, not restarted, keeps its
    established, already authenticated connections)."""
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"dtcinterval": 0.5, "healthtimeout": 0.4})
    assert prod.dep.request("/index.html").backend == "be2"
    write_key(prod.dep.key)                                     # same path, new key
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: any("reloaded" in line and "authkey" in line
                                  for line in prod.fe_log().splitlines()), 10), prod.fe_log()[-2000:]
    prod.lab.stop(prod.dep.be_procs.pop("be2"), grace=10)
    assert wait_until(lambda: _backend_status(prod, be2) == "down", 15)
    prod.start_backend("be2")                                   # reads the new key
    assert wait_until(lambda: _backend_status(prod, be2) == "up", 30)          # the prober's new connection
    assert wait_until(lambda: prod.dep.request("/index.html").backend == "be2", 30)   # the workers' links
    for _ in range(5):
        assert prod.dep.request("/index.html").backend == "be2"
    assert prod.dep.request("/img/logo.jpg").backend == "be1"
    assert "bad MAC" not in _log(prod, "be2", "tcpha-be")
