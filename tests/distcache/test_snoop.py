"""dc_snoop: transparent forwarding, one exact trace line per frame, -decode, bad frames."""

from __future__ import annotations

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import (procs, read_responses, request, sockdir, unix_connect,  # noqa: E402,F401
                             wait_until)

from tcpha.distcache.client import PERSISTENT, DistcacheClient  # noqa: E402
from tcpha.distcache.codec import Op, encode_add_payload  # noqa: E402

LINE = re.compile(r"^SNOOP_DBG_MSG: connection (\d+), (client->server|server->client), "
                  r"message completed \(request_uid = (\d+)\), total_len=(\d+)(.*)$")


def _trace(proc) -> list[str]:
    """The trace lines, which go to stderr as in the original (stdout stays empty)."""
    assert proc.stdout() == ""
    return [x for x in proc.stderr().splitlines() if x.startswith(("SNOOP_DBG_MSG", "[TODO"))]


def _lines(proc, count):
    return wait_until(lambda: (lambda ls: ls if len(ls) >= count else None)(_trace(proc)),
                      10, f"{count} trace lines")


def test_one_line_per_frame(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    snoop = procs.start("tcpha.cli.dc_snoop", "-listen", f"UNIX:{sockdir}/snoop", "-connect",
                        f"UNIX:{sockdir}/srv")
    s = unix_connect(sockdir / "snoop")
    data = os.urandom(5000)
    add = request(77, Op.ADD, encode_add_payload(b"abc", data, 300000))   # 8+3+5000 = 5011 bytes: 3 frames
    s.sendall(add)
    (m,) = read_responses(s, 1)
    assert (m.uid, m.payload) == (77, b"\x00")
    s.sendall(request(78, Op.GET, b"abc"))
    (m,) = read_responses(s, 1)
    assert m.payload == data
    lines = _lines(snoop, 7)
    assert lines == [
        "SNOOP_DBG_MSG: connection 0, client->server, message completed (request_uid = 77), total_len=2062",
        "SNOOP_DBG_MSG: connection 0, client->server, message completed (request_uid = 77), total_len=2062",
        "SNOOP_DBG_MSG: connection 0, client->server, message completed (request_uid = 77), total_len=929",
        "SNOOP_DBG_MSG: connection 0, server->client, message completed (request_uid = 77), total_len=15",
        "SNOOP_DBG_MSG: connection 0, client->server, message completed (request_uid = 78), total_len=17",
        "SNOOP_DBG_MSG: connection 0, server->client, message completed (request_uid = 78), total_len=2062",
        "SNOOP_DBG_MSG: connection 0, server->client, message completed (request_uid = 78), total_len=2062",
    ] + lines[7:]
    lines = _lines(snoop, 8)
    assert lines[7] == ("SNOOP_DBG_MSG: connection 0, server->client, message completed "
                        "(request_uid = 78), total_len=918")
    assert len(lines) == 8


def test_connection_numbers_and_byte_transparency(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    snoop = procs.start("tcpha.cli.dc_snoop", "-listen", f"UNIX:{sockdir}/snoop", "-server",
                        f"UNIX:{sockdir}/srv")
    # (no readiness probe: a probe connection would take connection number 0)
    a = unix_connect(sockdir / "snoop")
    b = unix_connect(sockdir / "snoop")
    # The example from the notes, byte for byte, both ways.
    a.sendall(bytes.fromhex("00110000 00 00000007 00 00 01 000f 000493e0 00000003 616263 44415441".replace(" ", "")))
    a.settimeout(5)
    assert a.recv(100) == bytes.fromhex("00110000 01 00000007 00 00 01 0001 00".replace(" ", ""))
    b.sendall(bytes.fromhex("00110000 00 00000001 00 03 01 0003 616263".replace(" ", "")))
    (m,) = read_responses(b, 1)
    assert m.payload == b"\x00"
    lines = _lines(snoop, 4)
    assert [LINE.match(x).group(1, 2, 3, 4) for x in lines] == [
        ("0", "client->server", "7", "29"), ("0", "server->client", "7", "15"),
        ("1", "client->server", "1", "17"), ("1", "server->client", "1", "15")]


def test_decode_fields(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    snoop = procs.start("tcpha.cli.dc_snoop", "-decode", "-listen", f"UNIX:{sockdir}/snoop", "-connect",
                        f"UNIX:{sockdir}/srv", ready=f"UNIX:{sockdir}/snoop")
    c = DistcacheClient(f"UNIX:{sockdir}/snoop", PERSISTENT, timeout=5)
    sid = bytes(range(20))
    assert c.add(sid, b"D" * 100, 300000)
    assert c.add(sid, b"D" * 100, 300000) is False
    assert c.get(sid) == b"D" * 100
    assert c.has(b"nothere") is False
    lines = _lines(snoop, 8)
    extras = [LINE.match(x).group(5) for x in lines]
    hexid = sid[:16].hex() + "..."
    assert extras == [
        f", op=ADD, id={hexid}, data_len=100, timeout=300000ms",
        ", op=ADD, data_len=0, status=OK",
        f", op=ADD, id={hexid}, data_len=100, timeout=300000ms",
        ", op=ADD, data_len=0, status=ADD_MATCHING_SESSION",
        f", op=GET, id={hexid}, data_len=0",
        ", op=GET, data_len=100, status=found",
        f", op=HAVE, id={b'nothere'.hex()}, data_len=0",
        ", op=HAVE, data_len=0, status=NOTOK",
    ]


def test_oversized_frame_drops_only_that_pair(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    procs.start("tcpha.cli.dc_snoop", "-listen", f"UNIX:{sockdir}/snoop", "-connect", f"UNIX:{sockdir}/srv",
                ready=f"UNIX:{sockdir}/snoop")
    bad = unix_connect(sockdir / "snoop")
    bad.sendall(bytes.fromhex("00110000 00 00000001 00 01 01 0801".replace(" ", "")) + b"x" * 2049)
    assert bad.recv(100) == b""
    c = DistcacheClient(f"UNIX:{sockdir}/snoop", 0, timeout=5)
    assert c.has(b"abcdef") is False


def test_oversized_frame_lines_are_the_originals(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv")
    snoop = procs.start("tcpha.cli.dc_snoop", "-listen", f"UNIX:{sockdir}/snoop", "-connect",
                        f"UNIX:{sockdir}/srv")
    bad = unix_connect(sockdir / "snoop")
    bad.sendall(bytes.fromhex("00110000 00 00000001 00 01 01 0003 616263".replace(" ", "")) +
                bytes.fromhex("00110000 00 00000002 00 01 01 0801".replace(" ", "")))
    bad.settimeout(10)
    while bad.recv(100):   # the pair is dropped (an answer to the good frame may come first)
        pass
    assert _lines(snoop, 3) == [
        "SNOOP_DBG_MSG: connection 0, client->server, message completed (request_uid = 1), total_len=17",
        "SNOOP_DBG_MSG: connection 0, client->server, message has illegal 'data_len' (2049)",
        "[TODO: change me] client->server error"]


def test_connection_numbers_count_every_connection(procs, sockdir):
    """Not a reused slot index: a connection after a closed one gets the next number.  (The C dc_snoop
    of the GitHub HEAD exits at its first connection; ours keeps serving.)"""
    procs.server(f"UNIX:{sockdir}/srv")
    snoop = procs.start("tcpha.cli.dc_snoop", "-listen", f"UNIX:{sockdir}/snoop", "-server",
                        f"UNIX:{sockdir}/srv")
    for uid in (5, 6, 7):
        s = unix_connect(sockdir / "snoop")
        s.sendall(bytes.fromhex(f"00110000 00 0000000{uid} 00 03 01 0003 616263".replace(" ", "")))
        (m,) = read_responses(s, 1)
        s.close()
        wait_until(lambda: snoop.p.poll() is None and len(_trace(snoop)) >= 2 * (uid - 4), 10,
                   "the trace of this connection")
    assert [LINE.match(x).group(1, 2, 3) for x in _trace(snoop)] == [
        ("0", "client->server", "5"), ("0", "server->client", "5"),
        ("1", "client->server", "6"), ("1", "server->client", "6"),
        ("2", "client->server", "7"), ("2", "server->client", "7")]


@pytest.mark.parametrize("args, message", [
    (["-listen", "UNIX:/tmp/x"], "Error, must provide -listen and -server"),
    (["-connect"], "Error, --connect requires an argument"),
    (["-bogus"], 'Error, "-bogus" not recognised'),
])
def test_option_errors(procs, args, message):
    r = procs.run("tcpha.cli.dc_snoop", *args)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == message
