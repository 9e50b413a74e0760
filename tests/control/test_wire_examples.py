"""Fixed wire examples of the FE<->BE control protocol: bytes written down once, by hand-checked layout.

The round-trip tests (test_protocol.py, test_fuzz.py) pass whatever the encoding is, as long as both
sides change together; these fail when either the encoder or the decoder moves away from the bytes a
deployed peer of another version sends or expects. A failure here is a protocol change: bump VERSION
or add the field as an OPTIONAL_TAIL, and say so in docs/operations.md (Reload and upgrade).
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from tcpha.control import (ControlConnection, FlowClosed, Handoff, Hello, MoveAsk, Moved, MoveFrozen, MoveRefused,
                           Ping, Pong, Refused, Register, Registered, Restored, Rules, Steered, Unregister)
from tcpha.control.messages import decode_payload, encode_payload

XID = 0x1234_0000_0001

# (message, payload hex), field by field: u64/u32/u16 big-endian, IPv4 as 4 bytes, str as u16 length +
# UTF-8, bytes as u32 length + bytes, rules as u16 count + (str, str).
PAYLOADS = [
    (Hello(role="fe", node_id="fe1", nonce=bytes(range(16)), addr="10.77.0.10", vaddr="10.77.0.100"),
     "0002" "6665" "0003" "666531" "00000010" "000102030405060708090a0b0c0d0e0f"
     "0a4d000a" "0000" "0000" "0000" "0a4d0064"),
    (Hello(role="be", node_id="be1", nonce=bytes(range(16, 32)), addr="10.77.0.11", port=8009,
           mac="02:00:00:00:00:0b", app_port=8080, vaddr="10.77.0.100"),
     "0002" "6265" "0003" "626531" "00000010" "101112131415161718191a1b1c1d1e1f"
     "0a4d000b" "1f49" "0011" "30323a30303a30303a30303a30303a3062" "1f90" "0a4d0064"),
    (Handoff(xid=XID, client_ip="10.77.0.2", client_port=40000, vip="10.77.0.100", vport=80, peeked_len=18,
             state=b"\x01\x02\x03"),
     "0000123400000001" "0a4d0002" "9c40" "0a4d0064" "0050" "00000012" "00000003" "010203"),
    (Restored(xid=XID), "0000123400000001"),
    (Refused(xid=XID, reason="busy"), "0000123400000001" "0004" "62757379"),
    (FlowClosed("10.77.0.2", 40000, "10.77.0.100", 80, bytes_in=18, bytes_out=1024, xid=XID),
     "0a4d0002" "9c40" "0a4d0064" "0050" "0000000000000012" "0000000000000400" "0000123400000001"),
    (Ping(token=7), "0000000000000007"),
    (Pong(token=7), "0000000000000007"),                          # no TLS counters: the Pong of old
    (Pong(token=7, session_lookups=3, session_hits=2), "0000000000000007" "0000000000000003" "0000000000000002"),
    (Pong(token=7, session_lookups=3), "0000000000000007" "0000000000000003"),   # trailing zero left out
    (Register(addr="10.77.0.11", port=8009, mac="02:00:00:00:00:0b", rules=(("uri", "jpg$"),), weight=2,
              app_port=8080),
     "0a4d000b" "1f49" "0011" "30323a30303a30303a30303a30303a3062" "0001" "0003" "757269" "0004" "6a706724"
     "0002" "1f90"),
    (Registered(accepted=True), "01" "0000"),
    (Registered(accepted=False, reason="no"), "00" "0002" "6e6f"),
    (Unregister(addr="10.77.0.11", port=8009, reason="stop"), "0a4d000b" "1f49" "0004" "73746f70"),
    (Steered(xid=XID), "0000123400000001"),
    (Rules(rules=(("uri", "jpg$"), ("host", ".")), here=b"\x01\x00"),
     "0002" "0003" "757269" "0004" "6a706724" "0004" "686f7374" "0001" "2e" "00000002" "0100"),
    (MoveAsk(xid=XID, client_ip="10.77.0.2", client_port=40000, vip="10.77.0.100", vport=80),
     "0000123400000001" "0a4d0002" "9c40" "0a4d0064" "0050"),
    (MoveFrozen(xid=XID), "0000123400000001"),
    (MoveRefused(xid=XID, reason="off"), "0000123400000001" "0003" "6f6666"),
    (Moved(xid=XID, state=b"\x01\x02"), "0000123400000001" "00000002" "0102" "0000"),
]


@pytest.mark.parametrize("msg,payload", PAYLOADS, ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_payload_bytes(msg, payload):
    assert encode_payload(msg).hex() == payload
    assert decode_payload(msg.TYPE, bytes.fromhex(payload)) == msg


def test_every_message_type_has_a_fixed_example():
    from tcpha.control import MESSAGE_TYPES
    assert {type(m) for m, _ in PAYLOADS} == set(MESSAGE_TYPES.values())


def test_flow_closed_of_a_back_end_without_handoff_ids_decodes_with_xid_0():
    """A version-1 back end's FlowClosed ends after bytes_out: still accepted (mixed-version upgrade)."""
    old = "0a4d0002" "9c40" "0a4d0064" "0050" "0000000000000012" "0000000000000400"
    assert decode_payload(FlowClosed.TYPE, bytes.fromhex(old)) == FlowClosed(
        "10.77.0.2", 40000, "10.77.0.100", 80, bytes_in=18, bytes_out=1024, xid=0)


# A whole session: both Hellos, then every message, in order, under one key and fixed nonces. Each frame:
# u32 length | u8 version 1 | u8 type | u64 seq | payload | HMAC-SHA256.
KEY = b"tcpha wire example key 32 bytes!"
FE_NONCE, BE_NONCE = bytes(range(16)), bytes(range(16, 32))
SESSION = [
    ("fe", Hello(node_id="fe1", addr="10.77.0.10", vaddr="10.77.0.100"),
     "00000055" "01" "01" "0000000000000000"
     "00026665000366653100000010000102030405060708090a0b0c0d0e0f0a4d000a0000000000000a4d0064"
     "d823c9e96e77be14369e52ff596b80ace91522e84ebb221fa2f6ee64b6434005"),
    ("be", Hello(node_id="be1", addr="10.77.0.11", port=8009, mac="02:00:00:00:00:0b", app_port=8080,
                 vaddr="10.77.0.100"),
     "00000066" "01" "01" "0000000000000000"
     "00026265000362653100000010101112131415161718191a1b1c1d1e1f0a4d000b1f49001130323a30303a30303a30303a"
     "30303a30621f900a4d0064"
     "6126440e2f0958921817f1a9ad3c62f430d113b7618bf449b2a6cd2330a95fd5"),
    ("fe", Handoff(xid=XID, client_ip="10.77.0.2", client_port=40000, vip="10.77.0.100", vport=80,
                   peeked_len=18, state=b"\x01\x02\x03"),
     "00000049" "01" "02" "0000000000000001"
     "00001234000000010a4d00029c400a4d0064005000000012000000030102037fa9d03e84832a25c880224c07345df0d8b1ff"
     "b7bf9755bf1138916676a5fc80"),
    ("be", Restored(xid=XID),
     "00000032" "01" "03" "0000000000000001" "0000123400000001"
     "ae37f4f4936b94baf8be965db59576606f667d6e608fb1f1c89186631de472bc"),
    ("fe", Steered(xid=XID),
     "00000032" "01" "0b" "0000000000000002" "0000123400000001"
     "ddff975a84b23286eabdd31912e1e673a653ba49717893f87b6e88363063c58e"),
    ("be", FlowClosed("10.77.0.2", 40000, "10.77.0.100", 80, bytes_in=18, bytes_out=1024, xid=XID),
     "0000004e" "01" "05" "0000000000000002"
     "0a4d00029c400a4d00640050000000000000001200000000000004000000123400000001"
     "7cbee23092e93e6a61fb7b8726999f386f91c4ff72242d076d5c59c4d965a260"),
    ("be", Refused(xid=XID + 1, reason="busy"),
     "00000038" "01" "04" "0000000000000003" "0000123400000002000462757379"
     "24ddfd5a1e3a029e5727c5dfb7deffea2665249d56fcea7a9d849007582e2760"),
    ("fe", Ping(token=7),
     "00000032" "01" "06" "0000000000000003" "0000000000000007"
     "d3fa42587860ca7d3c36efe7e6072f49f435482fc31f4a0bd6b2a66d58e78762"),
    ("be", Pong(token=7),
     "00000032" "01" "07" "0000000000000004" "0000000000000007"
     "11e0077f2d85841a3d8cb2d827a4d0e9b99c6c6ce5040569206b9403b8f75461"),
    ("be", Register(addr="10.77.0.11", port=8009, mac="02:00:00:00:00:0b", rules=(("uri", "jpg$"),), weight=2,
                    app_port=8080),
     "00000054" "01" "08" "0000000000000005"
     "0a4d000b1f49001130323a30303a30303a30303a30303a30620001000375726900046a70672400021f90"
     "80af7b680930c34c2ffc1beb60362207d3d04e30caf4d1ee40480e0062a39e7d"),
    ("fe", Registered(accepted=True),
     "0000002d" "01" "09" "0000000000000004" "010000"
     "ecba140dd2226500e27ad11fa0a64b1c13f55219f9ff049bbe839776ad7ebc41"),
    ("be", Unregister(addr="10.77.0.11", port=8009, reason="stop"),
     "00000036" "01" "0a" "0000000000000006" "0a4d000b1f49000473746f70"
     "b4c81f3281d1f0fac3fb473ecca7830210c56ec4841f36e79f057d62a3f770f8"),
    ("be", Ping(token=8),
     "00000032" "01" "06" "0000000000000007" "0000000000000008"
     "87e78aa40fb856b4122fed1bec734af8ee18dd7bdb04fd8bfba3f1882eec2a7f"),
    ("fe", Pong(token=8),
     "00000032" "01" "07" "0000000000000005" "0000000000000008"
     "d157136287dea9756758df8c2e65ea6f78d4efc15e820bc80be8bae774ac3bbe"),
]


def _filled(msg):
    """A Hello as received: role and nonce filled in by the sender's connection."""
    if isinstance(msg, Hello):
        return Hello(**{**{f: getattr(msg, f) for f in msg.__slots__},
                        "role": "fe" if msg.node_id == "fe1" else "be",
                        "nonce": FE_NONCE if msg.node_id == "fe1" else BE_NONCE})
    return msg


def test_session_frames_encode_and_decode_to_the_written_bytes():
    fe = ControlConnection(KEY, role="fe", nonce=FE_NONCE)
    be = ControlConnection(KEY, role="be", nonce=BE_NONCE)
    for sender, msg, frame in SESSION:
        ours, theirs = (fe, be) if sender == "fe" else (be, fe)
        assert ours.send(msg).hex() == frame, f"{sender} {type(msg).__name__}: encoded differently"
        assert theirs.feed(bytes.fromhex(frame)) == [_filled(msg)], f"{sender} {type(msg).__name__}"


def test_session_macs_follow_the_documented_key_derivation():
    """The MACs above, recomputed from the rules in tcpha/control/protocol.py (R2, R3) with hmac alone."""
    def derive(*parts: bytes) -> bytes:
        return hmac.digest(KEY, b"".join(parts), "sha256")
    keys = {("hello", "fe"): derive(b"tcpha-control/1 hello fe"), ("hello", "be"): derive(b"tcpha-control/1 hello be"),
            ("data", "fe"): derive(b"tcpha-control/1 data fe", FE_NONCE, BE_NONCE),
            ("data", "be"): derive(b"tcpha-control/1 data be", BE_NONCE, FE_NONCE)}
    for sender, msg, frame in SESSION:
        raw = bytes.fromhex(frame)
        assert int.from_bytes(raw[:4], "big") == len(raw) - 4
        key = keys[("hello" if isinstance(msg, Hello) else "data", sender)]
        assert hmac.new(key, raw[:-32], hashlib.sha256).digest() == raw[-32:], type(msg).__name__
