"""Blocking and asyncio distcache clients: results, flag semantics, fork check, retry, timeouts."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import fake_servers, free_port, procs, sockdir, wait_until  # noqa: E402,F401

from tcpha.distcache.aio import AsyncDistcacheClient  # noqa: E402
from tcpha.distcache.client import (PERSISTENT, PERSISTENT_LATE, PERSISTENT_PIDCHECK,  # noqa: E402
                                    PERSISTENT_RETRY, DistcacheClient, DistcacheError)
from tcpha.distcache.codec import Op  # noqa: E402


# --- against the real dc_server -------------------------------------------------------------

@pytest.mark.parametrize("flags", [0, PERSISTENT, PERSISTENT | PERSISTENT_LATE | PERSISTENT_RETRY])
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_round_trip_against_dc_server(procs, sockdir, flags, kind):
    addr = f"UNIX:{sockdir}/s" if kind == "unix" else f"IP:127.0.0.1:{free_port()}"
    procs.server(addr)
    c = DistcacheClient(addr, flags, timeout=5)
    big = os.urandom(5000)  # three frames each way
    assert c.has(b"session-1") is False
    assert c.get(b"session-1") is None
    assert c.add(b"session-1", b"DATA-one", 60000) is True
    assert c.add(b"session-1", b"DATA-two", 60000) is False        # [101]: the old entry stays
    assert c.get(b"session-1") == b"DATA-one"
    assert c.has(b"session-1") is True
    assert c.add(b"session-big", big, 60000) is True
    assert c.get(b"session-big") == big
    assert c.remove(b"session-1") is True
    assert c.remove(b"session-1") is False
    assert c.get(b"session-1") is None
    assert c.add(b"x" * 65, b"data", 60000) is False                # [103] id range
    assert c.add(b"session-2", b"data", 604800001) is False         # [102] timeout range
    c.close()


def test_no_server_raises(sockdir):
    c = DistcacheClient(f"UNIX:{sockdir}/none", 0, timeout=1)
    with pytest.raises(DistcacheError):
        c.get(b"abc")
    with pytest.raises(DistcacheError):
        DistcacheClient(f"UNIX:{sockdir}/none", PERSISTENT, timeout=1)   # connects at creation
    DistcacheClient(f"UNIX:{sockdir}/none", PERSISTENT | PERSISTENT_LATE, timeout=1)  # does not
    with pytest.raises(DistcacheError):
        DistcacheClient("IP:9001")          # listen-only address
    with pytest.raises(DistcacheError):
        DistcacheClient("bogus")


# --- flag semantics, observed on a scripted server --------------------------------------------

def test_no_flags_is_one_connection_per_operation(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f")
    c = DistcacheClient(srv.address, 0, timeout=2)
    assert srv.connections == 0
    c.add(b"abcdef", b"data!", 1000)
    c.get(b"abcdef")
    c.has(b"abcdef")
    wait_until(lambda: srv.connections == 3, 5, "three connections")


def test_persistent_connects_at_creation_and_reuses(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f")
    c = DistcacheClient(srv.address, PERSISTENT, timeout=2)
    wait_until(lambda: srv.connections == 1, 5, "the constructor's connection")
    for i in range(5):
        assert c.add(b"id-%d" % i, b"data!", 1000)
    assert srv.connections == 1
    c.close()


def test_persistent_late_connects_on_first_use(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f")
    c = DistcacheClient(srv.address, PERSISTENT | PERSISTENT_LATE, timeout=2)
    time.sleep(0.05)
    assert srv.connections == 0
    assert c.has(b"abcdef") is False
    assert srv.connections == 1
    assert c.has(b"abcdef") is False
    assert srv.connections == 1


def _child_op(client: DistcacheClient) -> int:
    """fork(); the child does one operation and reports through its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = 0 if client.add(b"child-session", b"child data", 10000) else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), pid


def test_pidcheck_reconnects_after_fork(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f")
    c = DistcacheClient(srv.address, PERSISTENT | PERSISTENT_PIDCHECK, timeout=2)
    assert c.add(b"parent-session", b"parent data", 10000)
    code, child = _child_op(c)
    assert code == 0
    # The child made its own connection, from its own pid; the parent's is still the one.
    assert srv.peer_pids == [os.getpid(), child]
    assert c.get(b"child-session") == b"child data"
    assert c.get(b"parent-session") == b"parent data"
    assert srv.peer_pids == [os.getpid(), child]


def test_without_pidcheck_child_shares_the_parents_connection(fake_servers, sockdir):
    # The control for the test above: without the flag no new connection is made.
    srv = fake_servers(sockdir / "f")
    c = DistcacheClient(srv.address, PERSISTENT, timeout=2)
    assert c.add(b"parent-session", b"parent data", 10000)
    code, _ = _child_op(c)
    assert code == 0
    assert srv.peer_pids == [os.getpid()]


def _close_first_request(conn_index, msg):
    # The first connection dies on its first request (no answer); later ones behave.
    return "close" if conn_index == 0 else (b"\x00" if msg.op != Op.GET else b"session-data")


def test_retry_reconnects_and_resends_once(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f", policy=_close_first_request)
    c = DistcacheClient(srv.address, PERSISTENT | PERSISTENT_RETRY, timeout=2)
    assert c.get(b"abcdef") == b"session-data"
    assert srv.connections == 2
    assert [m.op for m in srv.requests] == [Op.GET, Op.GET]


def test_without_retry_a_network_error_fails(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f", policy=_close_first_request)
    c = DistcacheClient(srv.address, PERSISTENT, timeout=2)
    with pytest.raises(DistcacheError):
        c.get(b"abcdef")
    # Ours reconnects on the next operation (the C client would stay broken).
    assert c.get(b"abcdef") == b"session-data"


def test_retry_is_only_once(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f", policy=lambda i, m: "close")
    c = DistcacheClient(srv.address, PERSISTENT | PERSISTENT_RETRY, timeout=2)
    with pytest.raises(DistcacheError):
        c.has(b"abcdef")
    assert srv.connections == 2


@pytest.mark.parametrize("flags", [0, PERSISTENT, PERSISTENT | PERSISTENT_RETRY])
def test_timeout_on_a_silent_server(fake_servers, sockdir, flags):
    srv = fake_servers(sockdir / "f", policy=lambda i, m: None)
    c = DistcacheClient(srv.address, flags, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DistcacheError, match="within 0.3"):
        c.get(b"abcdef")
    assert time.monotonic() - t0 < 3
    assert len(srv.requests) == 1          # a timeout is not retried


@pytest.mark.parametrize("answer, op, expect", [
    (b"\x02", "get", None),                  # the C client: GET reply < 5 bytes is a miss
    (b"\x01", "get", None),
    (b"abcd", "get", None),
    (b"abcde", "get", b"abcde"),
    (b"\x65", "add", False),                 # 101
    (b"\x64", "add", False),                 # 100
    (b"\x00", "add", True),
    (b"\x02", "add", DistcacheError),
    (b"", "add", DistcacheError),            # dc_client without a server
    (b"", "get", DistcacheError),
    (b"\x02", "has", DistcacheError),
    (b"\x07", "has", DistcacheError),
    (b"xy", "has", False),                   # not one byte: the C client says "absent"
    (b"\x01", "remove", False),
    (b"\x02", "remove", DistcacheError),
])
def test_reply_decisions(fake_servers, sockdir, answer, op, expect):
    srv = fake_servers(sockdir / "f", policy=lambda i, m: answer)
    c = DistcacheClient(srv.address, PERSISTENT, timeout=2)
    call = {"get": lambda: c.get(b"abcdef"), "has": lambda: c.has(b"abcdef"),
            "remove": lambda: c.remove(b"abcdef"), "add": lambda: c.add(b"abcdef", b"data", 1000)}[op]
    if expect is DistcacheError:
        with pytest.raises(DistcacheError):
            call()
    else:
        assert call() == expect


def test_mismatched_uid_is_an_error(fake_servers, sockdir):
    from tcpha.distcache.codec import Message, encode_message

    srv = fake_servers(sockdir / "f", policy=lambda i, m: None)
    c = DistcacheClient(srv.address, PERSISTENT, timeout=2)
    # Answer with a wrong uid by hand.
    orig = srv._serve

    def policy(i, m):
        srv.conns[i].sendall(encode_message(Message(True, m.uid + 1, m.op, b"\x00")))
        return None
    srv.policy = policy
    with pytest.raises(DistcacheError, match="does not match"):
        c.has(b"abcdef")
    del orig


# --- asyncio client ------------------------------------------------------------------------

def test_aio_pipelined_against_dc_server(procs, sockdir):
    addr = f"UNIX:{sockdir}/s"
    procs.server(addr, "-sessions", "2000")

    async def main():
        c = await AsyncDistcacheClient.connect(addr, timeout=5)
        ids = [b"id-%04d" % i for i in range(1000)]
        datas = [os.urandom(10 + i * 3) for i in range(1000)]
        assert all(await asyncio.gather(*(c.add(i, d, 60000) for i, d in zip(ids, datas))))
        assert await asyncio.gather(*(c.get(i) for i in ids)) == datas
        assert await asyncio.gather(*(c.has(i) for i in ids[:10])) == [True] * 10
        assert await c.add(ids[0], b"again", 60000) is False
        assert await c.remove(ids[0]) is True
        assert await c.get(ids[0]) is None
        await c.close()
    asyncio.run(main())


def test_aio_matches_answers_by_uid(fake_servers, sockdir):
    srv = fake_servers(sockdir / "f", reorder=True)

    async def main():
        c = await AsyncDistcacheClient.connect(srv.address, timeout=5)
        ids = [b"session-%03d" % i for i in range(200)]
        assert all(await asyncio.gather(*(c.add(i, i + b"-data", 60000) for i in ids)))
        got = await asyncio.gather(*(c.get(i) for i in ids))
        assert got == [i + b"-data" for i in ids]
        await c.close()
    asyncio.run(main())


def test_aio_timeout_and_connection_loss(fake_servers, sockdir):
    silent = fake_servers(sockdir / "silent", policy=lambda i, m: None)

    async def main():
        c = await AsyncDistcacheClient.connect(silent.address, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(DistcacheError, match="within"):
            await c.get(b"abcdef")
        assert time.monotonic() - t0 < 3
        pending = [c.has(b"abcdef-%d" % i) for i in range(3)]
        await asyncio.sleep(0.05)
        silent.close_connections()
        for f in pending:
            with pytest.raises(DistcacheError):
                await f
        with pytest.raises(DistcacheError):
            await c.get(b"abcdef")
        await c.close()
    asyncio.run(main())


def test_aio_connect_failure(sockdir):
    async def main():
        with pytest.raises(DistcacheError):
            await AsyncDistcacheClient.connect(f"UNIX:{sockdir}/none", timeout=1)
    asyncio.run(main())


def test_aio_batches(procs, sockdir):
    addr = f"UNIX:{sockdir}/s"
    procs.server(addr, "-sessions", "5000")

    async def main():
        c = await AsyncDistcacheClient.connect(addr, timeout=5)
        ids = [b"batch-%05d" % i for i in range(3000)]
        datas = [os.urandom(5 + i % 3000) for i in range(3000)]   # some multi-frame
        assert await c.add_many(list(zip(ids, datas, [60000] * 3000))) == [True] * 3000
        # A batch and single requests interleaved on the same connection.
        single = c.get(ids[5])
        got, has = await asyncio.gather(c.get_many(ids), c.has_many(ids[:10] + [b"absent-id"]))
        assert got == datas and await single == datas[5]
        assert has == [True] * 10 + [False]
        assert await c.remove_many(ids[:2] + ids[:1]) == [True, True, False]
        assert await c.get_many([]) == []
        await c.close()
    asyncio.run(main())


def test_aio_batch_timeout(fake_servers, sockdir):
    silent = fake_servers(sockdir / "silent", policy=lambda i, m: None)

    async def main():
        c = await AsyncDistcacheClient.connect(silent.address, timeout=0.3)
        with pytest.raises(DistcacheError, match="within"):
            await c.get_many([b"abcdef", b"ghijkl"])
        await c.close()
    asyncio.run(main())


def _unresponsive_listener():
    """A TCP listener whose accept queue is full: further connects hang in SYN_SENT."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fill.append(s)
    return listener, fill, port


def test_connect_timeout():
    listener, fill, port = _unresponsive_listener()
    try:
        t0 = time.monotonic()
        with pytest.raises(DistcacheError, match="connect timed out"):
            DistcacheClient(f"IP:127.0.0.1:{port}", PERSISTENT, timeout=0.4)
        with pytest.raises(DistcacheError, match="connect timed out"):
            DistcacheClient(f"IP:127.0.0.1:{port}", 0, timeout=0.4).get(b"abcdef")

        async def main():
            with pytest.raises(DistcacheError, match="connect timed out"):
                await AsyncDistcacheClient.connect(f"IP:127.0.0.1:{port}", timeout=0.4)
        asyncio.run(main())
        assert time.monotonic() - t0 < 5
    finally:
        for s in fill:
            s.close()
        listener.close()
