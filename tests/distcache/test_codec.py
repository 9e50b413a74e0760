"""The sans-I/O codec against distcache-protocol.md, byte for byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from tcpha.distcache.codec import (FRAME_HEADER, MAX_FRAME_DATA, MAX_MESSAGE, PROTO_LEVEL, Message,
                                   MessageReader, Op, ProtocolError, Status, check_add_payload,
                                   decode_add_payload, encode_add_payload, encode_message,
                                   encode_response)

HAVE_ABC = bytes.fromhex("00110000 00 00000001 00 03 01 0003 616263".replace(" ", ""))
ADD_ABC = bytes.fromhex("00110000 00 00000007 00 00 01 000f 000493e0 00000003 616263 44415441".replace(" ", ""))
ADD_OK = bytes.fromhex("00110000 01 00000007 00 00 01 0001 00".replace(" ", ""))


def frame(*, level=PROTO_LEVEL, resp=0, uid=1, op_class=0, op=1, complete=1, data=b"", dlen=None):
    return FRAME_HEADER.pack(level, resp, uid, op_class, op, complete,
                             len(data) if dlen is None else dlen) + data


def test_examples_encode_exactly():
    assert encode_message(Message(False, 1, Op.HAVE, b"abc")) == HAVE_ABC
    payload = encode_add_payload(b"abc", b"DATA", 300000)
    assert encode_message(Message(False, 7, Op.ADD, payload)) == ADD_ABC
    assert encode_message(Message(True, 7, Op.ADD, b"\x00")) == ADD_OK
    assert encode_response(7, Op.ADD, b"\x00") == ADD_OK


def test_examples_decode_exactly():
    server = MessageReader(expect_response=False)
    got = server.feed(ADD_ABC + HAVE_ABC)
    assert got == [Message(False, 7, Op.ADD, bytes.fromhex("000493e00000000361626344415441")),
                   Message(False, 1, Op.HAVE, b"abc")]
    assert check_add_payload(got[0].payload) == (Status.OK, b"abc", b"DATA", 300000)
    client = MessageReader(expect_response=True)
    assert client.feed(ADD_OK) == [Message(True, 7, Op.ADD, b"\x00")]


def test_empty_payload_is_one_frame():
    assert encode_message(Message(False, 5, Op.GET, b"")) == frame(uid=5, op=1, data=b"")


@pytest.mark.parametrize("size,frames", [(2047, 1), (2048, 1), (2049, 2), (4096, 2), (4097, 3),
                                         (MAX_MESSAGE, 16)])
def test_multi_frame_layout(size, frames):
    payload = bytes(i % 251 for i in range(size))
    wire = encode_message(Message(True, 0xDEADBEEF, Op.GET, payload))
    pos, seen, got = 0, 0, b""
    while pos < len(wire):
        level, resp, uid, op_class, op, complete, dlen = FRAME_HEADER.unpack_from(wire, pos)
        seen += 1
        assert (level, resp, uid, op_class, op) == (PROTO_LEVEL, 1, 0xDEADBEEF, 0, 1)
        last = pos + 14 + dlen == len(wire)
        assert complete == (1 if last else 0)
        if not last:
            assert dlen == MAX_FRAME_DATA          # non-final frames carry exactly 2048 bytes
        got += wire[pos + 14:pos + 14 + dlen]
        pos += 14 + dlen
    assert seen == frames and got == payload
    assert MessageReader(expect_response=True).feed(wire) == [Message(True, 0xDEADBEEF, Op.GET, payload)]


def test_encode_refuses_over_long():
    with pytest.raises(ValueError):
        encode_message(Message(True, 1, Op.GET, b"x" * (MAX_MESSAGE + 1)))


def test_byte_by_byte_and_pending():
    wire = ADD_ABC + encode_message(Message(False, 9, Op.GET, b"k" * 5000)) + HAVE_ABC
    reader = MessageReader(expect_response=False)
    out = []
    for i in range(len(wire)):
        out += reader.feed(wire[i:i + 1])
        if i + 1 < len(ADD_ABC):
            assert reader.pending() == i + 1
    assert [m.uid for m in out] == [7, 9, 1]
    assert out[1].payload == b"k" * 5000
    assert reader.pending() == 0


def test_any_0011_level_accepted():
    reader = MessageReader(expect_response=False)
    assert reader.feed(frame(level=0x0011FFFF, data=b"id"))[0].payload == b"id"
    assert reader.feed(frame(level=0x00110001, data=b"id2"))[0].payload == b"id2"


@pytest.mark.parametrize("bad,reason", [
    (frame(level=0x00120000, data=b"x"), "version"),
    (frame(level=0x00100000, data=b"x"), "version"),
    (frame(resp=1, data=b"x"), "direction"),
    (frame(resp=2, data=b"x"), "corrupt"),
    (frame(op_class=1, data=b"x"), "corrupt"),
    (frame(op=4, data=b"x"), "corrupt"),
    (frame(complete=2, data=b"x"), "corrupt"),
    (frame(dlen=2049), "corrupt"),
    (frame(complete=0, data=b"x" * 100), "corrupt"),     # non-final frame must be 2048 bytes
])
def test_bad_frames_rejected_from_header_alone(bad, reason):
    reader = MessageReader(expect_response=False)
    with pytest.raises(ProtocolError) as info:
        reader.feed(bad[:14])      # the header is enough: no waiting for the payload
    assert info.value.reason == reason
    with pytest.raises(ProtocolError):    # the stream stays failed
        reader.feed(HAVE_ABC)


def test_client_rejects_requests():
    with pytest.raises(ProtocolError) as info:
        MessageReader(expect_response=True).feed(HAVE_ABC)
    assert info.value.reason == "direction"


def test_seventeen_frames_is_too_long():
    wire = b"".join(frame(uid=3, op=1, complete=0, data=b"z" * 2048) for _ in range(16))
    reader = MessageReader(expect_response=False)
    with pytest.raises(ProtocolError) as info:
        reader.feed(wire + frame(uid=3, op=1, data=b"end"))
    assert info.value.reason == "too-long"


def test_sixteen_frames_accepted():
    wire = b"".join(frame(uid=3, op=1, complete=0, data=b"z" * 2048) for _ in range(15))
    wire += frame(uid=3, op=1, complete=1, data=b"z" * 2048)
    (msg,) = MessageReader(expect_response=False).feed(wire)
    assert len(msg.payload) == MAX_MESSAGE


@pytest.mark.parametrize("uid,op", [(4, 1), (3, 2)])
def test_continuation_must_repeat_uid_and_op(uid, op):
    wire = frame(uid=3, op=1, complete=0, data=b"a" * 2048) + frame(uid=uid, op=op, data=b"b")
    with pytest.raises(ProtocolError) as info:
        MessageReader(expect_response=False).feed(wire)
    assert info.value.reason == "interleaved"


def test_messages_before_error_are_kept_on_the_exception():
    reader = MessageReader(expect_response=False)
    with pytest.raises(ProtocolError) as info:
        reader.feed(HAVE_ABC + ADD_ABC + frame(op=9))
    assert [m.uid for m in info.value.messages] == [1, 7]


# --- ADD payload checks, in the notes' order ------------------------------------------------------

def add(timeout, id_len, rest):
    return struct.pack(">II", timeout, id_len) + rest


@pytest.mark.parametrize("payload,status", [
    (add(604800000, 3, b"abcD"), Status.OK),
    (add(0, 3, b"abcD"), Status.OK),                            # no minimum timeout
    (add(604800001, 3, b"abcD"), Status.ADD_TIMEOUT_RANGE),
    (add(604800001, 99, b""), Status.ADD_TIMEOUT_RANGE),        # timeout checked first
    (add(1000, 3, b"abc"), Status.ADD_CORRUPT),                  # id_len == remaining: no data byte
    (add(1000, 5, b"abc"), Status.ADD_CORRUPT),
    (add(1000, 0, b"abc"), Status.ADD_ID_RANGE),
    (add(1000, 65, b"i" * 65 + b"d"), Status.ADD_ID_RANGE),
    (add(1000, 64, b"i" * 64 + b"d"), Status.OK),
    (add(1000, 1, b"i" + b"d" * 32768), Status.OK),
    (add(1000, 1, b"i" + b"d" * 32769), Status.ADD_DATA_RANGE),
    (add(1000, 200, b"x"), Status.ADD_CORRUPT),                  # corrupt before id range
])
def test_add_payload_statuses(payload, status):
    assert check_add_payload(payload)[0] == status


def test_add_payload_under_8_bytes_closes():
    for n in range(8):
        with pytest.raises(ProtocolError):
            check_add_payload(b"\x00" * n)


def test_decode_add_payload():
    req = decode_add_payload(encode_add_payload(b"sid", b"data", 42))
    assert (req.session_id, req.data, req.timeout_ms) == (b"sid", b"data", 42)
    with pytest.raises(ProtocolError):
        decode_add_payload(struct.pack(">II", 1, 10) + b"abc")


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.sampled_from(list(Op)),
                               st.binary(max_size=6000)), max_size=5),
       cuts=st.lists(st.integers(1, 3000), max_size=10))
def test_round_trip_any_split(msgs, cuts):
    wire = b"".join(encode_message(Message(True, u, o, p)) for u, o, p in msgs)
    reader = MessageReader(expect_response=True)
    out, pos = [], 0
    for c in cuts:
        out += reader.feed(wire[pos:pos + c])
        pos += c
    out += reader.feed(wire[pos:])
    assert [(m.uid, m.op, m.payload) for m in out] == list(msgs)
    assert reader.pending() == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(blob):
    reader = MessageReader(expect_response=False)
    try:
        for m in reader.feed(blob):
            assert isinstance(m, Message)
    except ProtocolError:
        pass
    assert reader.pending() <= len(blob)


def test_parse_single_request_fast_path():
    from tcpha.distcache.codec import parse_single_request
    assert parse_single_request(HAVE_ABC) == (1, 3, b"abc")
    for bad in (HAVE_ABC[:-1], HAVE_ABC + b"x", frame(level=0x00120000, data=b"x"), frame(resp=1, data=b"x"),
                frame(op_class=1, data=b"x"), frame(op=4, data=b"x"), frame(complete=0, data=b"x" * 2048),
                frame(dlen=4000) + b"x" * 4000, ADD_ABC + HAVE_ABC):
        assert parse_single_request(bad) is None


@settings(max_examples=500, deadline=None)
@given(header=st.tuples(st.sampled_from([PROTO_LEVEL, 0x0011ABCD, 0x00120000]), st.integers(0, 2),
                        st.integers(0, 0xFFFFFFFF), st.integers(0, 1), st.integers(0, 5), st.integers(0, 2)),
       data=st.binary(max_size=2100), dlen_delta=st.integers(-2, 2))
def test_parse_single_request_agrees_with_reader(header, data, dlen_delta):
    """Whenever the fast path accepts, MessageReader yields exactly the same single message."""
    from tcpha.distcache.codec import parse_single_request
    level, resp, uid, op_class, op, complete = header
    wire = FRAME_HEADER.pack(level, resp, uid, op_class, op, complete, max(0, len(data) + dlen_delta)) + data
    fast = parse_single_request(wire)
    if fast is None:
        return
    assert MessageReader(expect_response=False).feed(wire) == [Message(False, fast[0], Op(fast[1]), fast[2])]
