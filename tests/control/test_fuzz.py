"""Fuzzing the control channel: arbitrary bytes never raise anything but ControlError, and any
message survives a round trip."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpha.control import (ControlConnection, ControlError, FlowClosed, Handoff, Hello, Ping, Pong, Refused,
                           Register, Registered, Restored, Steered, Unregister)

KEY = b"k" * 32

ips = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)
u64 = st.integers(0, 2 ** 64 - 1)
text = st.text(max_size=40)

fe_messages = st.one_of(
    st.builds(Handoff, u64, ips, ports, ips, ports, st.integers(0, 2 ** 32 - 1), st.binary(max_size=2000)),
    st.builds(Ping, u64), st.builds(Pong, u64), st.builds(Registered, st.booleans(), text),
    st.builds(Steered, u64))
be_messages = st.one_of(
    st.builds(Restored, u64), st.builds(Refused, u64, text),
    st.builds(FlowClosed, ips, ports, ips, ports, u64, u64, u64), st.builds(Ping, u64), st.builds(Pong, u64),
    st.builds(Register, ips, ports, text, st.lists(st.tuples(text, text), max_size=5).map(tuple),
              ports, ports),
    st.builds(Unregister, ips, ports, text))


def pair() -> tuple[ControlConnection, ControlConnection]:
    fe = ControlConnection(KEY, role="fe")
    be = ControlConnection(KEY, role="be")
    be.feed(fe.send(Hello(node_id="fe")))
    fe.feed(be.send(Hello(node_id="be")))
    return fe, be


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fe_messages, min_size=1, max_size=5), st.lists(be_messages, min_size=1, max_size=5),
       st.integers(1, 64))
def test_round_trips(to_be, to_fe, chunk):
    fe, be = pair()
    stream = b"".join(fe.send(m) for m in to_be)
    got = []
    for i in range(0, len(stream), chunk):
        got += be.feed(stream[i:i + chunk])
    assert got == to_be
    assert fe.feed(b"".join(be.send(m) for m in to_fe)) == to_fe


@settings(max_examples=500)
@given(st.binary(max_size=600), st.booleans())
def test_arbitrary_bytes_only_raise_control_error(data, after_handshake):
    if after_handshake:
        _, be = pair()
    else:
        be = ControlConnection(KEY, role="be")
    try:
        messages = be.feed(data)
        be.feed(b"")
    except ControlError:
        return
    assert messages == []  # without the key, nothing comes out


@settings(max_examples=300)
@given(fe_messages, st.data())
def test_mutated_frames_are_refused(msg, data):
    fe, be = pair()
    frame = bytearray(fe.send(msg))
    positions = data.draw(st.lists(st.integers(0, len(frame) - 1), min_size=1, max_size=4, unique=True))
    for pos in positions:
        frame[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ControlError):
        be.feed(bytes(frame))
        be.feed(b"")


@settings(max_examples=200)
@given(fe_messages, st.binary(min_size=1, max_size=64), st.integers(0, 100))
def test_inserted_or_truncated_bytes_are_refused(msg, junk, cut):
    fe, be = pair()
    frame = fe.send(msg)
    pos = min(cut, len(frame))
    with pytest.raises(ControlError):
        be.feed(frame[:pos] + junk + frame[pos:])
        be.feed(b"")
    fe, be = pair()
    frame = fe.send(msg)
    with pytest.raises(ControlError):
        be.feed(frame[:max(1, len(frame) - 1 - cut)])  # (empty would be a clean EOF)
        be.feed(b"")
