"""Sessions sealed before they reach the cache (tcpha.tls.sealing): the record format's promises, the
key file's errors, and, through a real dc_server with -persist, that a session resumes across servers
while the persisted file holds no master secret from SSLKEYLOGFILE (and does without sealing: the
check can see one); a server with another key gets a clean miss."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tcpha.tls.sealing import SEAL_OVERHEAD, SessionKeyError, SessionSealer, read_session_keys

from .conftest import DC_SERVER, _connectable, client_context, visit, wait_for

K1, K2 = bytes(range(32)), bytes(range(100, 132))
SID = bytes.fromhex("aa" * 32)


def test_seal_open_and_everything_that_must_not_open():
    s = SessionSealer((K1,))
    record = s.seal(SID, b"session bytes")
    assert len(record) == len(b"session bytes") + SEAL_OVERHEAD
    assert b"session bytes" not in record
    assert s.open(SID, record) == b"session bytes"
    assert s.seal(SID, b"x") != s.seal(SID, b"x")                   # a fresh nonce each time
    assert s.open(b"\xbb" * 32, record) is None                     # moved to another id
    for i in range(len(record)):                                     # any flipped bit
        assert s.open(SID, record[:i] + bytes([record[i] ^ 1]) + record[i + 1:]) is None
    assert s.open(SID, record[:-1]) is None and s.open(SID, b"") is None
    assert SessionSealer((K2,)).open(SID, record) is None            # another key
    assert s.open(SID, b"0\x82\x01\x00" + b"\x00" * 200) is None      # a plaintext (unsealed) session


def test_rotation_new_key_seals_old_key_still_opens():
    old, rotated = SessionSealer((K1,)), SessionSealer((K2, K1))
    assert rotated.open(SID, old.seal(SID, b"before")) == b"before"   # sessions made before the rotation
    new_record = rotated.seal(SID, b"after")
    assert SessionSealer((K2,)).open(SID, new_record) == b"after"     # sealed with the first key
    assert old.open(SID, new_record) is None                           # a server not yet rotated: a miss


def _keyfile(path, *lines: str, mode: int = 0o600) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(mode)
    return str(path)


def test_key_file_errors_are_one_line(tmp_path):
    good = _keyfile(tmp_path / "k", "# current", K2.hex(), K1.hex() + "   # previous")
    assert read_session_keys(good) == [K2, K1]
    cases = [
        (_keyfile(tmp_path / "open", K1.hex(), mode=0o644), "accessible by group or others"),
        (_keyfile(tmp_path / "short", K1.hex(), "abcd"), "short:2: a session key is 64 hex digits"),
        (_keyfile(tmp_path / "hex", "zz" * 32), "hex:1: a session key is 64 hex digits"),
        (_keyfile(tmp_path / "twice", K1.hex(), K1.hex()), "twice:2: the same key twice"),
        (_keyfile(tmp_path / "empty", "# nothing"), "holds no key"),
        (str(tmp_path / "missing"), "create one with: tcpha-keygen"),
    ]
    for path, fragment in cases:
        with pytest.raises(SessionKeyError) as info:
            read_session_keys(path)
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def _master_secrets(keylog: str) -> list[bytes]:
    """The TLS 1.2 master secrets a client wrote to its SSLKEYLOGFILE."""
    return [bytes.fromhex(m) for m in re.findall(r"^CLIENT_RANDOM [0-9a-f]+ ([0-9a-f]+)$", keylog, re.M)]


def _sessions_across_two_servers(procs, tls_server, certs, tmp_path, dc_args: list[str],
                                 sealed: bool) -> tuple[list[bytes], subprocess.Popen]:
    """A dc_server with `dc_args` on a UNIX socket, servers A and B sharing it (TLS 1.2, sealed or not), five
    sessions made on A and resumed on B: the master secrets the client logged, and the dc_server."""
    address = f"UNIX:{tmp_path}/scache"
    dc = procs.add(subprocess.Popen(DC_SERVER + ["-listen", address, *dc_args],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    wait_for(lambda: dc.poll() is not None or _connectable(address), 10, "dc_server")
    keys = _keyfile(tmp_path / "sessionkeys", K1.hex())
    extra = ("--max-version", "TLSv1_2", *(("--session-keys", keys) if sealed else ()))
    a = tls_server("A", address, *extra)
    b = tls_server("B", address, *extra)
    client = client_context(certs, "TLSv1_2")
    client.keylog_filename = str(tmp_path / "keylog")
    for _ in range(5):
        first = visit(a.port, client)
        assert not first.reused
        assert visit(b.port, client, first.session).reused      # resumed across servers, through the cache
    secrets = _master_secrets((tmp_path / "keylog").read_text())
    assert len(secrets) >= 5
    return secrets, dc


@pytest.mark.parametrize("sealed", [True, False])
def test_persisted_cache_holds_no_master_secret_when_sealed(procs, tls_server, certs, tmp_path, sealed):
    persist = tmp_path / "sessions.db"
    secrets, dc = _sessions_across_two_servers(procs, tls_server, certs, tmp_path, ["-persist", str(persist)],
                                               sealed)
    dc.terminate()
    dc.wait(10)                                                  # the -persist file is complete
    stored = persist.read_bytes()
    found = [s for s in secrets if s in stored]
    if sealed:
        assert found == [], f"{len(found)} master secrets readable in the -persist file"
    else:
        assert found, "unsealed sessions hold their master secret: the check must be able to see one"


def test_a_server_with_another_key_gets_a_clean_miss(dc_server, tls_server, certs, tmp_path):
    address, _ = dc_server()
    a = tls_server("A", address, "--session-keys", _keyfile(tmp_path / "k1", K1.hex()))
    c = tls_server("C", address, "--session-keys", _keyfile(tmp_path / "k2", K2.hex()))
    client = client_context(certs, "TLSv1_2")
    first = visit(a.port, client)
    on_c = visit(c.port, client, first.session)
    assert on_c.line.startswith("C reused=0")                     # a full handshake, never a failure
    import json
    stats = json.loads(visit(c.port, client, send=b"stats\n").line)
    assert stats["lookups"] >= 1 and stats["unsealed"] >= 1 and stats["hits"] == 0
    assert c.proc.poll() is None
    assert visit(a.port, client, first.session).reused             # A still resumes its own


@pytest.mark.parametrize("sealed", [True, False])
def test_redis_holds_no_master_secret_when_sealed(procs, tls_server, certs, tmp_path, sealed):
    """dc_server on Redis: every key's DUMP (what RDB files, replicas and MIGRATE carry) and the values
    as Redis returns them hold no master secret when the back ends seal."""
    import redis

    from tcpha.distcache.redis_cluster import RedisNode
    from tests.redis.conftest import free_port_block

    node = RedisNode("127.0.0.1", free_port_block(1), tmp_path / "redis", cluster=False)
    node.start()
    try:
        secrets, _ = _sessions_across_two_servers(procs, tls_server, certs, tmp_path,
                                                  ["-backend", f"redis://{node.address}"], sealed)
        host, port = node.address.rsplit(":", 1)
        r = redis.Redis(host=host, port=int(port))
        held = b"".join((r.dump(k) or b"") + (r.get(k) or b"") for k in r.scan_iter(count=1000))
        assert held, "the sessions are in Redis"
        found = [s for s in secrets if s in held]
        if sealed:
            assert found == [], f"{len(found)} master secrets readable in Redis"
        else:
            assert found, "unsealed sessions hold their master secret: the check must be able to see one"
    finally:
        node.kill()
