"""Sans-I/O parser for an HTTP/1.x request head, run by the front end on bytes it peeked (MSG_PEEK).

The front end never consumes the request: it only needs the method, the request-target, the Host and the body
framing, to choose a back end and to refuse what a back end must never see. So this parser is

* tolerant of what real clients send: bare LF line ends (RFC 9112 §2.2 "a recipient MAY recognize a single LF as a
  line terminator and ignore any preceding CR") and empty lines before the request-line (§2.2 "SHOULD ignore at
  least one empty line (CRLF) received prior to the request-line"; like nginx we skip any number, bounded by
  ``max_size`` as the rest of the head; :attr:`RequestHead.leading` says how many bytes they take, and the front
  end reads them off before the handoff so that a back-end server that does not skip them gets a plain request);
* strict about everything that lets two parsers disagree about where a message ends (request smuggling), where
  RFC 9112 says a server MUST (or may) reject with 400: obs-fold, whitespace before the colon, bare CR, invalid
  tokens, missing or repeated Host, Content-Length with Transfer-Encoding, conflicting Content-Lengths, a
  Transfer-Encoding whose final coding is not chunked.

Refusals raise :class:`HeadError` carrying the status the front end writes back before closing:

====== ==========================================================================================================
400    malformed head (any of the above), and a head longer than ``max_size`` (nginx answers 400 "Request
       Header Or Cookie Too Large" for the same case)
414    the request-line alone does not fit in ``max_size`` (nginx and RFC 9110 §15.5.15: URI Too Long)
501    a transfer coding we do not know (RFC 9112 §6.1: "SHOULD respond with 501 (Not Implemented)")
505    an HTTP major version other than 1, e.g. the HTTP/2 prior-knowledge preface ``PRI * HTTP/2.0``
408    never raised here: the parser has no clock; the front end answers 408 when its head timer expires
====== ==========================================================================================================

Rules match on the *normalised* target (docs/rules.md), never on the bytes as sent: a rule written for
``jpg$`` must see what the back end's server (nginx) will serve, or ``/a%2Ejpg`` and ``/x/../a.jpg`` walk around
it. :attr:`RequestHead.path` is the path as nginx's ``$uri`` has it (:func:`normalise_path`: every ``%XX``
decoded once, ``//`` merged, ``.`` and ``..`` segments removed); :attr:`RequestHead.target` is that path followed by
the query exactly as sent. A path that cannot be normalised safely (an encoded ``/``, NUL or other control byte, a
malformed ``%``, a ``..`` above the root, a raw ``#``) is refused with 400. :attr:`RequestHead.uri` keeps the
request-target as sent (for logs); the request handed to the back end is never rewritten. See docs/rules.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .incomplete import NeedMore

__all__ = ["NeedMore", "HeadError", "RequestHead", "parse_request_head", "target_path", "normalise_path"]


class HeadError(Exception):
    """The request head must be refused; ``status`` is the HTTP status to answer with, ``str(e)`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"HeadError({self.status}, {self.message!r})"


@dataclass(slots=True)
class RequestHead:
    method: bytes
    uri: bytes                          # the request-target as sent (RFC 9112 §3.2), query string included
    version: bytes                      # b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]]  # (lower-cased name, value without surrounding OWS), in order
    host: bytes | None                  # lower-cased, port and one trailing dot removed; None: HTTP/1.0 without Host
    head_len: int                       # bytes from the start of the buffer through the empty line ending the head
    content_length: int | None
    chunked: bool
    path: bytes = field(default=b"")    # normalise_path(uri without "?query" and scheme://authority)
    target: bytes = field(default=b"")  # path + "?query" as sent: what uri rules match (docs/rules.md)
    leading: int = 0                    # bytes of empty lines before the request-line (RFC 9112 §2.2)


# RFC 9110 §5.6.2: token = 1*tchar; tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" /
# "`" / "|" / "~" / DIGIT / ALPHA
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[" + _TCHAR + rb"]+")
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version, single SP separators (we do not use the
# "MAY parse on whitespace-delimited word boundaries" leniency: it is the classic smuggling vector).
# The request-target may hold any visible byte; obs-text (0x80-0xFF) is tolerated as nginx does, because some
# clients send raw UTF-8 paths. Controls, SP and DEL are refused.
_REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) ([\x21-\x7e\x80-\xff]+) (HTTP/([0-9])\.([0-9]))")
# Every prefix of a well-formed request-line (for refusing junk before its line ends).
_REQUEST_LINE_PREFIX = re.compile(rb"[" + _TCHAR + rb"]*(?: [\x21-\x7e\x80-\xff]*(?: "
                                  rb"(?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.[0-9]?)?)?)?)?)?)?)?)?)?")
# RFC 9110 §5.5: field-value bytes are VCHAR, obs-text, SP, HTAB. Searched over whole field lines with their line
# ends, so LF and CR are left to the line-end check.
_BAD_FIELD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LEADING_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
_END_OF_HEAD = re.compile(rb"\n\r?\n")
# RFC 9110 §7.2: Host = uri-host [ ":" port ]; RFC 3986 §3.2.2: IP-literal / IPv4address / reg-name, where
# reg-name = *( unreserved / pct-encoded / sub-delims ). An empty value is allowed (empty authority).
_HOST = re.compile(rb"(\[[0-9A-Za-z:.%_~\-]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
# RFC 3986 §3: absolute-URI = scheme ":" hier-part; only the "//" authority form names a host we can route on.
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^?#]*)")
_DIGITS = re.compile(rb"[0-9]+")
_KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
# A body larger than 2^63 cannot be framed by anyone (HAProxy refuses the same).
_MAX_LENGTH_DIGITS = 18


def parse_request_head(buf: bytes, max_size: int) -> RequestHead | type[NeedMore]:
    """Parse the request head at the start of ``buf``.

    Returns :data:`NeedMore` while ``buf`` is a valid prefix of a head shorter than ``max_size`` bytes, a
    :class:`RequestHead` once the empty line ending the head has arrived, and raises :class:`HeadError` as soon as
    the bytes seen are certain to be refused. Bytes after the head (a body, a pipelined request) are ignored.
    """
    buf = bytes(buf)
    start = _LEADING_EMPTY_LINES.match(buf).end()  # RFC 9112 §2.2: ignore empty lines before the request-line
    limit = min(len(buf), max_size)
    end = _END_OF_HEAD.search(buf, start, limit) if start < limit else None
    if end is None:
        _check_incomplete(buf, start, max_size)
        return NeedMore
    line_end = buf.find(b"\n", start)
    request_line = buf[start:line_end - 1] if buf[line_end - 1] == 0x0D else buf[start:line_end]
    method, uri, version, minor = _parse_request_line(request_line)
    # The field lines, each with its line end (the last one's "\n" is where the empty line starts).
    fields = buf[line_end + 1:end.start() + 1]
    # RFC 9112 §2.2: with LF as terminator, "ignore any preceding CR"; a CR anywhere else is a bare CR, which a
    # recipient "MUST consider ... invalid" (or replace). RFC 9110 §5.5: CR, LF, NUL in a field value are "invalid
    # and dangerous"; we refuse every control but HTAB, as h11 does. One scan for the whole field block.
    if _BAD_FIELD_BYTE.search(fields) is not None or fields.count(b"\r") != fields.count(b"\r\n"):
        raise HeadError(400, "control character or bare CR in header fields")
    headers = _parse_field_lines(fields.replace(b"\r\n", b"\n").split(b"\n")[:-1])
    host, path = _target_host_and_path(method, uri, headers, minor)
    target = uri
    if path[:1] == b"/":
        path = normalise_path(path)
        query = uri.find(b"?")
        target = path if query == -1 else path + uri[query:]
    content_length, chunked = _body_framing(headers, minor)
    return RequestHead(method=method, uri=uri, version=version, headers=headers, host=host, head_len=end.end(),
                       content_length=content_length, chunked=chunked, path=path, target=target, leading=start)


def _check_incomplete(buf: bytes, start: int, max_size: int) -> None:
    """The head is not complete yet: refuse now if it never can be, else let the caller wait for more bytes."""
    first_nl = buf.find(b"\n", start)
    if len(buf) >= max_size:
        if first_nl == -1 or first_nl >= max_size:
            raise HeadError(414, f"request line longer than {max_size} bytes")
        raise HeadError(400, f"request head longer than {max_size} bytes")
    if first_nl != -1:
        # The request-line is complete: judge it now, so junk (or a non-HTTP protocol) is refused at once.
        line = buf[start:first_nl]
        _parse_request_line(line[:-1] if line.endswith(b"\r") else line)
        return
    # Only part of the request-line: it must be a prefix of one. A final CR may begin CRLF.
    partial = buf[start:-1] if buf.endswith(b"\r") else buf[start:]
    if _REQUEST_LINE_PREFIX.fullmatch(partial) is None:
        raise HeadError(400, "malformed request line")


def _parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes, int]:
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        # RFC 9112 §3: "Recipients of an invalid request-line SHOULD respond with ... 400 (Bad Request)".
        # This also refuses HTTP/0.9 simple requests ("GET /" without a version).
        raise HeadError(400, "malformed request line")
    method, uri, version = m.group(1), m.group(2), m.group(3)
    if m.group(4) != b"1":
        # RFC 9110 §15.6.6: 505 when the major version is not supported (HTTP/2 preface, HTTP/0.x, HTTP/3.x ...).
        raise HeadError(505, f"HTTP version {version.decode('ascii')} not supported")
    # RFC 9110 §2.5: a higher 1.x minor version is treated as the highest we implement (1.1).
    return method, uri, version, int(m.group(5))


def _parse_field_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        # RFC 9112 §5.1: field-line = field-name ":" OWS field-value OWS; OWS is not part of the value.
        name, colon, value = line.partition(b":")
        if not colon:
            _refuse_field_name(line if line[:1] in (b" ", b"\t") else b"")
        if not name:
            _refuse_field_name(name)
        fields.append((name, value.strip(b" \t")))
    # field-name = token (RFC 9110 §5.1). Tokens concatenated form a token, and no name is empty: one check for all.
    if fields and _TOKEN.fullmatch(b"".join([name for name, _ in fields])) is None:
        for name, _ in fields:
            if _TOKEN.fullmatch(name) is None:
                _refuse_field_name(name)
    return [(name.lower(), value) for name, value in fields]


def _refuse_field_name(name: bytes) -> None:
    if name[:1] in (b" ", b"\t"):
        # RFC 9112 §5.2: obs-fold in a request "MUST either reject the message by sending a 400"; §2.2 says the
        # same choice for whitespace between the start-line and the first field.
        raise HeadError(400, "obsolete line folding (or whitespace-led line) in header fields")
    if not name:
        raise HeadError(400, "header field line without a name and colon")
    # RFC 9112 §5.1: "No whitespace is allowed between the field name and colon ... A server MUST reject, with a
    # response status code of 400" — caught here as any other byte that is not a tchar.
    raise HeadError(400, f"invalid header field name {name[:40]!r}")


def _normalise_host(value: bytes) -> bytes:
    """Host value → the name rules match: lower case (host names are case-insensitive, RFC 3986 §3.2.2), port
    removed, one trailing dot removed (``example.com.`` names the same host, as nginx treats it)."""
    m = _HOST.fullmatch(value)
    if m is None:
        raise HeadError(400, "invalid Host header field value")
    host = m.group(1).lower()
    if host.endswith(b".") and not host.startswith(b"["):
        host = host[:-1]
    return host


def _target_host_and_path(method: bytes, uri: bytes, headers: list[tuple[bytes, bytes]],
                          minor: int) -> tuple[bytes | None, bytes]:
    hosts = [value for name, value in headers if name == b"host"]
    # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1 request message
    # that lacks a Host header field and to any request message that contains more than one Host header field
    # line or a Host header field with an invalid field value."
    if len(hosts) > 1:
        raise HeadError(400, "more than one Host header field")
    if not hosts and minor >= 1:
        raise HeadError(400, "HTTP/1.1 request without Host header field")
    host = _normalise_host(hosts[0]) if hosts else None

    # RFC 9112 §3.2: the four forms of request-target.
    if uri.startswith(b"/"):                               # §3.2.1 origin-form = absolute-path [ "?" query ]
        return host, target_path(uri)
    if method == b"CONNECT":                               # §3.2.3 authority-form, only for CONNECT
        return host, b""
    if uri == b"*":                                        # §3.2.4 asterisk-form, only for OPTIONS
        if method != b"OPTIONS":
            raise HeadError(400, "asterisk-form request-target is only allowed with OPTIONS")
        return host, b"*"
    m = _ABSOLUTE_FORM.match(uri)                          # §3.2.2 absolute-form
    if m is None:
        raise HeadError(400, "request-target is not in origin, absolute, authority or asterisk form")
    authority = m.group(2)
    if b"@" in authority:
        # RFC 9110 §4.2.4: userinfo is deprecated in http(s) URIs; "treat its presence as an error".
        raise HeadError(400, "userinfo in request-target")
    # RFC 9112 §3.2.2: "the origin server MUST ignore the received Host header field (if any) and instead use the
    # host information of the request-target" (the Host field must still be present and valid, checked above).
    return _normalise_host(authority), target_path(uri)


def target_path(uri: bytes) -> bytes:
    """The path of a request-target, for ``uri`` rules: origin-form without ``?query``; absolute-form without
    ``scheme://authority`` and query (``/`` if empty); ``*`` for asterisk-form; empty for authority-form."""
    if uri.startswith(b"/"):
        return uri.split(b"?", 1)[0]
    if uri == b"*":
        return uri
    m = _ABSOLUTE_FORM.match(uri)
    if m is None:
        return b""
    return m.group(3) or b"/"


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
# Decoded bytes a path must not hold: "/" (an encoded slash would be a segment separator for the server but not
# for us, or the reverse), NUL and the other controls (nginx refuses NUL; none has a place in a file name a rule
# could name, and a decoded LF would let "$" match before it).
_REFUSED_DECODED = frozenset(range(0x20)) | {0x2F, 0x7F}
_SLASHES = re.compile(rb"//+")


def normalise_path(path: bytes) -> bytes:
    """The path a server such as nginx resolves, for rules to match (``$uri`` in nginx's terms).

    ``path`` is an absolute path without its query. In order: every ``%XX`` is decoded, once (``%2E`` is ``.``,
    ``%2561`` is ``%61``; RFC 3986 §2.1, §6.2.2.2 for the unreserved ones; nginx decodes them all); runs of ``/``
    are merged (nginx ``merge_slashes``, on by default); ``.`` and ``..`` segments are removed (RFC 3986 §5.2.4).
    :class:`HeadError` 400 for what cannot be normalised safely: a ``%`` not followed by two hex digits, an
    encoded ``/`` (%2F), NUL or other control byte, a raw ``#`` (not allowed in a request-target, RFC 9112 §3.2;
    nginx would cut the path there) and a ``..`` that climbs above the root (nginx answers 400 too).
    """
    if b"#" in path:
        raise HeadError(400, "'#' in request-target")
    if b"%" in path:
        if path.count(b"%") != len(_PERCENT.findall(path)):
            raise HeadError(400, "malformed percent-encoding in path")
        path = _PERCENT.sub(_decode_one, path)
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    if b"/." not in path:
        return path
    out: list[bytes] = []
    segments = path[1:].split(b"/")
    for segment in segments:
        if segment == b".":
            continue
        if segment == b"..":
            if not out:
                raise HeadError(400, "path climbs above the root with '..'")
            out.pop()
            continue
        out.append(segment)
    if segments[-1] in (b".", b".."):
        out.append(b"")          # "/a/." and "/a/b/.." name the directory: "/a/"
    return b"/" + b"/".join(out)


def _decode_one(m: re.Match[bytes]) -> bytes:
    value = int(m.group(1), 16)
    if value in _REFUSED_DECODED:
        raise HeadError(400, f"encoded byte %{value:02X} in path")
    return bytes((value,))


def _comma_list(values: list[bytes]) -> list[bytes]:
    """RFC 9110 §5.6.1: a list field may be sent as several lines or comma-separated; empty elements are ignored."""
    items = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if item:
                items.append(item)
    return items


def _body_framing(headers: list[tuple[bytes, bytes]], minor: int) -> tuple[int | None, bool]:
    lengths = [value for name, value in headers if name == b"content-length"]
    codings_fields = [value for name, value in headers if name == b"transfer-encoding"]
    if codings_fields:
        if lengths:
            # RFC 9112 §6.3 ¶3: both present "might indicate an attempt to perform request smuggling ... A server
            # MAY reject such a request"; a front end that routes on the head must, or the back end may disagree.
            raise HeadError(400, "both Content-Length and Transfer-Encoding")
        if minor == 0:
            # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding "MUST [be treated] as if the framing is
            # faulty"; we cannot pass faulty framing on to a back end.
            raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        # RFC 9112 §7: transfer-coding = token *( OWS ";" OWS transfer-parameter ); names are case-insensitive.
        codings = [item.split(b";", 1)[0].strip(b" \t").lower() for item in _comma_list(codings_fields)]
        if not codings:
            raise HeadError(400, "empty Transfer-Encoding")
        for coding in codings:
            if _TOKEN.fullmatch(coding) is None:
                raise HeadError(400, "invalid transfer coding")
        if codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
            # RFC 9112 §6.3 ¶4: chunked not final → "the server MUST respond with the 400 (Bad Request)";
            # §7.1: chunked "MUST NOT" be applied more than once.
            raise HeadError(400, "Transfer-Encoding does not end with a single chunked coding")
        unknown = [c for c in codings if c not in _KNOWN_CODINGS]
        if unknown:
            raise HeadError(501, f"unknown transfer coding {unknown[0][:40].decode('ascii')}")
        return None, True
    if not lengths:
        return None, False
    # RFC 9110 §8.6: Content-Length = 1*DIGIT; a list of identical values ("42, 42", or repeated lines) "MAY" be
    # accepted as that value; anything else is invalid and RFC 9112 §6.3 ¶5 says the server "MUST respond with a
    # 400 (Bad Request)".
    items = [item.strip(b" \t") for value in lengths for item in value.split(b",")]
    for item in items:
        if _DIGITS.fullmatch(item) is None:
            raise HeadError(400, "non-numeric Content-Length")
        if len(item.lstrip(b"0")) > _MAX_LENGTH_DIGITS:
            raise HeadError(400, "Content-Length too large")
    values = {int(item) for item in items}
    if len(values) != 1:
        raise HeadError(400, "conflicting Content-Length values")
    return values.pop(), False
