"""Sans-I/O parser for a TLS ClientHello, run by the front end on bytes it peeked (MSG_PEEK).

The front end routes TLS connections before the handshake and never holds a key, so all it may read is the
ClientHello, which is sent in the clear: the server name (SNI, RFC 6066 §3), the offered application protocols
(ALPN, RFC 7301 §3.1) and the offered versions (supported_versions, RFC 8446 §4.2.1).

* Records (RFC 8446 §5.1) are reassembled: a ClientHello may be fragmented over several handshake records and the
  records over several TCP segments; :data:`NeedMore` is returned until the whole message is in the buffer.
* Every length is checked against its enclosing length and against the RFC's bounds; anything malformed,
  truncated inside a complete message, or longer than ``max_size`` raises :class:`TlsHelloError` (a
  ``ValueError``). No other exception leaves this module, whatever the bytes (fuzzed in tests/sniff/).
* GREASE values (RFC 8701) are dropped from ``versions`` and ``alpn``: they mean nothing by definition.
* SSLv2-format ClientHellos (first byte 0x80) are not TLS here: obsolete (RFC 6176), refused by current OpenSSL.

Why hand-written: no maintained Python library parses a ClientHello from raw bytes without I/O (scapy's TLS layer
does, but it is far too slow and heavy for a per-connection path, and it tolerates what we must refuse).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .incomplete import NeedMore

__all__ = ["NeedMore", "TlsHelloError", "ClientHello", "looks_like_tls", "parse_client_hello",
           "alert_record", "HANDSHAKE_FAILURE_ALERT", "RECORD_HEADER_LEN"]

# RFC 8446 §5.1: ContentType values, record header size, maximum plaintext fragment length.
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
RECORD_HEADER_LEN = 5
MAX_FRAGMENT = 2 ** 14
# RFC 8446 §4: HandshakeType client_hello(1); §4.2: ExtensionType values we read.
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_PRE_SHARED_KEY = 41
EXT_SUPPORTED_VERSIONS = 43
NAME_TYPE_HOST_NAME = 0
_PRINTABLE_ASCII = re.compile(rb"[\x21-\x7e]+")


class TlsHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello (or it is longer than allowed); ``str(e)`` says why."""


@dataclass(slots=True)
class ClientHello:
    sni: str | None            # host_name from server_name, lower case, without a trailing dot; None if absent
    alpn: list[str]            # offered ALPN protocol ids in client order (bytes decoded as latin-1), GREASE dropped
    versions: list[int]        # supported_versions (GREASE dropped) or, without it, [legacy_version]
    length: int                # bytes of the buffer taken by the records that carry the ClientHello
    legacy_version: int = 0    # ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3 clients)
    extensions: list[int] = field(default_factory=list)   # extension types in the order sent


def looks_like_tls(buf: bytes) -> bool:
    """True when the connection's first byte is a TLS handshake record's content type (22, RFC 8446 §5.1).

    One byte is enough to decide: an HTTP request starts with a method token (RFC 9110 §9), and 0x16 is never a
    token character, so the two protocols cannot be confused. Everything after it is judged by
    :func:`parse_client_hello`.
    """
    return len(buf) > 0 and buf[0] == CONTENT_HANDSHAKE


def _is_grease(value: int) -> bool:
    """RFC 8701 §2: the reserved 16-bit values are 0x0A0A, 0x1A1A, ..., 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


class _Reader:
    """A bounds-checked cursor over one complete structure: running out of bytes is a malformed message."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise TlsHelloError(f"ClientHello truncated in {what}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, len_size: int, low: int, high: int, what: str) -> _Reader:
        """RFC 8446 §3.4: a variable-length vector <low..high> with a ``len_size``-byte length prefix."""
        length = self.uint(len_size, f"{what} length")
        if not low <= length <= high:
            raise TlsHelloError(f"{what} length {length} outside <{low}..{high}>")
        if length > self.end - self.pos:
            raise TlsHelloError(f"{what} length {length} runs past its enclosing structure")
        sub = _Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return sub


def parse_client_hello(buf: bytes, max_size: int) -> ClientHello | type[NeedMore]:
    """Parse the ClientHello at the start of ``buf`` (the first bytes a TLS client sends).

    Returns :data:`NeedMore` while ``buf`` is a valid prefix of a ClientHello that fits in ``max_size`` bytes,
    a :class:`ClientHello` once it is complete, and raises :class:`TlsHelloError` as soon as the bytes seen are
    certain not to be one. Bytes after the records carrying the ClientHello are ignored.
    """
    buf = bytes(buf)
    fragments: list[bytes] = []
    have = 0                  # handshake-layer bytes collected so far
    need: int | None = None   # 4-byte handshake header + body length, once the header has arrived
    pos = 0
    while need is None or have < need:
        header = buf[pos:pos + RECORD_HEADER_LEN]
        _check_record_header(header, first=pos == 0)
        if len(header) < RECORD_HEADER_LEN:
            if pos + RECORD_HEADER_LEN > max_size:
                raise TlsHelloError(f"ClientHello longer than {max_size} bytes")
            return NeedMore
        record_len = int.from_bytes(header[3:5], "big")
        end = pos + RECORD_HEADER_LEN + record_len
        if end > max_size:
            raise TlsHelloError(f"ClientHello longer than {max_size} bytes")
        fragment = buf[pos + RECORD_HEADER_LEN:end]
        if need is None:
            # Judge the handshake header (RFC 8446 §4) as soon as its bytes show, even from a partial record.
            need = _check_handshake_header(b"".join(fragments) + fragment, max_size)
        if end > len(buf):
            return NeedMore
        fragments.append(fragment)
        have += record_len
        pos = end
    if have > need:
        # The client must wait for the ServerHello before sending any other handshake message (RFC 8446 §4.1.1,
        # RFC 5246 §7.3), so the record carrying the end of the ClientHello cannot carry anything else.
        raise TlsHelloError("handshake data after the ClientHello in the same record")
    body = b"".join(fragments)[4:need]
    return _parse_body(body, pos)


def _check_record_header(header: bytes, *, first: bool) -> None:
    """RFC 8446 §5.1 TLSPlaintext: type(1) legacy_record_version(2) length(2); checks whatever bytes are present."""
    if len(header) >= 1 and header[0] != CONTENT_HANDSHAKE:
        if first:
            raise TlsHelloError(f"not a TLS handshake record (content type {header[0]})")
        # "Handshake messages MUST NOT be interleaved with other record types."
        raise TlsHelloError(f"record of content type {header[0]} inside the ClientHello")
    if len(header) >= 2 and header[1] != 3:
        raise TlsHelloError(f"record version major {header[1]} is not 3")
    if len(header) >= 5:
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            # "Implementations MUST NOT send zero-length fragments of Handshake types".
            raise TlsHelloError("zero-length handshake record")
        if length > MAX_FRAGMENT:
            # "The length MUST NOT exceed 2^14 bytes" (record_overflow).
            raise TlsHelloError(f"record length {length} exceeds 2^14")


def _check_handshake_header(prefix: bytes, max_size: int) -> int | None:
    """Return 4 + the ClientHello length once the 4-byte handshake header is in ``prefix``, else None."""
    if len(prefix) >= 1 and prefix[0] != HANDSHAKE_CLIENT_HELLO:
        raise TlsHelloError(f"first handshake message is type {prefix[0]}, not ClientHello")
    if len(prefix) < 4:
        return None
    need = 4 + int.from_bytes(prefix[1:4], "big")
    if need + RECORD_HEADER_LEN > max_size:
        raise TlsHelloError(f"ClientHello longer than {max_size} bytes")
    return need


def _parse_body(body: bytes, length: int) -> ClientHello:
    """RFC 8446 §4.1.2 (and RFC 5246 §7.4.1.2 for TLS ≤ 1.2 clients) ClientHello structure."""
    r = _Reader(body)
    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise TlsHelloError(f"legacy_version 0x{legacy_version:04x} is not TLS")
    r.take(32, "random")
    r.vector(1, 0, 32, "legacy_session_id")
    suites = r.vector(2, 2, 2 ** 16 - 2, "cipher_suites")
    if suites.remaining() % 2:
        raise TlsHelloError("cipher_suites length is odd")
    r.vector(1, 1, 2 ** 8 - 1, "legacy_compression_methods")
    hello = ClientHello(sni=None, alpn=[], versions=[legacy_version], length=length, legacy_version=legacy_version)
    if r.remaining() == 0:
        return hello  # RFC 5246 §7.4.1.2: a TLS ≤ 1.2 client may send no extensions block at all
    # TLS 1.3 says <8..2^16-1>, but a TLS 1.2 hello may carry an empty block: accept <0..2^16-1>.
    extensions = r.vector(2, 0, 2 ** 16 - 1, "extensions")
    if r.remaining():
        raise TlsHelloError("bytes after the extensions block")
    # The extension loop is the hot path (a dozen or more extensions per hello): read the 4-byte headers inline
    # rather than through _Reader, with the same bounds checks.
    data, pos, end = body, extensions.pos, extensions.end
    seen: set[int] = set()
    while pos < end:
        if end - pos < 4:
            raise TlsHelloError("ClientHello truncated in extension header")
        ext_type = (data[pos] << 8) | data[pos + 1]
        ext_end = pos + 4 + ((data[pos + 2] << 8) | data[pos + 3])
        if ext_end > end:
            raise TlsHelloError(f"extension {ext_type} length runs past its enclosing structure")
        if ext_type in seen:
            # RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type in a given extension block."
            raise TlsHelloError(f"extension {ext_type} appears twice")
        if EXT_PRE_SHARED_KEY in seen:
            # RFC 8446 §4.2.11: pre_shared_key "MUST be the last extension in the ClientHello".
            raise TlsHelloError("pre_shared_key is not the last extension")
        seen.add(ext_type)
        hello.extensions.append(ext_type)
        if ext_type == EXT_SERVER_NAME:
            hello.sni = _server_name(_Reader(data, pos + 4, ext_end))
        elif ext_type == EXT_ALPN:
            hello.alpn = _alpn(_Reader(data, pos + 4, ext_end))
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            hello.versions = _supported_versions(_Reader(data, pos + 4, ext_end))
        pos = ext_end
    return hello


def _server_name(data: _Reader) -> str:
    """RFC 6066 §3: ServerName server_name_list<1..2^16-1>; ServerName = NameType name_type (host_name(0)) +
    HostName<1..2^16-1>. Other name types have never been defined; their entries are read with the same shape."""
    names = data.vector(2, 1, 2 ** 16 - 1, "server_name_list")
    if data.remaining():
        raise TlsHelloError("bytes after server_name_list")
    host: bytes | None = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        entry = names.vector(2, 1, 2 ** 16 - 1, "server name")
        name = entry.take(entry.remaining(), "server name")
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            # "The ServerNameList MUST NOT contain more than one name of the same name_type."
            raise TlsHelloError("more than one host_name in server_name")
        host = name
    if host is None:
        raise TlsHelloError("server_name without a host_name")
    # "HostName contains the fully qualified DNS hostname of the server ... represented as a byte string using
    # ASCII encoding without a trailing dot". We refuse non-printable bytes (they could reach logs), tolerate a
    # trailing dot (removed) and lower-case the name (DNS names are case-insensitive, RFC 4343).
    if _PRINTABLE_ASCII.fullmatch(host) is None:
        raise TlsHelloError("server name is not printable ASCII")
    text = host.decode("ascii").lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise TlsHelloError("empty server name")
    return text


def _alpn(data: _Reader) -> list[str]:
    """RFC 7301 §3.1: ProtocolName protocol_name_list<2..2^16-1>; ProtocolName = opaque<1..2^8-1>."""
    names = data.vector(2, 2, 2 ** 16 - 1, "protocol_name_list")
    if data.remaining():
        raise TlsHelloError("bytes after protocol_name_list")
    protocols = []
    while names.remaining():
        # "Empty strings MUST NOT be included": the vector lower bound 1 enforces it.
        name = names.vector(1, 1, 2 ** 8 - 1, "protocol name")
        value = name.take(name.remaining(), "protocol name")
        if len(value) == 2 and _is_grease(int.from_bytes(value, "big")):
            continue  # RFC 8701 §2: GREASE ALPN identifiers
        protocols.append(value.decode("latin-1"))
    return protocols


def _supported_versions(data: _Reader) -> list[int]:
    """RFC 8446 §4.2.1: in a ClientHello, ProtocolVersion versions<2..254> (2 bytes each)."""
    versions = data.vector(1, 2, 254, "supported_versions")
    if data.remaining():
        raise TlsHelloError("bytes after supported_versions")
    if versions.remaining() % 2:
        raise TlsHelloError("supported_versions length is odd")
    out = []
    while versions.remaining():
        version = versions.uint(2, "version")
        if not _is_grease(version):
            out.append(version)
    return out


# RFC 8446 §6: an alert record is type 21, then level (fatal = 2) and AlertDescription.
ALERT_HANDSHAKE_FAILURE = 40
ALERT_UNRECOGNIZED_NAME = 112


def alert_record(description: int, *, record_version: int = 0x0301) -> bytes:
    """A plaintext fatal alert record, for a front end that must refuse a ClientHello (no key needed: alerts sent
    before the ServerHello are not encrypted). 0x0301 is the record version clients use for their first flight."""
    return bytes([CONTENT_ALERT]) + record_version.to_bytes(2, "big") + b"\x00\x02" + bytes([2, description])


HANDSHAKE_FAILURE_ALERT = alert_record(ALERT_HANDSHAKE_FAILURE)
