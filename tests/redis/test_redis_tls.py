"""TLS on the cache's Redis links: dc_server to Redis over rediss:// with redis-cli's words (cacert, cert,
key), certificate and host checked; a Redis Cluster whose clients, replication and cluster bus all use TLS
(tcpha.distcache.redis_cluster.RedisTls, what the lab can run)."""

from __future__ import annotations

import os

import pytest

from tcpha.distcache.client import PERSISTENT, DistcacheClient
from tcpha.distcache.redis_cluster import LocalRedisCluster, RedisNode, RedisTls
from tcpha.distcache.redis_store import BackendURLError, open_store
from tcpha.lab.tls_demo import make_cert
from tests.redis.conftest import free_port_block
from tests.redis.test_dc_server_redis import DcServer


def _tls(directory) -> RedisTls:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = make_cert(directory, names=["localhost"], vip="127.0.0.1")
    return RedisTls(ca=cert, cert=cert, key=key)      # self-signed: its own CA


def _roundtrip(address: str) -> bool:
    with DistcacheClient(address, PERSISTENT, timeout=5.0) as client:
        sid = os.urandom(16)
        return bool(client.add(sid, b"over tls", 60_000)) and client.get(sid) == b"over tls"


def test_dc_server_reaches_redis_over_tls_and_checks_its_certificate(tmp_path):
    tls = _tls(tmp_path / "certs")
    node = RedisNode("127.0.0.1", free_port_block(1), tmp_path / "redis", cluster=False, tls=tls)
    node.start()                                          # TLS only: "port 0", tls-port
    servers = []
    try:
        # socket_timeout=2: a TLS connect on a busy test machine can take longer than the 0.25 s default.
        good = DcServer(f"rediss://{node.address}?{tls.url_query()}&socket_timeout=2", tmp_path, "good")
        servers.append(good)
        assert _roundtrip(good.address), good.output()
        other = _tls(tmp_path / "other")                  # a CA that did not sign the server's certificate
        wrong = DcServer(f"rediss://{node.address}?cacert={other.ca}&cert={tls.cert}&key={tls.key}"
                         "&socket_timeout=2", tmp_path, "wrong")
        servers.append(wrong)
        assert not _roundtrip(wrong.address)              # a miss, never a session from an unchecked peer
        assert "certificate verify failed" in wrong.output(), wrong.output()
        plain = DcServer(f"redis://{node.address}?socket_timeout=2", tmp_path, "plain")
        servers.append(plain)
        assert not _roundtrip(plain.address)              # no plaintext way in
    finally:
        for s in servers:
            s.stop()
        node.kill()


def test_tls_words_are_checked(tmp_path):
    with pytest.raises(BackendURLError, match="cacert is a TLS option: use rediss://"):
        open_store(f"redis://127.0.0.1:6379?cacert={tmp_path}", 10)
    with pytest.raises(BackendURLError, match="no such file"):
        open_store(f"rediss://127.0.0.1:6379?cacert={tmp_path}/missing.pem", 10)


def test_redis_cluster_with_tls_on_every_link(tmp_path):
    tls = _tls(tmp_path / "certs")
    cluster = LocalRedisCluster(tmp_path / "cluster", base_port=free_port_block(6), tls=tls)
    try:
        cluster.start()                                   # redis-cli --tls ... --cluster create; waits healthy
        for node in cluster.nodes:
            client = node.client(socket_timeout=2)
            try:
                assert client.config_get("tls-cluster")["tls-cluster"] == "yes"
                assert client.config_get("tls-replication")["tls-replication"] == "yes"
                assert client.config_get("port")["port"] == "0"
            finally:
                client.close()
        assert cluster.url.startswith("rediss-cluster://")
        server = DcServer(cluster.url + "&socket_timeout=2", tmp_path, "cluster")    # see above
        try:
            assert all(_roundtrip(server.address) for _ in range(20)), server.output()
        finally:
            server.stop()
    finally:
        cluster.stop()
