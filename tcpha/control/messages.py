"""The messages of the FE<->BE control channel, and their payload encoding.

Each message is a frozen dataclass; its wire payload is its fields in declaration order, each in the
fixed encoding of its kind (``_KINDS``): big-endian integers, IPv4 addresses as 4 bytes, strings as
u16 length + UTF-8, byte strings as u32 length + bytes, rule lists as u16 count + (field, pattern).
A payload must be consumed exactly: trailing bytes are malformed. The one exception is a message's
``OPTIONAL_TAIL``: fields added at its end after version 1 of the protocol, which an older peer does
not send; a payload that ends where they begin decodes with their defaults.

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
FlowClosed     be    a handed-off flow ended (xid: the handoff that brought it): remove
                     its steering entry, unless the entry now holds another handoff
Ping / Pong    both  liveness and round-trip time (token echoed)
Register       be    dynamic registration (dregister = 1) with the BE's rules
Registered     fe    answer to Register
Unregister     be    the BE leaves (unload/stop): no new handoffs
Steered        fe    xid's flow is now steered to the BE: it may send to the client
                     (until then the client's ACKs would be dropped by the FE's freeze)
Rules          fe    rehandoff: the uri/host rules in order, and for each whether a request
                     it matches stays on this back end (among its targets, or a rule that
                     does not move connections); empty: none moves (after Hello, at reloads)
MoveAsk        be    xid's next request goes elsewhere by the rules, at a response
                     boundary: freeze the flow (docs/kernel.md "Moving a keep-alive ...")
MoveFrozen     fe    xid's flow is frozen: dump it and send it back
MoveRefused    fe    xid is not moved (reason): the BE keeps the connection
Moved          be    xid's connection: TcpState bytes with the held request in front of
                     the receive queue; state == b"": not moved (reason), the BE kept it
=============  ====  ===============================================================
"""

from __future__ import annotations

import dataclasses
import operator
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Hello", "Handoff", "Restored", "Refused", "FlowClosed", "Ping", "Pong", "Register",
           "Registered", "Unregister", "Steered", "Rules", "MoveAsk", "MoveFrozen", "MoveRefused", "Moved",
           "Message", "MESSAGE_TYPES", "SENDERS", "encode_payload",
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
    # xid came later: a back end of an earlier version sends none (decoded as 0: "any handoff").
    OPTIONAL_TAIL: ClassVar[tuple[str, ...]] = ("xid",)
    client_ip: str
    client_port: int
    vip: str
    vport: int
    bytes_in: int = 0         # bytes received from the client on the BE, where known
    bytes_out: int = 0        # bytes sent to the client by the BE, where known
    xid: int = 0              # the Handoff's xid; 0: unknown (the front end removes the entry anyway)


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[int] = 6
    token: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[int] = 7
    # A back end's TLS session cache counters (lookups of offered sessions, and those resumed), for the
    # front end's status page; later than token, so absent from older peers and omitted while both are
    # 0 (see encode_payload): a back end without shared TLS sessions sends the Pong it always sent.
    OPTIONAL_TAIL: ClassVar[tuple[str, ...]] = ("session_lookups", "session_hits")
    token: int = 0
    session_lookups: int = 0
    session_hits: int = 0


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


@dataclass(frozen=True, slots=True)
class Steered:
    TYPE: ClassVar[int] = 11
    xid: int


@dataclass(frozen=True, slots=True)
class Rules:
    TYPE: ClassVar[int] = 12
    rules: tuple[tuple[str, str], ...] = ()   # (field, pattern) in order: field 'uri'|'host'
    here: bytes = b""         # one byte per rule: 1 when its requests stay on the receiving back end


@dataclass(frozen=True, slots=True)
class MoveAsk:
    TYPE: ClassVar[int] = 13
    xid: int                  # the handoff that brought the connection here
    client_ip: str
    client_port: int
    vip: str
    vport: int


@dataclass(frozen=True, slots=True)
class MoveFrozen:
    TYPE: ClassVar[int] = 14
    xid: int


@dataclass(frozen=True, slots=True)
class MoveRefused:
    TYPE: ClassVar[int] = 15
    xid: int
    reason: str


@dataclass(frozen=True, slots=True)
class Moved:
    TYPE: ClassVar[int] = 16
    xid: int
    state: bytes              # tcpha.repair.TcpState.to_bytes(), held request in front; b"": not moved
    reason: str = ""          # why not, when state is empty


Message = (Hello | Handoff | Restored | Refused | FlowClosed | Ping | Pong | Register | Registered | Unregister
           | Steered | Rules | MoveAsk | MoveFrozen | MoveRefused | Moved)

MESSAGE_TYPES: dict[int, type] = {cls.TYPE: cls for cls in
                                  (Hello, Handoff, Restored, Refused, FlowClosed, Ping, Pong, Register,
                                   Registered, Unregister, Steered, Rules, MoveAsk, MoveFrozen, MoveRefused,
                                   Moved)}

# Which role may send each message; the receiver refuses anything else (a BE never accepts a
# Restored, a FE never accepts a Handoff: a reflected or misrouted frame is an error, not an action).
SENDERS: dict[type, frozenset[str]] = {
    Hello: frozenset({"fe", "be"}), Ping: frozenset({"fe", "be"}), Pong: frozenset({"fe", "be"}),
    Handoff: frozenset({"fe"}), Registered: frozenset({"fe"}), Steered: frozenset({"fe"}),
    Restored: frozenset({"be"}), Refused: frozenset({"be"}), FlowClosed: frozenset({"be"}),
    Register: frozenset({"be"}), Unregister: frozenset({"be"}),
    Rules: frozenset({"fe"}), MoveFrozen: frozenset({"fe"}), MoveRefused: frozenset({"fe"}),
    MoveAsk: frozenset({"be"}), Moved: frozenset({"be"}),
}

# Field kinds, by field name where the name is not enough to know it.
_IP_FIELDS = {"client_ip", "vip", "addr", "vaddr"}
_U16_FIELDS = {"port", "client_port", "vport", "app_port", "weight"}
_U32_FIELDS = {"peeked_len"}
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# Fixed-size kinds and their struct codes; consecutive fixed fields are packed with one Struct.
_FIXED = {"u64": "Q", "u32": "I", "u16": "H", "bool": "B", "ip": "4s"}


def _kind(name: str, annotation: str) -> str:
    if name in _IP_FIELDS:
        return "ip"
    if name in _U16_FIELDS:
        return "u16"
    if name in _U32_FIELDS:
        return "u32"
    return {"int": "u64", "str": "str", "bytes": "bytes", "bool": "bool",
            "tuple[tuple[str, str], ...]": "pairs"}[annotation]


@dataclass(frozen=True)
class _Segment:
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    fixed: struct.Struct | None   # None: one variable-length field (str, bytes, pairs)
    optional: bool = False        # part of the message's OPTIONAL_TAIL: may be absent at the payload's end
    # Worked out once here, not per message (the handoff path encodes and decodes four frames a handoff):
    get: Any = None               # operator.attrgetter of the names (a tuple of values when several)
    ips: tuple[int, ...] = ()     # positions of the "ip" kinds in a fixed segment
    bools: tuple[int, ...] = ()   # positions of the "bool" kinds
    label: str = ""               # "Class.name/name" for error messages


def _segment(cls: type, names: tuple[str, ...], kinds: tuple[str, ...], fixed: struct.Struct | None,
             optional: bool) -> _Segment:
    return _Segment(names, kinds, fixed, optional, operator.attrgetter(*names),
                    tuple(i for i, k in enumerate(kinds) if k == "ip"),
                    tuple(i for i, k in enumerate(kinds) if k == "bool"), f"{cls.__name__}.{'/'.join(names)}")


def _segments(cls: type) -> tuple[_Segment, ...]:
    segments: list[_Segment] = []
    run: list[tuple[str, str]] = []
    optional_tail = getattr(cls, "OPTIONAL_TAIL", ())
    names = [f.name for f in dataclasses.fields(cls)]
    if optional_tail and tuple(names[-len(optional_tail):]) != tuple(optional_tail):
        raise TypeError(f"{cls.__name__}.OPTIONAL_TAIL must be its last fields")

    def flush() -> None:
        if run:
            fmt = ">" + "".join(_FIXED[kind] for _, kind in run)
            segments.append(_segment(cls, tuple(n for n, _ in run), tuple(k for _, k in run), struct.Struct(fmt),
                                     run[0][0] in optional_tail))
            run.clear()

    for f in dataclasses.fields(cls):
        kind = _kind(f.name, str(f.type))
        if f.name in optional_tail:
            flush()       # each optional field its own segment: it is there or not as a whole
            segments.append(_segment(cls, (f.name,), (kind,), struct.Struct(">" + _FIXED[kind]) if kind in _FIXED
                                     else None, True))
        elif kind in _FIXED:
            run.append((f.name, kind))
        else:
            flush()
            segments.append(_segment(cls, (f.name,), (kind,), None, False))
    flush()
    return tuple(segments)


_SCHEMAS: dict[type, tuple[_Segment, ...]] = {cls: _segments(cls) for cls in MESSAGE_TYPES.values()}
_DEFAULTS: dict[type, dict[str, Any]] = {cls: {f.name: f.default for f in dataclasses.fields(cls)}
                                         for cls in MESSAGE_TYPES.values()}
# Per type code: the class and its schema (one lookup per decoded frame).
_DECODERS: dict[int, tuple[type, tuple[_Segment, ...]]] = {code: (cls, _SCHEMAS[cls])
                                                            for code, cls in MESSAGE_TYPES.items()}
# A message made of fixed-size fields only, none of them optional, IP or bool (Restored, Steered, Ping):
# its whole payload is one struct.
_PLAIN: dict[type, _Segment] = {cls: schema[0] for cls, schema in _SCHEMAS.items()
                                if len(schema) == 1 and schema[0].fixed is not None and not schema[0].optional
                                     and not schema[0].ips and not schema[0].bools}
_AF_INET = socket.AF_INET
_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop


def _put_str(out: list[bytes], value: str) -> None:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise PayloadError(f"string of {len(raw)} bytes is too long")
    out.append(_U16.pack(len(raw)))
    out.append(raw)


def encode_payload(msg: Any) -> bytes:
    """The payload bytes of a message; PayloadError if a field does not fit its kind."""
    cls = type(msg)
    plain = _PLAIN.get(cls)
    if plain is not None:
        try:
            if len(plain.names) == 1:
                return plain.fixed.pack(plain.get(msg))
            return plain.fixed.pack(*plain.get(msg))
        except (struct.error, TypeError, AttributeError, ValueError):
            pass          # the general path below says what does not fit
    schema = _SCHEMAS.get(cls)
    if schema is None:
        raise PayloadError(f"not a control message: {cls.__name__}")
    out: list[bytes] = []
    # Optional tail fields still at their defaults at the end are left out: the message is then exactly
    # what a peer that predates them sends and expects (its decoder wants the payload's exact length).
    if schema[-1].optional:
        defaults = _DEFAULTS[cls]
        while schema and schema[-1].optional and all(getattr(msg, n) == defaults[n] for n in schema[-1].names):
            schema = schema[:-1]
    for seg in schema:
        try:
            fixed = seg.fixed
            if fixed is not None:
                values = seg.get(msg)
                if len(seg.names) == 1:
                    values = [values]
                elif seg.ips or seg.bools:
                    values = list(values)
                for i in seg.ips:
                    values[i] = _inet_pton(_AF_INET, values[i])
                for i in seg.bools:
                    values[i] = 1 if values[i] else 0
                out.append(fixed.pack(*values))
                continue
            kind = seg.kinds[0]
            value = seg.get(msg)
            if kind == "str":
                _put_str(out, value)
            elif kind == "bytes":
                out.append(_U32.pack(len(value)))
                out.append(bytes(value))
            else:  # pairs
                out.append(_U16.pack(len(value)))
                for first, second in value:
                    _put_str(out, first)
                    _put_str(out, second)
        except PayloadError as exc:
            raise PayloadError(f"{seg.label}: {exc}") from None
        except (struct.error, OSError, TypeError, AttributeError, ValueError):
            shown = {n: getattr(msg, n, None) for n in seg.names}
            raise PayloadError(f"{seg.label}: cannot encode {shown!r}") from None
    return b"".join(out)


def _take_str(data: memoryview, pos: int) -> tuple[str, int]:
    if pos + 2 > len(data):
        raise PayloadError("payload ends early")
    (n,) = _U16.unpack_from(data, pos)
    end = pos + 2 + n
    if end > len(data):
        raise PayloadError("payload ends early")
    try:
        return str(data[pos + 2:end], "utf-8"), end
    except UnicodeDecodeError:
        raise PayloadError("string is not UTF-8") from None


def decode_payload(type_code: int, payload: memoryview | bytes) -> Any:
    """The message of a type code and payload; PayloadError if it does not decode exactly."""
    found = _DECODERS.get(type_code)
    if found is None:
        raise PayloadError(f"unknown message type {type_code}")
    cls, schema = found
    data = memoryview(payload)
    size = len(data)
    pos = 0
    values: list[Any] = []      # in field order: the fields of an absent optional tail keep their defaults
    for seg in schema:
        if seg.optional and pos == size:
            break         # an older peer's message: the optional tail keeps its defaults
        fixed = seg.fixed
        if fixed is not None:
            end = pos + fixed.size
            if end > size:
                raise PayloadError("payload ends early")
            raw = fixed.unpack_from(data, pos)
            if seg.ips or seg.bools:
                raw = list(raw)
                for i in seg.ips:
                    raw[i] = _inet_ntop(_AF_INET, raw[i])
                for i in seg.bools:
                    if raw[i] > 1:
                        raise PayloadError(f"{cls.__name__}.{seg.names[i]}: bad boolean {raw[i]}")
                    raw[i] = bool(raw[i])
            values += raw
            pos = end
            continue
        kind = seg.kinds[0]
        if kind == "str":
            value, pos = _take_str(data, pos)
            values.append(value)
        elif kind == "bytes":
            if pos + 4 > size:
                raise PayloadError("payload ends early")
            (n,) = _U32.unpack_from(data, pos)
            if pos + 4 + n > size:
                raise PayloadError("payload ends early")
            values.append(bytes(data[pos + 4:pos + 4 + n]))
            pos += 4 + n
        else:  # pairs
            if pos + 2 > size:
                raise PayloadError("payload ends early")
            (count,) = _U16.unpack_from(data, pos)
            pos += 2
            pairs = []
            for _ in range(count):
                first, pos = _take_str(data, pos)
                second, pos = _take_str(data, pos)
                pairs.append((first, second))
            values.append(tuple(pairs))
    if pos != size:
        raise PayloadError(f"{cls.__name__}: {size - pos} bytes after the payload")
    return cls(*values)
