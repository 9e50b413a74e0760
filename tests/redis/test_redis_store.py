"""The Redis store keeps the embedded store's semantics, on a real redis-server and a real 3+3 cluster."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from tcpha.distcache.codec import Status
from tcpha.distcache.redis_store import BackendURLError, open_store, url_without_password
from tests.support import wait_until


def run(coro):
    return asyncio.run(coro)


def patient(url: str) -> str:
    """url with a 2 s socket timeout: a semantics test is not about timeouts, and the 0.25 s default is
    short for six redis-servers on a busy two-core machine (a timed-out ADD answers NOTOK)."""
    return url + ("&" if "?" in url else "?") + "socket_timeout=2"


async def _semantics(url: str) -> None:
    store = open_store(url, 512)
    try:
        sid = os.urandom(16)
        assert await store.add(sid, b"first", 60_000) == Status.OK
        # ADD never overwrites (status 101) and the old entry stays.
        assert await store.add(sid, b"second", 60_000) == Status.ADD_MATCHING_SESSION
        assert await store.get(sid) == b"first"
        assert await store.has(sid) is True
        assert await store.remove(sid) is True
        assert await store.remove(sid) is False
        assert await store.get(sid) is None
        assert await store.has(sid) is False
        # Expiry is the ADD's timeout in milliseconds.
        short = os.urandom(16)
        assert await store.add(short, b"x" * 32768, 50) == Status.OK
        assert await store.get(short) == b"x" * 32768
        deadline = asyncio.get_running_loop().time() + 5
        while await store.has(short):
            assert asyncio.get_running_loop().time() < deadline, "session outlived its timeout"
            await asyncio.sleep(0.01)
        before = await store.refresh_count()
        extra = [os.urandom(16) for _ in range(3)]
        for key in extra:
            assert await store.add(key, b"y", 60_000) == Status.OK
        assert await store.refresh_count() == before + 3      # DBSIZE counts what was stored
        line = await store.describe()
        assert line.startswith("Info, backend ")
    finally:
        await store.close()


def test_standalone_semantics(redis_node):
    run(_semantics(patient(f"redis://{redis_node.address}")))


def test_cluster_semantics(redis_cluster):
    run(_semantics(patient(redis_cluster.url)))


def test_cluster_describe_reports_topology(redis_cluster):
    async def go():
        store = open_store(patient(redis_cluster.url), 512)
        try:
            return await store.describe()
        finally:
            await store.close()
    line = run(go())
    assert "3 primaries, 3 replicas" in line and "state ok" in line, line


def test_sessions_added_through_one_store_visible_through_another(redis_cluster):
    async def go():
        a, b = open_store(patient(redis_cluster.url), 512), open_store(patient(redis_cluster.url), 512)
        try:
            ids = [os.urandom(12) for _ in range(50)]
            for i in ids:
                assert await a.add(i, i * 3, 60_000) == Status.OK
            return [await b.get(i) == i * 3 for i in ids]
        finally:
            await a.close(); await b.close()
    assert all(run(go()))


def test_unreachable_redis_answers_fast_and_logs_once(redis_node, caplog):
    async def go():
        store = open_store(f"redis://{redis_node.address}?socket_timeout=0.2", 512)
        sid = os.urandom(8)
        assert await store.add(sid, b"v", 60_000) == Status.OK
        redis_node.kill()
        loop = asyncio.get_running_loop()
        results, worst = [], 0.0
        for _ in range(50):
            t0 = loop.time()
            results.append(await store.get(sid))
            worst = max(worst, loop.time() - t0)
        assert await store.add(os.urandom(8), b"v", 1000) == Status.NOTOK
        redis_node.start()
        deadline = loop.time() + 10
        while await store.get(sid) != b"v":       # AOF brings the session back with the restart
            assert loop.time() < deadline, "store did not recover after Redis came back"
            await asyncio.sleep(0.05)
        await store.close()
        return results, worst
    with caplog.at_level(logging.INFO, logger="tcpha.distcache.redis"):
        results, worst = run(go())
    assert results == [None] * 50
    # Not a speed limit (bench/ has those): a request bounded by socket_timeout (0.2 s) rather than
    # hanging until Redis returns; 5 s leaves a busy machine 25x the timeout.
    assert worst < 5.0, f"a request during the outage took {worst:.2f} s (socket_timeout 0.2 s)"
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    recovered = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(unreachable) == 1 and len(recovered) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("url,fragment", [
    ("memcached://x:1", "unknown backend scheme"),
    ("redis://host:notaport", "bad host:port"),
    ("redis://a:1,b:2", "use redis-cluster://"),
])
def test_bad_urls_are_one_line_errors(url, fragment):
    with pytest.raises(BackendURLError) as info:
        open_store(url, 512)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_password_is_not_logged():
    assert url_without_password("redis://:s3cret@h:1/0") == "redis://***@h:1/0"
    assert "s3cret" not in url_without_password("redis://user:s3cret@h:1")


def _replica_of(cluster, primary):
    """The live node replicating ``primary`` (as its own INFO replication says)."""
    for node in cluster.nodes:
        if node is primary or node.pid() is None:
            continue
        client = node.client(socket_timeout=2)
        try:
            info = client.info("replication")
        finally:
            client.close()
        if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
            return node
    raise AssertionError(f"no replica of {primary.address} is linked")


def _info(node, section: str) -> dict:
    client = node.client(socket_timeout=2)
    try:
        return client.info(section)
    finally:
        client.close()


def _wait_replicated(primary, replica, timeout: float = 15.0) -> None:
    """Until ``replica`` has applied everything ``primary`` had acknowledged when this was called.
    Redis replicates asynchronously; how far behind a replica is depends on the machine's load, not on
    the store, so the test waits for the replica instead of guessing a time window."""
    target = int(_info(primary, "replication")["master_repl_offset"])
    info: dict = {}

    def caught_up() -> bool:
        info.clear()
        info.update(_info(replica, "replication"))
        return int(info.get("slave_repl_offset", -1)) >= target

    try:
        wait_until(caught_up, timeout, f"replica {replica.address} to reach offset {target} of {primary.address}",
                   interval=0.01)
    except AssertionError as e:
        raise AssertionError(
            f"replica {replica.address} did not reach offset {target} of {primary.address} in {timeout:.0f} s "
            f"(at {info.get('slave_repl_offset')}, link {info.get('master_link_status')})") from e


def _epoch(cluster) -> int:
    for node in cluster.nodes:
        if node.pid() is not None:
            client = node.client(socket_timeout=2)
            try:
                return int(client.cluster("info")["cluster_current_epoch"])
            finally:
                client.close()
    raise AssertionError("no live node")


def test_primary_killed_loses_nothing_its_replica_had(redis_cluster):
    """Writes run while one primary is killed; the replica takes over, and the store, following the new
    slot map, serves every session the replica had received before the kill and every session
    acknowledged after it (by the live primaries)."""
    async def go():
        loop = asyncio.get_running_loop()
        store = open_store(redis_cluster.url, 512)
        acked: list[tuple[bytes, float]] = []
        victim = replica = None
        try:
            epoch = _epoch(redis_cluster)
            kill_at = loop.time() + 1.5
            killed_at = None
            # Writes go on until one is acknowledged after the kill, for at least 1 s after it: the
            # store answers without trying while it holds the cluster unreachable (seconds on a busy
            # machine), so a fixed end could come before any write had a chance (30 s: none came).
            while killed_at is None or loop.time() < killed_at + 1.0 or not acked or acked[-1][1] < killed_at:
                assert killed_at is None or loop.time() < killed_at + 30, "no write acknowledged after the kill"
                sid = os.urandom(12)
                if await store.add(sid, sid, 300_000) == Status.OK:
                    acked.append((sid, loop.time()))
                elif killed_at is not None:
                    await asyncio.sleep(0.01)          # answered without trying: no busy loop meanwhile
                if killed_at is None and loop.time() >= kill_at:
                    # No failover may have happened yet: one would lose writes for reasons of its own.
                    assert _epoch(redis_cluster) == epoch, "a failover happened before the kill"
                    victim = redis_cluster.primary_for(b"dc:" + acked[0][0])
                    replica = _replica_of(redis_cluster, victim)
                    # The store sends nothing while this runs (one add at a time, on this loop), so
                    # every session acknowledged so far is in the replica once it has caught up.
                    _wait_replicated(victim, replica)
                    victim.kill()
                    killed_at = loop.time()
            # Wait for the replica to take over: the victim's keys answer again.
            deadline = loop.time() + 20
            probe = acked[0][0]
            while await store.get(probe) != probe:
                assert loop.time() < deadline, "replica did not take over"
                await asyncio.sleep(0.1)
            lost_before, lost_after = [], []
            for sid, t in acked:
                if await store.get(sid) != sid:
                    (lost_before if t < killed_at else lost_after).append(sid)
            return acked, lost_before, lost_after, victim, replica, killed_at
        finally:
            await store.close()
    acked, lost_before, lost_after, victim, replica, killed_at = run(go())
    try:
        assert redis_cluster.primary_for(b"dc:" + acked[0][0]) is replica, "another node took the slots over"
        assert len(acked) > 100 and any(t < killed_at for _, t in acked)
        assert any(t > killed_at for _, t in acked), "no write was acknowledged after the kill"
        assert lost_before == [], f"{len(lost_before)} sessions the replica had received were lost"
        assert lost_after == [], f"{len(lost_after)} sessions acknowledged after the kill were lost"
    finally:
        # Put the node back (it rejoins as a replica) so later tests see a whole cluster.
        if victim is not None:
            victim.start()
            redis_cluster.wait_healthy(30)
