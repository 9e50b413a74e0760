"""The PROXY protocol header (versions 1 and 2), encoded without I/O.

A back end that relays a client's connection to the application writes this header first on the
application connection, before any byte of the client's, so that the application (nginx
`listen ... proxy_protocol`, HAProxy `accept-proxy`, ...) learns the client's address and port and the
address and port the client connected to (the VIP). The format is HAProxy's (proxy-protocol.txt):

- version 1: one text line, ``PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\\r\\n`` (``TCP6`` for
  IPv6; ``PROXY UNKNOWN\\r\\n`` when the addresses are not known), at most 107 bytes;
- version 2: a binary header: the 12-byte signature, a version/command byte (0x21: version 2, PROXY;
  0x20: LOCAL), the family/transport byte (0x11 TCP over IPv4, 0x21 TCP over IPv6; 0x00 with LOCAL), the
  length of what follows (16 bits, network order), then the source and destination addresses and the
  source and destination ports, all in network order.

Only what a TCP relay needs: no TLVs, no UDP or UNIX families. `proxy_header(version, client, server)`
is the one entry point; `parse_v1`/`parse_v2` read a header back (tests, and anyone checking a capture).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["V2_SIGNATURE", "ProxyHeader", "ProxyProtocolError", "proxy_header", "v1_header", "v2_header",
           "parse_v1", "parse_v2", "VERSIONS"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSIONS = ("v1", "v2")

_V2_PROXY = 0x21            # version 2 (high nibble), command PROXY (low nibble)
_V2_LOCAL = 0x20            # version 2, command LOCAL (health checks: no addresses)
_V2_TCP4 = 0x11             # AF_INET (high nibble), STREAM (low nibble)
_V2_TCP6 = 0x21             # AF_INET6, STREAM
_V2_UNSPEC = 0x00
_V1_MAX = 107               # the longest v1 line, CRLF included (proxy-protocol.txt, 2.1)


class ProxyProtocolError(ValueError):
    """An address the header cannot carry, or a header that is not a valid PROXY header."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a header says: the connection's source (the client) and destination (the address it reached);
    None for both in a v1 UNKNOWN or a v2 LOCAL header."""
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def _addresses(client: tuple[str, int], server: tuple[str, int]) -> tuple[int, ipaddress.IPv4Address |
                                                                        ipaddress.IPv6Address, int,
                                                                        ipaddress.IPv4Address |
                                                                        ipaddress.IPv6Address, int]:
    try:
        src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    except ValueError as e:
        raise ProxyProtocolError(str(e)) from None
    if src.version != dst.version:
        # An IPv4-mapped peer on an IPv6 socket is written as IPv4 (what it is on the wire).
        src = getattr(src, "ipv4_mapped", None) or src
        dst = getattr(dst, "ipv4_mapped", None) or dst
        if src.version != dst.version:
            raise ProxyProtocolError(f"source {client[0]} and destination {server[0]} are not of one family")
    for port in (client[1], server[1]):
        if not 0 <= int(port) <= 65535:
            raise ProxyProtocolError(f"port {port} out of range")
    return src.version, src, int(client[1]), dst, int(server[1])


def v1_header(client: tuple[str, int] | None, server: tuple[str, int] | None) -> bytes:
    """The version 1 line for a TCP connection from `client` to `server`; `PROXY UNKNOWN` when either is
    None."""
    if client is None or server is None:
        return b"PROXY UNKNOWN\r\n"
    version, src, sport, dst, dport = _addresses(client, server)
    proto = "TCP4" if version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def v2_header(client: tuple[str, int] | None, server: tuple[str, int] | None) -> bytes:
    """The version 2 binary header for a TCP connection from `client` to `server`; a LOCAL header (no
    addresses) when either is None."""
    if client is None or server is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _V2_UNSPEC, 0)
    version, src, sport, dst, dport = _addresses(client, server)
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    family = _V2_TCP4 if version == 4 else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def proxy_header(version: str, client: tuple[str, int] | None, server: tuple[str, int] | None) -> bytes:
    """The header of `version` ("v1" or "v2") for a connection from `client` to `server`."""
    if version == "v1":
        return v1_header(client, server)
    if version == "v2":
        return v2_header(client, server)
    raise ProxyProtocolError(f"PROXY protocol version must be one of {', '.join(VERSIONS)}, not {version!r}")


def parse_v1(data: bytes) -> tuple[ProxyHeader, int]:
    """(header, its length in bytes) from the start of `data`; ProxyProtocolError if it is not one."""
    end = data.find(b"\r\n", 0, _V1_MAX)
    if not data.startswith(b"PROXY ") or end < 0:
        raise ProxyProtocolError("not a PROXY protocol v1 line")
    fields = data[:end].decode("ascii", "replace").split(" ")
    if fields[1] == "UNKNOWN":
        return ProxyHeader(None, None), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line {data[:end]!r}")
    try:
        src, dst = ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3])
        sport, dport = int(fields[4]), int(fields[5])
    except ValueError as e:
        raise ProxyProtocolError(f"malformed PROXY v1 line: {e}") from None
    return ProxyHeader((str(src), sport), (str(dst), dport)), end + 2


def parse_v2(data: bytes) -> tuple[ProxyHeader, int]:
    """(header, its length in bytes) from the start of `data`; ProxyProtocolError if it is not one."""
    if len(data) < 16 or not data.startswith(V2_SIGNATURE):
        raise ProxyProtocolError("not a PROXY protocol v2 header")
    ver_cmd, family, length = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2 or len(data) < 16 + length:
        raise ProxyProtocolError("truncated or not version 2")
    if ver_cmd == _V2_LOCAL:
        return ProxyHeader(None, None), 16 + length
    if family == _V2_TCP4 and length >= 12:
        size = 4
    elif family == _V2_TCP6 and length >= 36:
        size = 16
    else:
        raise ProxyProtocolError(f"PROXY v2 family 0x{family:02x} with length {length} not supported")
    src = ipaddress.ip_address(data[16:16 + size])
    dst = ipaddress.ip_address(data[16 + size:16 + 2 * size])
    sport, dport = struct.unpack_from("!HH", data, 16 + 2 * size)
    return ProxyHeader((str(src), sport), (str(dst), dport)), 16 + length
