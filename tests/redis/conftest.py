"""Real redis-server processes for the Redis backend tests, on loopback, removed after the tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from tcpha.distcache.redis_cluster import LocalRedisCluster, RedisNode


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """A base port such that base..base+count-1 and their cluster-bus ports (+10000) are free."""
    for _ in range(200):
        base = random.randrange(20000, 29000)
        if all(_free(p) and _free(p + 10000) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free block of loopback ports")


@pytest.fixture
def redis_node(tmp_path: Path):
    node = RedisNode("127.0.0.1", free_port_block(1), tmp_path / "redis", cluster=False)
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("cluster"), base_port=free_port_block(6))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
