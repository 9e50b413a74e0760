"""tcpha.fe.status without daemons: the history's rates, the document, write-mode authentication, routes."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from tcpha.fe.status import (AdminAuth, AdminRefused, HttpRequest, Sample, StatusHistory, StatusHttpServer,
                             admin_token, build_status, printable_head, sample_of, sign)
from tcpha.metrics import WorkerMetrics

KEY = b"k" * 64


def test_sample_counts_placed_connections_and_refusals_per_back_end_and_rule():
    m = WorkerMetrics()
    for _ in range(3):
        m.handoff("a:666", "uri:jpg$", "handed_off")
    m.handoff("a:666", "uri:jpg$", "refused")
    m.handoff("unix:/s", "uri:.*", "passed")
    m.handoff("none", "-", "no_match")
    s = sample_of(m, 10.0)
    assert s.handoffs == {"a:666": 3, "unix:/s": 1}
    assert s.refused == {"a:666": 1}
    assert s.rules == {"uri:jpg$": 3, "uri:.*": 1}
    assert s.total == 4


def test_rates_and_series_come_from_consecutive_samples():
    h = StatusHistory(seconds=5)
    assert h.rates() == ({}, {}, 0.0) and h.series() == []
    for i in range(8):                                   # 10 handoffs a second on a, 2 refusals on b
        h.add(Sample(100.0 + i, {"a": 10 * i}, {"b": 2 * i}, {}))
    per_be, refused, total = h.rates()
    assert per_be == {"a": 10.0} and refused == {"b": 2.0} and total == 10.0
    assert len(h.samples) == 6                           # the ring keeps `seconds` intervals
    assert h.series() == [[100.0 + i, 10.0] for i in range(3, 8)]


def test_a_counter_going_down_never_gives_a_negative_rate():
    h = StatusHistory()
    h.add(Sample(1.0, {"a": 50}, {}, {}))
    h.add(Sample(2.0, {"a": 20}, {}, {}))
    assert h.rates()[0] == {"a": 0.0} and h.series() == [[2.0, 0.0]]


def test_document_joins_health_workers_rules_and_history():
    h = StatusHistory()
    h.add(Sample(99.0, {"a:666": 0}, {}, {"uri:jpg$": 0}))
    h.add(Sample(100.0, {"a:666": 5}, {"a:666": 1}, {"uri:jpg$": 5}))
    config = SimpleNamespace(vaddr="10.0.0.100", ports=[80, 443], raddr="10.0.0.10", statsadmin=False)
    health = [{"name": "a:666", "status": "down", "up": False, "weight": 1, "drain": False, "dynamic": False,
               "checks": 4, "failures": 1, "last_error": "connect 10.0.0.11:8080: refused", "since": 90.0,
               "last_check": 99.5, "rtt_ms": 0.2}]
    workers = [{"pid": 12, "accepted": 7, "dispatching": 1, "flows": 2, "flows_by_backend": {"a:666": 2},
                "answers": [{"time": 98.0, "status": 503, "client": "c:1", "why": "w", "head": "GET /"}]},
               {"pid": 11, "accepted": 3, "dispatching": 0, "flows": 1, "flows_by_backend": {"a:666": 1},
                "answers": [{"time": 99.0, "status": 400, "client": "c:2", "why": "w", "head": "<b>"}]}]
    doc = build_status(pid=1, started=0.0, config=config, health=health, workers=workers, history=h,
                       rules=[{"target": "a:666", "field": "uri", "pattern": "jpg$"}], steering_entries=3,
                       dtcinterval=2.0, dbglevel=3, now=100.0)
    json.dumps(doc)                                                   # JSON as it is
    assert doc["workers"] == [11, 12]
    assert [w["accepted"] for w in doc["worker_stats"]] == [3, 7]
    be = doc["backends"][0]
    assert (be["since_seconds"], be["last_check_ago"], be["flows"], be["handoffs"]) == (10.0, 0.5, 3, 5)
    assert (be["handoffs_per_s"], be["refused_per_s"]) == (5.0, 1.0)
    assert doc["rules"] == [{"target": "a:666", "field": "uri", "pattern": "jpg$", "text": "uri:jpg$", "hits": 5}]
    assert [a["status"] for a in doc["answers"]] == [503, 400]       # oldest first, across workers
    assert doc["history"] == [[100.0, 5.0]] and doc["handoffs_per_s"] == 5.0
    assert doc["steering_entries"] == 3 and doc["statsadmin"] is False


def _signed(auth: AdminAuth, body: bytes, token: str | None = None) -> str:
    nonce = auth.nonce()
    return f"{nonce} {sign(token or admin_token(KEY), nonce, 'POST', '/admin', body)}"


def test_admin_auth_accepts_a_signed_request_once():
    auth = AdminAuth(lambda: KEY)
    body = b'{"backend": "a:666", "action": "drain"}'
    header = _signed(auth, body)
    auth.check(header, "POST", "/admin", body)
    with pytest.raises(AdminRefused) as e:
        auth.check(header, "POST", "/admin", body)                   # replayed
    assert e.value.status == 403


@pytest.mark.parametrize("case", ["none", "malformed", "wrong token", "other body", "unknown nonce", "expired"])
def test_admin_auth_refusals(case):
    auth = AdminAuth(lambda: KEY)
    body = b'{"backend": "a:666", "action": "drain"}'
    header = {"none": None, "malformed": "x", "wrong token": _signed(auth, body, token="0" * 64),
              "other body": _signed(auth, b'{"backend": "b:666", "action": "drain"}'),
              "unknown nonce": f"{'1' * 32} {sign(admin_token(KEY), '1' * 32, 'POST', '/admin', body)}",
              "expired": None}[case]
    now = None
    if case == "expired":
        header = _signed(auth, body)
        now = 10 ** 9
    with pytest.raises(AdminRefused) as e:
        auth.check(header, "POST", "/admin", body, now=now)
    assert e.value.status == (401 if case == "none" else 403)


def test_write_mode_off_refuses_even_a_signed_request():
    key: list = [KEY]
    auth = AdminAuth(lambda: key[0])
    body = b"{}"
    header = _signed(auth, body)
    key[0] = None                                                    # statsadmin turned off by a reload
    with pytest.raises(AdminRefused) as e:
        auth.check(header, "POST", "/admin", body)
    assert e.value.status == 403


def test_the_token_is_not_the_key():
    assert admin_token(KEY) != KEY.hex() and len(admin_token(KEY)) == 64
    assert admin_token(KEY) != admin_token(b"j" * 64)


def test_printable_head_keeps_text_and_masks_control_bytes():
    assert printable_head(b"GET / HTTP/1.1\r\nHost: <x>\r\n\x00\x16\xff") == "GET / HTTP/1.1\r\nHost: <x>\r\n..."
    assert len(printable_head(b"a" * 2000)) == 512


def _server(admin=None) -> StatusHttpServer:
    async def metrics() -> str:
        return "m 1\n"

    async def status() -> dict:
        return {"ok": 1}
    return StatusHttpServer(("127.0.0.1", 0), metrics=metrics, status=status, admin=admin or (lambda *a: None),
                            key=lambda: KEY if admin else None)


def _get(server: StatusHttpServer, path: str, method: str = "GET", body: bytes = b"", headers=None):
    return asyncio.run(server.respond(HttpRequest(method, path, headers or {}, body, "1.2.3.4:5")))


def test_routes():
    s = _server()
    assert _get(s, "/metrics")[2] == b"m 1\n"
    assert json.loads(_get(s, "/status.json")[2]) == {"ok": 1}
    for path in ("/", "/status"):
        status, ctype, body = _get(s, path)
        assert status == "200 OK" and ctype.startswith("text/html") and b"/static/status.js" in body
    assert _get(s, "/static/status.js")[1].startswith("text/javascript")
    assert _get(s, "/static/../status.py")[0].startswith("404")
    assert _get(s, "/metrics", method="POST")[0].startswith("405")
    assert _get(s, "/admin", method="POST", body=b"{}")[0] == "403 Forbidden"      # write mode off
    assert _get(s, "/admin/nonce")[0] == "403 Forbidden"


def test_admin_route_applies_a_signed_write_and_refuses_the_rest():
    done = []
    s = _server(admin=lambda backend, action, peer: done.append((backend, action, peer)))
    body = json.dumps({"backend": "a:666", "action": "drain"}).encode()
    assert _get(s, "/admin", method="POST", body=body)[0] == "401 Unauthorized"
    nonce = json.loads(_get(s, "/admin/nonce")[2])["nonce"]
    header = f"{nonce} {sign(admin_token(KEY), nonce, 'POST', '/admin', body)}"
    assert _get(s, "/admin", "POST", body, {"x-tcpha-auth": header})[0] == "200 OK"
    assert done == [("a:666", "drain", "1.2.3.4:5")]
    nonce = json.loads(_get(s, "/admin/nonce")[2])["nonce"]
    bad = json.dumps({"backend": "a:666", "action": "rm -rf"}).encode()
    header = f"{nonce} {sign(admin_token(KEY), nonce, 'POST', '/admin', bad)}"
    assert _get(s, "/admin", "POST", bad, {"x-tcpha-auth": header})[0] == "400 Bad Request"
    assert len(done) == 1
