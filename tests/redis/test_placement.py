"""Redis Cluster placement across data centers: the lab's two-data-center cluster
(LocalRedisCluster(datacenters=("east", "west"))) gives every primary a replica in the other data center,
and ``dc_server -check-placement -dc-map ...`` passes it, reports a primary whose replicas are all in its
own data center (or that has no healthy replica), and refuses an incomplete or malformed map."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tcpha.distcache.placement import PlacementError, parse_cluster_nodes, parse_dc_map
from tcpha.distcache.redis_cluster import LocalRedisCluster
from tests.redis.conftest import free_port_block
from tests.support import wait_until


@pytest.fixture(scope="module")
def two_dc_cluster(tmp_path_factory):
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("cluster2dc"), base_port=free_port_block(6),
                                datacenters=("east", "west"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _check(cluster: LocalRedisCluster, dc_map: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcpha.cli.dc_server", "-backend", cluster.url, "-check-placement",
                           "-dc-map", dc_map], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _nodes(cluster: LocalRedisCluster):
    client = cluster.nodes[0].client(socket_timeout=5)
    try:
        return parse_cluster_nodes(client.execute_command("CLUSTER", "NODES").decode())
    finally:
        client.close()


def test_lab_builds_every_primary_with_a_replica_in_the_other_dc(two_dc_cluster):
    """Read back from Redis itself: each primary's replica is the node the lab tagged with the other DC."""
    tag = {n.address: n.dc for n in two_dc_cluster.nodes}
    nodes = _nodes(two_dc_cluster)
    primaries = {n.node_id: n for n in nodes if "master" in n.flags and n.slots}
    assert len(primaries) == 3
    for primary in primaries.values():
        replicas = [n for n in nodes if n.primary_id == primary.node_id]
        assert replicas and all(tag[r.address] != tag[primary.address] for r in replicas), (primary, replicas)
    assert {n.dc for n in two_dc_cluster.nodes} == {"east", "west"}


def test_check_passes_the_two_dc_layout(two_dc_cluster):
    r = _check(two_dc_cluster, two_dc_cluster.dc_map())
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["ok"] * 3
    assert lines[3] == "placement ok: each of 3 primaries has a replica in another data center"


def test_check_reports_a_primary_whose_replicas_share_its_dc(two_dc_cluster, tmp_path):
    # Move the first primary's replica into the primary's data center (the map is the operator's word).
    primary = two_dc_cluster.nodes[0]
    replica = two_dc_cluster.replica_nodes(0)[0]
    tags = {n.address: n.dc for n in two_dc_cluster.nodes}
    tags[replica.address] = primary.dc
    map_file = tmp_path / "dc-map"
    map_file.write_text("# the nodes' data centers\n\n" + "".join(f"{a}={d}  # node\n" for a, d in tags.items()))
    r = _check(two_dc_cluster, f"@{map_file}")
    assert r.returncode == 1, r.stdout + r.stderr
    bad = [line for line in r.stdout.splitlines() if line.startswith("BAD")]
    assert bad == [f"BAD: primary {primary.address} ({primary.dc}), slots 0-5460: every replica in {primary.dc}: "
                   f"replicas {replica.address} ({primary.dc})"]
    assert r.stdout.splitlines()[-1] == "placement BAD: 1 of 3 primaries have no replica in another data center"
    # Everything in one data center: every primary is reported.
    r = _check(two_dc_cluster, ",".join(f"{n.address}=east" for n in two_dc_cluster.nodes))
    assert r.returncode == 1 and sum(line.startswith("BAD") for line in r.stdout.splitlines()) == 3


def test_incomplete_map_is_an_error(two_dc_cluster):
    r = _check(two_dc_cluster, ",".join(f"{n.address}={n.dc}" for n in two_dc_cluster.nodes[:-1]))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"Error, cluster node(s) not in -dc-map: {two_dc_cluster.nodes[-1].address}\n"


def test_a_dead_replica_leaves_its_primary_without_one(two_dc_cluster):
    """Last in this module: it kills a replica (and restarts it)."""
    replica = two_dc_cluster.replica_nodes(1)[0]
    primary = two_dc_cluster.nodes[1]
    replica.kill()
    try:
        r = wait_until(lambda: (lambda r: r if r.returncode == 1 else None)(_check(two_dc_cluster, two_dc_cluster.dc_map())),
                       30, "the cluster to mark the replica failed")
        assert f"BAD: primary {primary.address} ({primary.dc}), slots 5461-10922: no healthy replica: replicas none" \
            in r.stdout.splitlines()
    finally:
        replica.start()
        two_dc_cluster.wait_healthy()


@pytest.mark.parametrize("text,message", [
    ("127.0.0.1:7000", "-dc-map: expected host:port=DC, got '127.0.0.1:7000'"),
    ("127.0.0.1=east", "-dc-map: expected host:port=DC, got '127.0.0.1=east'"),
    ("127.0.0.1:99999=east", "-dc-map: expected host:port=DC, got '127.0.0.1:99999=east'"),
    ("127.0.0.1:7000=ea st", "-dc-map: bad data center name 'ea st' (letters, digits, _ . -)"),
    ("127.0.0.1:7000=east,127.0.0.1:7000=west", "-dc-map: 127.0.0.1:7000 is in two data centers (east and west)"),
])
def test_dc_map_errors(text, message):
    with pytest.raises(PlacementError) as err:
        parse_dc_map(text)
    assert str(err.value) == message


def test_dc_map_file_errors_name_the_line(tmp_path):
    f = tmp_path / "map"
    f.write_text("127.0.0.1:7000=east\n# comment\nnonsense\n")
    with pytest.raises(PlacementError, match=rf"^{f}:3: expected host:port=DC, got 'nonsense'$"):
        parse_dc_map(f"@{f}")
    with pytest.raises(PlacementError, match="no-such-file: No such file or directory"):
        parse_dc_map(f"@{tmp_path}/no-such-file")


@pytest.mark.parametrize("args,message", [
    (["-backend", "redis://127.0.0.1:1", "-check-placement", "-dc-map", "127.0.0.1:1=a"],
     "Error, -check-placement needs -backend redis-cluster:// or rediss-cluster://, not 'redis://127.0.0.1:1'\n"),
    (["-backend", "redis-cluster://127.0.0.1:1", "-check-placement"],
     "Error, -check-placement needs -dc-map host:port=DC,... (or -dc-map @FILE)\n"),
    (["-listen", "IP:0", "-dc-map", "127.0.0.1:1=a"], "Error, -dc-map is used with -check-placement only\n"),
])
def test_check_placement_usage_errors(args, message):
    r = subprocess.run([sys.executable, "-m", "tcpha.cli.dc_server", *args], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", message)


def test_unreachable_cluster_is_one_line():
    port = free_port_block(1)
    r = subprocess.run([sys.executable, "-m", "tcpha.cli.dc_server", "-backend", f"redis-cluster://127.0.0.1:{port}",
                        "-check-placement", "-dc-map", f"127.0.0.1:{port}=a"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error, no cluster node answered CLUSTER NODES (127.0.0.1:{port}: ")
    assert len(r.stderr.splitlines()) == 1
