"""The control channel: round trips, and every way a frame must be refused."""

from __future__ import annotations

import hmac
import struct

import pytest

from tcpha.control import (HELLO_MAX, ControlConnection, ControlError, FlowClosed, Handoff, Hello,
                           PayloadError, Ping, Pong, Refused, Register, Registered, Restored, Steered,
                           Unregister)
from tcpha.control.messages import encode_payload
from tcpha.control.protocol import MAC_SIZE, VERSION, _mac, _MacKey

KEY = b"0123456789abcdef" * 4
OTHER_KEY = b"fedcba9876543210" * 4

HANDOFF = Handoff(xid=7, client_ip="10.77.0.2", client_port=40000, vip="10.77.0.100", vport=80,
                  peeked_len=78, state=b"\x01state" * 100)
FE_MESSAGES = [HANDOFF, Ping(1), Pong(2), Registered(True), Registered(False, "no rules"), Steered(7)]
BE_MESSAGES = [Restored(7), Refused(8, "address 10.77.0.99 is not my VIP"),
               FlowClosed("10.77.0.2", 40000, "10.77.0.100", 80, bytes_in=10, bytes_out=2 ** 40),
               Ping(3), Pong(2 ** 64 - 1),
               Register("10.77.0.11", 666, "02:00:00:00:00:0b", (("uri", "jpg$"), ("sni", "^a\\.b$")), 2, 8080),
               Unregister("10.77.0.11", 666, "unload")]


def pair(fe_key: bytes = KEY, be_key: bytes = KEY) -> tuple[ControlConnection, ControlConnection]:
    fe = ControlConnection(fe_key, role="fe")
    be = ControlConnection(be_key, role="be")
    [be_hello] = be.feed(fe.send(Hello(node_id="fe1", addr="10.77.0.10", vaddr="10.77.0.100")))
    [fe_hello] = fe.feed(be.send(Hello(node_id="be1", addr="10.77.0.11", port=666, app_port=8080)))
    assert be_hello.role == "fe" and fe_hello.role == "be"
    return fe, be


def raw_frame(conn: ControlConnection, type_code: int, payload: bytes, *, version: int = VERSION,
              seq: int | None = None) -> bytes:
    """A frame with a valid MAC around an arbitrary payload (what a buggy peer holding the key sends)."""
    seq = conn._send_seq if seq is None else seq
    conn._send_seq += 1
    length = 10 + len(payload) + MAC_SIZE
    head = struct.pack(">IBBQ", length, version, type_code, seq)
    return head + payload + _mac(conn._send_key, head, payload)


# -- round trips -----------------------------------------------------------------------------

def test_hello_carries_node_facts():
    fe = ControlConnection(KEY, role="fe")
    be = ControlConnection(KEY, role="be")
    [hello] = fe.feed(be.send(Hello(node_id="be1", addr="10.77.0.11", port=666, mac="02:00:00:00:00:0b",
                                    app_port=8080, vaddr="10.77.0.100")))
    assert (hello.role, hello.node_id, hello.addr, hello.port, hello.mac, hello.app_port, hello.vaddr) == \
        ("be", "be1", "10.77.0.11", 666, "02:00:00:00:00:0b", 8080, "10.77.0.100")
    assert hello.nonce == be.nonce and len(hello.nonce) == 16
    assert not fe.ready and not fe.authenticated   # a Hello alone authenticates nothing
    fe.send(Hello())
    assert fe.ready


@pytest.mark.parametrize("msg", FE_MESSAGES, ids=lambda m: type(m).__name__)
def test_fe_to_be_round_trip(msg):
    fe, be = pair()
    assert be.feed(fe.send(msg)) == [msg]
    assert be.authenticated


@pytest.mark.parametrize("msg", BE_MESSAGES, ids=lambda m: type(m).__name__)
def test_be_to_fe_round_trip(msg):
    fe, be = pair()
    assert fe.feed(be.send(msg)) == [msg]


def test_byte_by_byte_and_batched():
    fe, be = pair()
    stream = b"".join(fe.send(m) for m in FE_MESSAGES)
    got = []
    for i in range(len(stream)):
        got += be.feed(stream[i:i + 1])
    assert got == FE_MESSAGES and be.pending() == 0
    stream = b"".join(be.send(m) for m in BE_MESSAGES)
    assert fe.feed(stream) == BE_MESSAGES


def test_large_handoff_state():
    fe, be = pair()
    msg = Handoff(1, "10.77.0.2", 1, "10.77.0.100", 443, 517, bytes(range(256)) * 20000)  # 5 MB
    assert be.feed(fe.send(msg)) == [msg]


def test_empty_state_means_fd_passing():
    fe, be = pair()
    msg = Handoff(1, "10.77.0.2", 1, "10.77.0.100", 80, 0, b"")
    assert be.feed(fe.send(msg)) == [msg]


# -- refusals --------------------------------------------------------------------------------

def test_wrong_key_fails_at_the_hello():
    fe = ControlConnection(KEY, role="fe")
    be = ControlConnection(OTHER_KEY, role="be")
    with pytest.raises(ControlError, match="bad MAC on the peer's Hello"):
        be.feed(fe.send(Hello()))


def test_wrong_key_after_hello_is_refused():
    # Even with a Hello accepted (say, replayed from a real FE), data under another key fails.
    fe, be = pair()
    forger = ControlConnection(OTHER_KEY, role="fe", nonce=fe.nonce)
    forger._hello_sent = True
    forger._send_seq = 1
    forger._accept_hello(fe.peer_hello)
    with pytest.raises(ControlError, match="bad MAC on frame 1"):
        be.feed(forger.send(HANDOFF))


def test_every_tampered_byte_is_refused():
    fe, be = pair()
    frame = fe.send(Ping(5))
    for i in range(len(frame)):
        for flip in (0x01, 0x80):
            probe = ControlConnection(KEY, role="be", nonce=be.nonce)
            probe._hello_sent = True
            probe._accept_hello(be.peer_hello)
            probe._recv_seq = be._recv_seq
            tampered = bytearray(frame)
            tampered[i] ^= flip
            with pytest.raises(ControlError):
                probe.feed(bytes(tampered))
                probe.feed(b"")  # a length grown by the flip leaves a frame half-received
    assert be.feed(frame) == [Ping(5)]  # the untouched frame is fine


def test_replayed_frame_is_refused():
    fe, be = pair()
    frame = fe.send(HANDOFF)
    assert be.feed(frame) == [HANDOFF]
    with pytest.raises(ControlError, match=r"replayed frame \(sequence 1, expected 2\)"):
        be.feed(frame)


def test_reordered_frames_are_refused():
    fe, be = pair()
    first, second = fe.send(Ping(1)), fe.send(Ping(2))
    with pytest.raises(ControlError, match=r"out of order \(sequence 2, expected 1\)"):
        be.feed(second + first)


def test_dropped_frame_is_detected():
    fe, be = pair()
    fe.send(Ping(1))  # never delivered
    with pytest.raises(ControlError, match="out of order"):
        be.feed(fe.send(HANDOFF))


def test_frame_from_another_connection_is_refused():
    fe1, be1 = pair()
    recorded = fe1.send(HANDOFF)
    fe2, be2 = pair()
    with pytest.raises(ControlError, match="bad MAC on frame 1"):
        be2.feed(recorded)


def test_replayed_session_never_yields_a_handoff():
    # An attacker who recorded a whole FE->BE session replays it to a fresh back end.
    fe = ControlConnection(KEY, role="fe")
    be = ControlConnection(KEY, role="be")
    recorded = fe.send(Hello())
    fe.feed(be.send(Hello()))
    recorded += fe.send(HANDOFF)
    victim = ControlConnection(KEY, role="be")
    victim.send(Hello())
    with pytest.raises(ControlError, match="bad MAC on frame 1"):
        victim.feed(recorded)
    assert not victim.authenticated


def test_reflected_frames_are_refused():
    fe, be = pair()
    # A BE's own Hello sent back to it claims the wrong role (and its MAC key is the FE's).
    lone = ControlConnection(KEY, role="be")
    hello = lone.send(Hello())
    with pytest.raises(ControlError):
        lone.feed(hello)
    # A FE frame sent back to the FE does not verify under the BE->FE key.
    frame = fe.send(HANDOFF)
    with pytest.raises(ControlError, match="bad MAC"):
        fe.feed(frame)


def test_echoed_nonce_is_refused():
    be = ControlConnection(KEY, role="be")
    fe = ControlConnection(KEY, role="fe", nonce=be.nonce)
    with pytest.raises(ControlError, match="nonce equals ours"):
        be.feed(fe.send(Hello()))


@pytest.mark.parametrize("msg, receiver", [(HANDOFF, "fe"), (Restored(1), "be"), (Register("10.0.0.1", 1), "be"),
                                           (Registered(True), "fe"), (FlowClosed("1.2.3.4", 1, "1.2.3.5", 80), "be"),
                                           (Steered(1), "fe")])
def test_message_from_the_wrong_role_is_refused(msg, receiver):
    fe, be = pair()
    sender, target = (be, fe) if receiver == "fe" else (fe, be)
    with pytest.raises(ValueError):
        sender.send(msg)  # the API refuses to send it...
    frame = raw_frame(sender, msg.TYPE, encode_payload(msg))
    with pytest.raises(ControlError, match=f"may not send {type(msg).__name__}"):
        target.feed(frame)  # ...and a peer that sends it anyway is refused


def test_data_before_hello_and_second_hello():
    fe = ControlConnection(KEY, role="fe")
    be = ControlConnection(KEY, role="be")
    with pytest.raises(RuntimeError, match="send a Hello first"):
        fe.send(HANDOFF)
    fe.send(Hello())
    with pytest.raises(RuntimeError, match="peer's Hello has not arrived"):
        fe.send(HANDOFF)
    with pytest.raises(RuntimeError, match="already sent"):
        fe.send(Hello())
    # A data frame where the Hello should be: signed with the Hello key it still is not a Hello.
    bogus = ControlConnection(KEY, role="fe")
    bogus._send_key = bogus._hello_send_key
    bogus._hello_sent = True
    with pytest.raises(ControlError, match="expected the peer's Hello first"):
        be.feed(bogus.send(Ping(1)))


def test_second_hello_is_refused():
    fe, be = pair()
    frame = raw_frame(fe, Hello.TYPE, encode_payload(
        Hello(role="fe", nonce=fe.nonce)))
    with pytest.raises(ControlError, match="second Hello"):
        be.feed(frame)


@pytest.mark.parametrize("type_code, payload, fragment", [
    (99, b"", "unknown message type 99"),
    (Ping.TYPE, b"\x00" * 7, "payload ends early"),
    (Ping.TYPE, b"\x00" * 9, "1 bytes after the payload"),
    (Refused.TYPE, b"\x00" * 8 + b"\x00\x02\xff\xfe", "not UTF-8"),
    (Registered.TYPE, b"\x02\x00\x00", "bad boolean 2"),
    (Handoff.TYPE, b"\x00" * 8 + b"\x0a\x00\x00\x02\x00\x01\x0a\x00\x00\x64\x00\x50" + b"\x00\x00\x00\x00"
     + b"\xff\xff\xff\xff", "payload ends early"),
])
def test_malformed_payloads_with_valid_mac(type_code, payload, fragment):
    fe, be = pair()
    with pytest.raises(ControlError, match=f"malformed frame 1: .*{fragment}"):
        be.feed(raw_frame(fe, type_code, payload))


def test_unknown_version_is_refused():
    fe, be = pair()
    with pytest.raises(ControlError, match="unsupported control protocol version 2"):
        be.feed(raw_frame(fe, Ping.TYPE, b"\x00" * 8, version=2))


def test_truncated_frame():
    fe, be = pair()
    frame = fe.send(HANDOFF)
    assert be.feed(frame[:-1]) == [] and be.pending() == len(frame) - 1
    with pytest.raises(ControlError, match="closed in the middle of a frame"):
        be.feed(b"")  # EOF
    fe2, be2 = pair()
    assert be2.feed(b"") == []  # a clean EOF between frames is no error


def test_oversize_is_refused_from_the_length_alone():
    fe = ControlConnection(KEY, role="fe", max_message=1024)
    be = ControlConnection(KEY, role="be", max_message=1024)
    be.feed(fe.send(Hello()))
    fe.feed(be.send(Hello()))
    with pytest.raises(PayloadError, match="exceeds the 1024-byte limit"):
        fe.send(Handoff(1, "1.2.3.4", 1, "1.2.3.5", 80, 0, b"x" * 2000))
    with pytest.raises(ControlError, match="frame of 1025 bytes exceeds the 1024-byte limit"):
        be.feed(struct.pack(">I", 1025))   # four bytes are enough: nothing more is buffered


def test_before_the_hello_the_limit_is_small():
    be = ControlConnection(KEY, role="be")
    with pytest.raises(ControlError, match=f"exceeds the {HELLO_MAX}-byte limit"):
        be.feed(struct.pack(">I", HELLO_MAX + 1))


def test_runt_frame_is_refused():
    be = ControlConnection(KEY, role="be")
    with pytest.raises(ControlError, match="shorter than a header and MAC"):
        be.feed(struct.pack(">I", 10) + b"\x00" * 10)


def test_errors_are_sticky():
    fe, be = pair()
    frame = fe.send(Ping(1))
    with pytest.raises(ControlError):
        be.feed(b"\x00" * 4 + frame)
    with pytest.raises(ControlError, match="failed earlier"):
        be.feed(frame)


def test_messages_before_a_bad_frame_are_not_returned():
    fe, be = pair()
    good = fe.send(HANDOFF)
    bad = bytearray(fe.send(Ping(1)))
    bad[-1] ^= 1
    with pytest.raises(ControlError):
        be.feed(good + bytes(bad))


def test_unencodable_messages():
    fe, be = pair()
    with pytest.raises(PayloadError, match="client_ip"):
        fe.send(Handoff(1, "not-an-ip", 1, "1.2.3.4", 80, 0, b""))
    with pytest.raises(PayloadError, match="client_port"):
        fe.send(Handoff(1, "1.2.3.4", 70000, "1.2.3.4", 80, 0, b""))
    with pytest.raises(ValueError):
        ControlConnection(KEY, role="lb")
    with pytest.raises(ValueError):
        ControlConnection(b"", role="fe")


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 200])
def test_frame_mac_is_hmac_sha256(key_len):
    """The MAC computed from precomputed pad states is RFC 2104 HMAC-SHA256, for every key length
    (a key longer than the block is hashed first) and for data given in parts or as a view."""
    key = bytes((i * 7 + 3) & 0xFF for i in range(key_len))
    for data in (b"", b"x", bytes(range(256)) * 3):
        expected = hmac.digest(key, data, "sha256")
        assert _MacKey(key).digest(data) == expected
        assert _MacKey(key).digest(memoryview(data)) == expected
        assert _mac(_MacKey(key), data[:5], data[5:]) == expected
