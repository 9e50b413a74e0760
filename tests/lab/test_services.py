"""Shared services on lab hosts: distcache (dc_server on cache, dc_client per back end), Redis Cluster."""

from __future__ import annotations

import shutil

import pytest

from tcpha.lab.netns import pids_in_netns
from tcpha.lab.services import start_dc_client, start_dc_server, start_redis_cluster
from tests.support import running

pytestmark = pytest.mark.netns


def test_session_added_through_be1_is_seen_through_be2(lab):
    from tcpha.distcache.client import DistcacheClient

    srv = start_dc_server(lab)
    assert srv.address == "IP:10.77.0.20:9001"
    agents = {h: start_dc_client(lab, h, srv.address) for h in ("be1", "be2")}

    def add():
        with DistcacheClient(agents["be1"].address) as c:
            return c.add(b"sid-1", b"session-data", 60_000)

    def get():
        with DistcacheClient(agents["be2"].address) as c:
            return c.get(b"sid-1")

    # the agents are reached from inside their own hosts (as tcpha-be would)
    assert lab.call("be1", add) is True
    assert lab.call("be2", get) == b"session-data"
    # dc_server really is only reachable on the lab network
    with pytest.raises(OSError):
        lab.connect("client", "127.0.0.1", 9001, timeout=1)
    srv.stop()
    assert not srv.running()
    assert all(a.running() for a in agents.values())


def test_redis_cluster_on_cache_host_is_removed_by_down(lab_factory):

    lab = lab_factory()
    cluster = start_redis_cluster(lab)
    assert cluster.address.startswith("redis-cluster://10.77.0.20:7000")

    def ping():
        from redis.cluster import RedisCluster
        rc = RedisCluster(host="10.77.0.20", port=7000, socket_timeout=5)
        try:
            rc.set("k", "v")
            roles = [n["flags"] for n in rc.cluster_nodes().values()]
            return (rc.get("k"), sum("master" in r for r in roles), sum("slave" in r for r in roles))
        finally:
            rc.close()

    assert lab.call("client", ping) == (b"v", 3, 3)
    in_cache = [pid for pid, ns in pids_in_netns(lab.namespaces()).items() if ns == lab.netns("cache")]
    assert len(in_cache) >= 6
    lab.down()
    assert not running(in_cache)


def test_two_dc_redis_cluster_passes_the_placement_check(lab_factory):
    """The lab's two-data-center cluster: dc_server -check-placement, run on a back end, finds every
    primary with a replica in the other data center."""
    import subprocess
    import sys

    lab = lab_factory()
    cluster = start_redis_cluster(lab, datacenters=("east", "west"))
    assert cluster.dc_map is not None and cluster.dc_map.count("=east") == 3 and cluster.dc_map.count("=west") == 3
    r = lab.run("be1", [sys.executable, "-m", "tcpha.cli.dc_server", "-backend", cluster.address, "-check-placement",
                        "-dc-map", cluster.dc_map], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "placement ok: each of 3 primaries has a replica in another data center"
