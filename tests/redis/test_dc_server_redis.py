"""dc_server with -backend redis:// and redis-cluster://, driven by dc_test and the client API."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tcpha.distcache.client import PERSISTENT, DistcacheClient
from tests.support import wait_until



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DcServer:
    def __init__(self, backend: str, tmp_path, name: str = "dc", extra: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.address = f"IP:127.0.0.1:{self.port}"
        self.log = tmp_path / f"{name}.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(["dc_server", "-listen", self.address, "-backend", backend, *extra],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert self.proc.poll() is None, self.output()
                assert time.monotonic() < deadline, "dc_server did not start listening"
                time.sleep(0.02)

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def dc_server_factory(tmp_path):
    started: list[DcServer] = []

    def start(backend: str, name: str = "dc", extra: tuple[str, ...] = ()) -> DcServer:
        server = DcServer(backend, tmp_path, name, extra)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


def _dc_test(address: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dc_test", "-connect", address, "-persistent", "-sessions", "100", "-ops", "4000",
                           *extra], capture_output=True, text=True, timeout=120)


def test_dc_test_through_dc_server_on_standalone_redis(redis_node, dc_server_factory):
    server = dc_server_factory(f"redis://{redis_node.address}")
    result = _dc_test(server.address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Info, all tests complete" in result.stderr
    assert "standalone" in server.output()        # the one-line report of what was found


def test_dc_test_through_dc_server_on_cluster(redis_cluster, dc_server_factory):
    server = dc_server_factory(redis_cluster.url)
    result = _dc_test(server.address)
    assert result.returncode == 0, result.stdout + result.stderr
    # On a busy machine the cluster may answer late: a "not answering yet" warning, then the report.
    report = wait_until(lambda: [l for l in server.output().splitlines() if "Info, backend" in l], 30,
                        what="dc_server's report of the cluster")
    assert len(report) == 1 and "3 primaries, 3 replicas" in report[0], server.output()


def test_a_backend_that_answers_late_is_reported_when_it_does(tmp_path, dc_server_factory):
    """dc_server started before its Redis: one warning, then the report once Redis answers (an operator
    starting both at once, or a backend slow on a busy machine, still learns what the backend is)."""
    from tcpha.distcache.redis_cluster import RedisNode
    from tests.redis.conftest import free_port_block
    node = RedisNode("127.0.0.1", free_port_block(1), tmp_path / "redis", cluster=False)
    server = dc_server_factory(f"redis://{node.address}")
    try:
        wait_until(lambda: "not answering yet" in server.output(), 30, what="the backend's warning")
        assert "Info, backend" not in server.output()
        node.start()
        report = wait_until(lambda: [l for l in server.output().splitlines() if "Info, backend" in l], 30,
                            what="dc_server's report once Redis answers")
        assert len(report) == 1 and "standalone" in report[0], server.output()
        assert server.output().count("not answering yet") == 1, server.output()
    finally:
        node.kill()


def test_two_dc_servers_share_one_cluster(redis_cluster, dc_server_factory):
    a = dc_server_factory(redis_cluster.url, "a")
    b = dc_server_factory(redis_cluster.url, "b")
    ids = [os.urandom(20) for _ in range(40)]
    with DistcacheClient(a.address, PERSISTENT) as ca, DistcacheClient(b.address, PERSISTENT) as cb:
        for sid in ids:
            assert ca.add(sid, sid[::-1] * 10, 60_000)
        assert all(cb.get(sid) == sid[::-1] * 10 for sid in ids)
        # ADD never overwrites, whichever server it goes through.
        assert cb.add(ids[0], b"other", 60_000) is False
        assert cb.remove(ids[1]) and not ca.has(ids[1])
    # Several dc_test runs at once through both servers.
    procs = [subprocess.Popen(["dc_test", "-connect", s.address, "-persistent", "-sessions", "50", "-ops", "2000"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in (a, b, a, b)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs


def test_redis_stopped_and_restarted_under_load(redis_node, dc_server_factory):
    server = dc_server_factory(f"redis://{redis_node.address}?socket_timeout=0.2")
    client = DistcacheClient(server.address, PERSISTENT, timeout=2.0)
    keep = os.urandom(16)
    assert client.add(keep, b"kept", 300_000)
    slowest = 0.0
    answered_during_outage = 0
    redis_node.kill()
    try:
        for i in range(200):
            t0 = time.monotonic()
            assert client.get(keep) is None                # a miss, not a hang, not an error
            assert client.add(os.urandom(8), b"x", 1000) is False
            slowest = max(slowest, time.monotonic() - t0)
            answered_during_outage += 1
    finally:
        redis_node.start()
    # Recovered by itself: a new session goes in and comes back. (The one added just before the kill may be
    # gone: Redis fsyncs its AOF once a second, so the last second may be lost.)
    fresh = os.urandom(16)
    deadline = time.monotonic() + 15
    while not (client.add(fresh, b"after", 300_000) and client.get(fresh) == b"after"):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    client.close()
    assert answered_during_outage == 200
    # Bounded by the backend's socket timeout rather than hanging (not a speed limit: 5 s is generous).
    assert slowest < 5.0, f"one request during the outage took {slowest:.2f} s"
    out = server.output()
    assert out.count("unreachable") == 1 and out.count("reachable again") == 1, out


def test_pipelined_requests_keep_their_order_over_redis(redis_cluster, dc_server_factory):
    """dc_server starts a connection's waiting requests together on the Redis store; their effects and
    replies must still come in request order (ADD, GET, REMOVE, GET of one id in one write)."""
    from tcpha.distcache.codec import Message, MessageReader, Op, encode_add_payload, encode_message

    server = dc_server_factory(redis_cluster.url)
    requests = []
    expected = []
    for n in range(50):
        sid = b"pipe-%d-" % n + os.urandom(6)
        data = os.urandom(100)
        requests += [Message(False, 4 * n + 1, Op.ADD, encode_add_payload(sid, data, 60_000)),
                     Message(False, 4 * n + 2, Op.GET, sid),
                     Message(False, 4 * n + 3, Op.REMOVE, sid),
                     Message(False, 4 * n + 4, Op.GET, sid)]
        expected += [b"\x00", data, b"\x00", b"\x01"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"".join(encode_message(m) for m in requests))
        reader = MessageReader(expect_response=True)
        replies = []
        while len(replies) < len(requests):
            chunk = s.recv(65536)
            assert chunk, "dc_server closed the connection"
            replies += reader.feed(chunk)
    assert [r.uid for r in replies] == [m.uid for m in requests]
    assert [r.payload for r in replies] == expected


def test_redis_backend_after_dropping_privileges(redis_node, dc_server_factory):
    """-user switches after listening; the Redis code must not need files the new user cannot read
    (here the interpreter lives under /root: a lazy import after the switch would fail)."""
    server = dc_server_factory(f"redis://{redis_node.address}", extra=("-user", "nobody"))
    result = _dc_test(server.address)
    assert result.returncode == 0, result.stdout + result.stderr + server.output()
