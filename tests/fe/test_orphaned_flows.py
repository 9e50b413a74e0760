"""`conn` keeps the handed-off flows of a worker that died (kill -9): the kernel still steers them, the
control plane lists them from the steering map as `forwarded (orphaned)` until they end, and their
FlowClosed cleanup is taken over by the other workers / the arbiter."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tcpha.fe.orphans import ORPHANED, OrphanTable
from tcpha.steering import FlowKey
from tests.deployment import fe_workers
from tests.support import wait_until

pytestmark = pytest.mark.netns


def test_orphan_table_rows_hints_and_macs():
    t = OrphanTable()
    a, b = FlowKey("10.0.0.2", 40000, "10.0.0.100", 80), FlowKey("10.0.0.2", 40001, "10.0.0.100", 80)
    live = [{"client": "10.0.0.2:40000", "vport": 80, "backend": "be1:666", "rule": "uri:.*",
             "state": "handed-off", "age": 2.0}]
    t.learn(live, {"02:00:00:00:00:0B": "be2:666"}, now=100.0)
    kernel = {a: "02:00:00:00:00:0a", b: "02:00:00:00:00:0b"}
    # a is claimed by its live worker; b is nobody's: its back end from the MAC, its age unknown
    assert t.rows(live, kernel, now=101.0) == [
        {"client": "10.0.0.2:40001", "vport": 80, "backend": "be2:666", "rule": "-", "state": ORPHANED,
         "age": None, "bytes_in": None, "bytes_out": None}]
    # a's worker died: a is orphaned, with what the worker last said (back end, rule, age)
    [row_b, row_a] = sorted(t.rows([], kernel, now=103.0), key=lambda r: r["client"], reverse=True)
    assert (row_a["client"], row_a["backend"], row_a["rule"], row_a["age"]) == ("10.0.0.2:40000", "be1:666",
                                                                                 "uri:.*", 5.0)
    # flows gone from the kernel are gone from the table and their hints forgotten
    assert t.rows([], {}, now=104.0) == [] and t.hints == {}


def test_killed_workers_flows_stay_in_conn_until_they_end(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"startservers": 2, "minspareservers": 1, "maxspareservers": 3, "grace": 5})
    assert prod.dep.request("/index.html").backend == "be2"
    expected = prod.dep.origins["be2"].expected("video/clip.mp4")
    fast = threading.Event()
    result: dict[str, object] = {}

    def download() -> None:
        try:
            s = prod.dep.connect(timeout=30)
            result["client"] = "%s:%d" % s.getsockname()
            s.sendall(b"GET /video/clip.mp4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            s.settimeout(60)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                if not fast.is_set():
                    time.sleep(0.02)          # slow until the test has seen what it wants
            s.close()
            result["body"] = b"".join(chunks)
        except Exception as e:
            result["body"] = e

    t = threading.Thread(target=download)
    t.start()
    try:
        assert wait_until(lambda: "client" in result, 10)
        client = result["client"]

        def row():
            rows = [r for r in prod.ctl_json("conn") if r["client"] == client]
            return rows[0] if rows else None

        before = wait_until(lambda: (r := row()) and r["state"] == "handed-off" and r, 10)
        assert before and before["backend"] == be2, before
        victims = fe_workers(prod)
        assert len(victims) >= 2
        for pid in victims:                   # the flow's worker is one of them, whichever it is
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not set(victims) & set(fe_workers(prod)) and len(fe_workers(prod)) >= 1, 10)
        assert wait_until(lambda: sorted(prod.ctl_json("status")["workers"]) == fe_workers(prod), 10)
        # the download still runs (the kernel steers it) and the table still shows it
        after = wait_until(lambda: (r := row()) and r["state"] == ORPHANED and r, 10)
        assert after, prod.ctl_json("conn")
        assert after["backend"] == be2 and after["rule"] == before["rule"]
        assert after["age"] is not None and after["age"] >= before["age"]
        assert "body" not in result, "the download ended before the test could look"
        plain = prod.ctl("get", "conn")
        assert plain.returncode == 0 and ORPHANED in plain.stdout and client in plain.stdout
    finally:
        fast.set()
        t.join(60)
    body = result["body"]
    assert not isinstance(body, Exception), body
    assert body.split(b"\r\n\r\n", 1)[1] == expected
    # it ended: FlowClosed reached a live worker or the arbiter, the entry and the row are gone
    assert wait_until(lambda: row() is None, 10), row()
    assert prod.dep.request("/index.html").status == 200


@pytest.mark.parametrize("thread", [False, True])
def test_conn_answer_comes_after_closed_flows_left_the_steering_table(monkeypatch, thread):
    """A flow whose FlowClosed came has left the worker's ledger at once, while its steering entry goes
    with the next unforward batch (UNFORWARD_DELAY later). The arbiter reads the kernel's map after the
    workers' `conn` answers: a worker answering before that batch made the flow an orphan row."""
    import asyncio
    import socket
    from types import SimpleNamespace

    from tcpha.fe import worker as worker_mod
    from tcpha.fe.agent import WorkerAgent
    from tcpha.fe.ledger import ConnectionLedger

    monkeypatch.setattr(worker_mod, "INLINE_STEERING", not thread)
    table: set[FlowKey] = set()

    class Steering:
        def unforward_closed(self, closed):
            time.sleep(0.05)                      # a netlink round trip, slow enough to be seen
            for flow, _ in closed:
                table.discard(flow)
            return []

    loop = asyncio.new_event_loop()
    a, b = socket.socketpair()
    try:
        w = SimpleNamespace(loop=loop, steering=Steering(), ledger=ConnectionLedger([]), backends={},
                            stats=SimpleNamespace(flows_closed_stale=0))
        w.batch = worker_mod.SteeringBatch(w)
        flow = FlowKey("10.0.0.9", 40000, "10.0.0.1", 80)
        table.add(flow)
        w.batch.unforward(flow, 7)
        answer = WorkerAgent(w, a).handle({"op": "conn"})
        assert answer["rows"] == []
        assert flow not in table, "the conn answer came while the closed flow was still steered"
        w.batch.close()
    finally:
        loop.close()
        a.close()
        b.close()
