"""Fuzzing (hypothesis): random and mutated frames into the codec, into a running dc_server and
into a running dc_client (both sides); afterwards a well-behaved client must still be served."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import FakeServer, Procs, unix_connect, wait_until  # noqa: E402

from tcpha.distcache.client import DistcacheClient  # noqa: E402
from tcpha.distcache.codec import (MAX_FRAME_DATA, Message, MessageReader, Op, ProtocolError,  # noqa: E402
                                   encode_add_payload, encode_message)

# --- strategies ------------------------------------------------------------------------------

ops = st.sampled_from(list(Op))
payloads = st.one_of(st.binary(max_size=64), st.binary(min_size=2040, max_size=5000))
messages = st.builds(Message, st.booleans(), st.integers(0, 2**32 - 1), ops, payloads)


@st.composite
def valid_requests(draw):
    """A stream of well-formed requests (what a good client would send)."""
    msgs = draw(st.lists(st.builds(Message, st.just(False), st.integers(0, 2**32 - 1), ops, payloads),
                         min_size=1, max_size=4))
    return b"".join(encode_message(m) for m in msgs)


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "header"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        else:
            data[pos % 14 if len(data) > 14 else 0] = draw(st.integers(0, 255))
    return bytes(data)


garbage = st.one_of(st.binary(max_size=300), mutated(valid_requests()))


# --- the codec ------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=6),
       expect=st.booleans())
def test_codec_random_bytes_only_protocol_errors(data, cuts, expect):
    reader = MessageReader(expect_response=expect)
    bounds = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    try:
        for a, b in itertools.pairwise(bounds):
            for m in reader.feed(data[a:b]):
                assert isinstance(m, Message) and len(m.payload) <= 32768
    except ProtocolError:
        pass
    assert reader.pending() <= len(data)


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(messages, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 30000), max_size=8))
def test_codec_round_trip_any_split(msgs, cuts):
    for direction in (False, True):
        same = [Message(direction, m.uid, m.op, m.payload) for m in msgs]
        wire = b"".join(encode_message(m) for m in same)
        bounds = sorted({0, len(wire), *[c % (len(wire) + 1) for c in cuts]})
        reader = MessageReader(expect_response=direction)
        got = []
        for a, b in itertools.pairwise(bounds):
            got += reader.feed(wire[a:b])
        assert got == same and reader.pending() == 0


@settings(max_examples=400, deadline=None)
@given(data=mutated(valid_requests()))
def test_codec_mutated_frames_only_protocol_errors(data):
    reader = MessageReader(expect_response=False)
    try:
        reader.feed(data)
    except ProtocolError:
        pass


# --- running processes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One dc_server and one dc_client in front of it, for the whole module."""
    d = Path(tempfile.mkdtemp(prefix="dcf-", dir="/tmp"))
    group = Procs(tmp_path_factory.mktemp("fuzzlogs"))
    try:
        server = group.server(f"UNIX:{d}/srv", "-sessions", "1000", "-stall", "500")
        agent = group.agent(f"UNIX:{d}/agent", f"UNIX:{d}/srv", args=("-retry", "50"))
        yield d, server, agent
    finally:
        group.stop_all()
        shutil.rmtree(d, ignore_errors=True)


_counter = itertools.count()


def _send_garbage(path: Path, data: bytes) -> None:
    s = unix_connect(path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(2)
        while s.recv(65536):      # whatever comes back until the peer closes or goes quiet
            pass
    except (OSError, socket.timeout):
        pass
    finally:
        s.close()


def _well_behaved(path: Path) -> None:
    c = DistcacheClient(f"UNIX:{path}", 0, timeout=5)
    sid = b"fuzz-check-%d" % next(_counter)
    assert c.add(sid, b"still serving", 60000) is True
    assert c.get(sid) == b"still serving"
    assert c.remove(sid) is True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=garbage)
def test_dc_server_survives_fuzz(running, data):
    d, server, _ = running
    _send_garbage(d / "srv", data)
    assert server.p.poll() is None, server.stderr()
    _well_behaved(d / "srv")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=garbage)
def test_dc_client_survives_fuzz(running, data):
    d, _, agent = running
    _send_garbage(d / "agent", data)
    assert agent.p.poll() is None, agent.stderr()
    # The agent's upstream may be reconnecting if garbage reached the server through it.
    wait_until(lambda: _works(d / "agent"), 10, "a good request through the agent")


def _works(path: Path) -> bool:
    try:
        _well_behaved(path)
        return True
    except Exception:
        return False


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(min_size=1, max_size=200),
                      mutated(st.builds(lambda u: encode_message(Message(True, u, Op.GET, b"x" * 10)),
                                        st.integers(1, 5)))))
def test_dc_client_survives_garbage_from_upstream(tmp_path_factory, data):
    """The upstream answers with garbage: the agent drops that connection, answers [2] or an
    empty payload, reconnects, and is still alive."""
    d = Path(tempfile.mkdtemp(prefix="dcg-", dir="/tmp"))
    group = Procs(tmp_path_factory.mktemp("garbage"))

    def policy(i, m):
        if m.payload == b"agent-probe":
            return b"\x01"
        up.conns[i].sendall(data)
        return None
    up = FakeServer(str(d / "up"), policy=policy)
    try:
        agent = group.agent(f"UNIX:{d}/agent", up.address, args=("-retry", "20", "-upstream-timeout", "300"))
        s = unix_connect(d / "agent")
        s.sendall(encode_message(Message(False, 9, Op.GET, b"abcdefgh")))
        s.settimeout(0.5)
        try:
            s.recv(65536)           # a garbage-derived answer, [2], or nothing: all acceptable
        except socket.timeout:
            pass
        s.close()
        assert agent.p.poll() is None, agent.stderr()
        c = DistcacheClient(f"UNIX:{d}/agent", 0, timeout=5)
        wait_until(lambda: _probe(c), 10, "the agent to answer again")
    finally:
        group.stop_all()
        up.close()
        shutil.rmtree(d, ignore_errors=True)


def _probe(c: DistcacheClient) -> bool:
    try:
        return c.has(b"agent-probe") is False
    except Exception:
        return False


def test_add_payload_helper_is_used_by_clients():
    # Sanity: the clients' ADD bytes are the notes' example.
    assert encode_message(Message(False, 7, Op.ADD, encode_add_payload(b"abc", b"DATA", 300000))) == \
        bytes.fromhex("0011000000000000070000010" "00f000493e000000003616263" "44415441")
    assert MAX_FRAME_DATA == 2048
