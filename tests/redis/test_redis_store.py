"""The Redis store keeps the embedded store's semantics, on a real redis-server and a real 3+3 cluster."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from tcpha.distcache.codec import Status
from tcpha.distcache.redis_store import BackendURLError, open_store, url_without_password


def run(coro):
    return asyncio.run(coro)


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
        assert await store.refresh_count() >= 0
        line = await store.describe()
        assert line.startswith("Info, backend ")
    finally:
        await store.close()


def test_standalone_semantics(redis_node):
    run(_semantics(f"redis://{redis_node.address}"))


def test_cluster_semantics(redis_cluster):
    run(_semantics(redis_cluster.url))


def test_cluster_describe_reports_topology(redis_cluster):
    async def go():
        store = open_store(redis_cluster.url, 512)
        try:
            return await store.describe()
        finally:
            await store.close()
    line = run(go())
    assert "3 primaries, 3 replicas" in line and "state ok" in line, line


def test_sessions_added_through_one_store_visible_through_another(redis_cluster):
    async def go():
        a, b = open_store(redis_cluster.url, 512), open_store(redis_cluster.url, 512)
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
    assert worst < 1.0, f"a request during the outage took {worst:.2f} s"
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


def test_primary_killed_loses_at_most_the_last_second(redis_cluster):
    """Writes run while one primary is killed; after the replica takes over, every session acknowledged
    more than one second before the kill is still served, and nothing on the other primaries is lost."""
    async def go():
        loop = asyncio.get_running_loop()
        store = open_store(redis_cluster.url, 512)
        acked: list[tuple[bytes, float]] = []
        victim = None
        try:
            t_end = loop.time() + 2.5
            kill_at = loop.time() + 1.5
            killed_at = None
            while loop.time() < t_end:
                sid = os.urandom(12)
                if await store.add(sid, sid, 300_000) == Status.OK:
                    acked.append((sid, loop.time()))
                if killed_at is None and loop.time() >= kill_at:
                    victim = redis_cluster.primary_for(b"dc:" + acked[0][0])
                    victim.kill()
                    killed_at = loop.time()
            # Wait for the replica to take over: the victim's keys answer again.
            deadline = loop.time() + 20
            probe = acked[0][0]
            while await store.get(probe) != probe:
                assert loop.time() < deadline, "replica did not take over"
                await asyncio.sleep(0.1)
            lost_old, lost_recent, served = [], 0, 0
            for sid, t in acked:
                if await store.get(sid) == sid:
                    served += 1
                elif t < killed_at - 1.0:
                    lost_old.append(sid)
                else:
                    lost_recent += 1
            return acked, served, lost_old, lost_recent, victim
        finally:
            await store.close()
    acked, served, lost_old, lost_recent, victim = run(go())
    try:
        assert len(acked) > 100
        assert lost_old == [], f"{len(lost_old)} sessions acknowledged > 1 s before the kill were lost"
        assert served >= len(acked) - lost_recent
    finally:
        # Put the node back (it rejoins as a replica) so later tests see a whole cluster.
        victim.start()
        redis_cluster.wait_healthy(30)
