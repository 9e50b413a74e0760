"""The messages of the FE<->BE control channel, and their payload encoding.

Each message is a frozen dataclass; its wire payload is its fields in declaration order, each in the
fixed encoding of its kind (``_KINDS``): big-endian integers, IPv4 addresses as 4 bytes, strings as
u16 length + UTF-8, byte strings as u32 length + bytes, rule lists as u16 count + (field, pattern).
A payload must be consumed exactly: trailing bytes are malformed.

Who may send what (checked on receipt by ``ControlConnection``):

=============  ====  ===============================================================
message        from  meaning
=============  ====  ===============================================================
Hello          both  first frame each way: role, node id, random nonce, node facts
Handoff        fe    a connection to restore: flow, peeked length, TcpState bytes
                     (``state == b""`` over a UNIX socket: the socket itself comes
                     with the frame as an SCM_RIGHTS descriptor)
Restored       be    xid restored: the FE may steer the flow and drop its socket
Refused        be    xid not restored (reason): the FE takes the connection back
FlowClosed     be    a handed-off flow ended: remove its steering entry
Ping / Pong    both  liveness and round-trip time (token echoed)
Register       be    dynamic registration (dregister = 1) with the BE's rules
Registered     fe    answer to Register
Unregister     be    the BE leaves (unload/stop): no new handoffs
=============  ====  ===============================================================
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Hello", "Handoff", "Restored", "Refused", "FlowClosed", "Ping", "Pong", "Register",
           "Registered", "Unregister", "Message", "MESSAGE_TYPES", "SENDERS", "encode_payload",
           "decode_payload", "PayloadError"]


class PayloadError(ValueError):
    """A payload that does not decode (or a message that cannot be encoded)."""


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[int] = 1
    role: str = ""            # 'fe' | 'be'; filled in by ControlConnection.send
    node_id: str = ""         # free text for logs: host name, config path...
    nonce: bytes = b""        # 16 random bytes; filled in by ControlConnection.send
    addr: str = "0.0.0.0"     # the sender's raddr
    port: int = 0             # BE: its control port
    mac: str = ""             # BE: MAC address of its LAN interface ("aa:bb:cc:dd:ee:ff"), if known
    app_port: int = 0         # BE: its application port (redirectport), for health checks
    vaddr: str = "0.0.0.0"    # the VIP the sender serves


@dataclass(frozen=True, slots=True)
class Handoff:
    TYPE: ClassVar[int] = 2
    xid: int                  # the FE's id for this handoff, echoed in Restored/Refused
    client_ip: str
    client_port: int
    vip: str
    vport: int
    peeked_len: int           # bytes of request the FE peeked (they are in the receive queue)
    state: bytes              # tcpha.repair.TcpState.to_bytes(); b"" when the fd travels alongside


@dataclass(frozen=True, slots=True)
class Restored:
    TYPE: ClassVar[int] = 3
    xid: int


@dataclass(frozen=True, slots=True)
class Refused:
    TYPE: ClassVar[int] = 4
    xid: int
    reason: str


@dataclass(frozen=True, slots=True)
class FlowClosed:
    TYPE: ClassVar[int] = 5
    client_ip: str
    client_port: int
    vip: str
    vport: int
    bytes_in: int = 0         # bytes received from the client on the BE, where known
    bytes_out: int = 0        # bytes sent to the client by the BE, where known


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[int] = 6
    token: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[int] = 7
    token: int = 0


@dataclass(frozen=True, slots=True)
class Register:
    TYPE: ClassVar[int] = 8
    addr: str                 # the BE's raddr
    port: int                 # its control port
    mac: str = ""
    rules: tuple[tuple[str, str], ...] = ()   # (field, pattern): field 'uri'|'host'|'sni'|'alpn'
    weight: int = 1
    app_port: int = 0


@dataclass(frozen=True, slots=True)
class Registered:
    TYPE: ClassVar[int] = 9
    accepted: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Unregister:
    TYPE: ClassVar[int] = 10
    addr: str
    port: int
    reason: str = ""


Message = Hello | Handoff | Restored | Refused | FlowClosed | Ping | Pong | Register | Registered | Unregister

MESSAGE_TYPES: dict[int, type] = {cls.TYPE: cls for cls in
                                  (Hello, Handoff, Restored, Refused, FlowClosed, Ping, Pong, Register,
                                   Registered, Unregister)}

# Which role may send each message; the receiver refuses anything else (a BE never accepts a
# Restored, a FE never accepts a Handoff: a reflected or misrouted frame is an error, not an action).
SENDERS: dict[type, frozenset[str]] = {
    Hello: frozenset({"fe", "be"}), Ping: frozenset({"fe", "be"}), Pong: frozenset({"fe", "be"}),
    Handoff: frozenset({"fe"}), Registered: frozenset({"fe"}),
    Restored: frozenset({"be"}), Refused: frozenset({"be"}), FlowClosed: frozenset({"be"}),
    Register: frozenset({"be"}), Unregister: frozenset({"be"}),
}

# Field kinds, by field name where the name is not enough to know it.
_IP_FIELDS = {"client_ip", "vip", "addr", "vaddr"}
_U16_FIELDS = {"port", "client_port", "vport", "app_port", "weight"}
_U32_FIELDS = {"peeked_len"}
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _kind(name: str, annotation: str) -> str:
    if name in _IP_FIELDS:
        return "ip"
    if name in _U16_FIELDS:
        return "u16"
    if name in _U32_FIELDS:
        return "u32"
    return {"int": "u64", "str": "str", "bytes": "bytes", "bool": "bool",
            "tuple[tuple[str, str], ...]": "pairs"}[annotation]


_SCHEMAS: dict[type, tuple[tuple[str, str], ...]] = {
    cls: tuple((f.name, _kind(f.name, str(f.type))) for f in dataclasses.fields(cls))
    for cls in MESSAGE_TYPES.values()
}


def _put_str(out: list[bytes], value: str, limit: int = 0xFFFF) -> None:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise PayloadError(f"string of {len(raw)} bytes is too long")
    out.append(_U16.pack(len(raw)))
    out.append(raw)


def encode_payload(msg: Any) -> bytes:
    """The payload bytes of a message; PayloadError if a field does not fit its kind."""
    schema = _SCHEMAS.get(type(msg))
    if schema is None:
        raise PayloadError(f"not a control message: {type(msg).__name__}")
    out: list[bytes] = []
    for name, kind in schema:
        value = getattr(msg, name)
        try:
            if kind == "u64":
                out.append(_U64.pack(value))
            elif kind == "u32":
                out.append(_U32.pack(value))
            elif kind == "u16":
                out.append(_U16.pack(value))
            elif kind == "bool":
                out.append(_U8.pack(1 if value else 0))
            elif kind == "ip":
                out.append(socket.inet_pton(socket.AF_INET, value))
            elif kind == "str":
                _put_str(out, value)
            elif kind == "bytes":
                out.append(_U32.pack(len(value)))
                out.append(bytes(value))
            elif kind == "pairs":
                out.append(_U16.pack(len(value)))
                for first, second in value:
                    _put_str(out, first)
                    _put_str(out, second)
        except (struct.error, OSError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, PayloadError):
                raise PayloadError(f"{type(msg).__name__}.{name}: {exc}") from None
            raise PayloadError(f"{type(msg).__name__}.{name}: cannot encode {value!r}") from None
    return b"".join(out)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise PayloadError("payload ends early")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def string(self) -> str:
        (n,) = _U16.unpack(self.take(2))
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise PayloadError("string is not UTF-8") from None


def decode_payload(type_code: int, payload: memoryview | bytes) -> Any:
    """The message of a type code and payload; PayloadError if it does not decode exactly."""
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        raise PayloadError(f"unknown message type {type_code}")
    reader = _Reader(memoryview(payload))
    values: dict[str, Any] = {}
    for name, kind in _SCHEMAS[cls]:
        if kind == "u64":
            (values[name],) = _U64.unpack(reader.take(8))
        elif kind == "u32":
            (values[name],) = _U32.unpack(reader.take(4))
        elif kind == "u16":
            (values[name],) = _U16.unpack(reader.take(2))
        elif kind == "bool":
            raw = reader.take(1)[0]
            if raw > 1:
                raise PayloadError(f"{cls.__name__}.{name}: bad boolean {raw}")
            values[name] = bool(raw)
        elif kind == "ip":
            values[name] = socket.inet_ntop(socket.AF_INET, reader.take(4))
        elif kind == "str":
            values[name] = reader.string()
        elif kind == "bytes":
            (n,) = _U32.unpack(reader.take(4))
            values[name] = bytes(reader.take(n))
        elif kind == "pairs":
            (n,) = _U16.unpack(reader.take(2))
            values[name] = tuple((reader.string(), reader.string()) for _ in range(n))
    if reader.pos != len(reader.data):
        raise PayloadError(f"{cls.__name__}: {len(reader.data) - reader.pos} bytes after the payload")
    return cls(**values)

