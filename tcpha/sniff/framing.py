"""Sans-I/O framing of the HTTP/1.x messages on a keep-alive connection, for moving it between requests.

A back end that may move a connection to another back end (``rehandoff``, docs/kernel.md "Moving a
keep-alive connection") must know two things about the byte streams it relays, without changing a byte:

* where each request begins and ends in the client's stream (:class:`RequestStream`: the heads, parsed by
  :func:`tcpha.sniff.http.parse_request_head` exactly as the front end parses the first one, and the bodies
  skipped by their framing), so that the request the rules send elsewhere can be held back at its first byte;
* where each response ends in the application's stream (:class:`ResponseFraming`), so that the connection
  moves only at a response boundary: every request already given to the application fully answered.

:class:`RehandoffPlanner` joins the two with the decision (a callable: does this request stay here?) and says
what to pass to the application, what to hold, and when the connection may move.

All three are in the manner of h11: fed bytes, they return events; no sockets, no clock. Section numbers are
RFC 9112 (HTTP/1.1) unless RFC 9110 (HTTP semantics) is named.

Response framing, RFC 9112 §6.3 (the order of the rules is the order of the checks in ``_framing``):

1. a response to HEAD, any 1xx, 204 and 304: no body, the message ends with its head (¶1); a 1xx is interim
   and the final response to the same request follows it (RFC 9110 §15.2);
2. a 2xx to CONNECT and a 101 (Switching Protocols): the connection becomes a tunnel (¶2, RFC 9110 §15.2.2):
   unframeable from here on;
3. Transfer-Encoding with chunked as the final coding: chunked (¶4, §7.1); Transfer-Encoding without a final
   chunked: read until the server closes (¶4, "in a response ... until the connection is closed");
   Transfer-Encoding overrides Content-Length (¶3);
4. an invalid Content-Length (non-numeric, conflicting values): "an unrecoverable error" (¶5): unframeable;
5. a valid Content-Length: exactly that many bytes (¶6);
6. anything else: close-delimited (¶8): the body ends when the server closes the connection.

An unframeable response (rule 2 or 4, a malformed status line or field, a head larger than ``max_head``, a
response to no request) ends the framing for the rest of the connection: the planner then keeps the
connection where it is (issue: "a response the back end cannot frame keeps the connection where it is").
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Callable, Union

from .http import HeadError, RequestHead, parse_request_head
from .incomplete import NeedMore

__all__ = ["Response", "ResponseEnd", "Unframeable", "ResponseFraming", "Request", "RequestEnd", "BadRequest",
           "RequestStream", "ChunkedBody", "RehandoffPlanner", "Plan", "MAX_HEAD",
           "UNFRAMED"]

UNFRAMED = 1 << 62              # RehandoffPlanner.app_opaque once nothing is framed any more
MAX_HEAD = 65536                 # a response or request head larger than this is not framed (nginx: 4x8k)
_MAX_CHUNK_LINE = 4096           # chunk-size line with extensions; h11 allows 4 KiB too
_MAX_TRAILERS = 65536
_MAX_LENGTH_DIGITS = 18          # 2^63 > 10^18: no larger body can be framed

# §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]. Some servers omit the SP before an
# empty reason (h11 accepts it too): the final SP is optional. reason-phrase = *( HTAB / SP / VCHAR / obs-text ).
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")
# §7.1: chunk-size = 1*HEXDIG, then [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS chunk-ext-name
# [ BWS "=" BWS chunk-ext-val ] ). Extensions are passed over, not interpreted (§7.1.1 "MUST ignore
# unrecognized chunk extensions").
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


class FramingError(Exception):
    """The bytes cannot be framed (internal: turned into an :class:`Unframeable` event)."""


# -- events ----------------------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Response:
    """A response head was read. ``body`` is one of "none", "length", "chunked", "close"."""
    status: int
    method: bytes                 # the method of the request it answers
    head_len: int
    body: str
    length: int | None            # for body == "length"
    keep_alive: bool              # False: the server will close after it (HTTP/1.0 without keep-alive, close)

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200


@dataclass(slots=True, frozen=True)
class ResponseEnd:
    """The response (final, or a 1xx) ended at this point of the stream."""
    status: int
    interim: bool = False


@dataclass(slots=True, frozen=True)
class Unframeable:
    """From here on the application's stream cannot be framed; ``reason`` is one line for the log."""
    reason: str


@dataclass(slots=True, frozen=True)
class Request:
    """A request head in the client's stream; ``start`` is the offset of its first byte (its leading empty
    lines included) from the start of the stream, ``end`` the offset just after its head."""
    head: RequestHead
    start: int
    end: int


@dataclass(slots=True, frozen=True)
class RequestEnd:
    """The request (head and body) ends at ``offset`` in the client's stream."""
    offset: int


@dataclass(slots=True, frozen=True)
class BadRequest:
    """A request head that parse_request_head refuses, at ``start``: not framed any further (the application
    answers it, and the connection stays where it is)."""
    start: int
    status: int
    message: str


ResponseEvent = Union[Response, ResponseEnd, Unframeable]
RequestEvent = Union[Request, RequestEnd, BadRequest]


# -- chunked bodies (both directions) ------------------------------------------------------------------

class ChunkedBody:
    """A chunked body (§7.1), fed in pieces: :meth:`feed` returns how many bytes of ``data`` belong to the
    body and sets :attr:`done` when the last chunk and the trailer section (§7.1.2) have been read.

    Bare LF is accepted as a line end (§2.2: "a recipient MAY recognize a single LF as a line terminator").
    :attr:`opaque` is the number of next bytes that are chunk data: the caller may move them without
    showing them (splice) and call :meth:`skip`.
    """

    __slots__ = ("_state", "_line", "_left", "done", "_trailer_bytes")

    def __init__(self) -> None:
        self._state = "size"          # size | data | data-crlf | trailer
        self._line = b""
        self._left = 0
        self.done = False
        self._trailer_bytes = 0

    @property
    def opaque(self) -> int:
        return self._left if self._state == "data" else 0

    def skip(self, n: int) -> None:
        if n > self.opaque:
            raise ValueError(f"skip({n}) beyond the {self.opaque} bytes of chunk data left")
        self._left -= n
        if self._left == 0:
            self._state = "data-crlf"

    def feed(self, data: bytes | memoryview, pos: int = 0) -> int:
        """Consume from ``data[pos:]``; the number of bytes consumed (all of them unless done)."""
        start = pos
        n = len(data)
        while pos < n and not self.done:
            state = self._state
            if state == "data":
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "data-crlf"
                continue
            nl = bytes(data[pos:n]).find(b"\n") if not isinstance(data, bytes) else data.find(b"\n", pos)
            if nl == -1:
                self._line += bytes(data[pos:n])
                pos = n
                if len(self._line) > (_MAX_CHUNK_LINE if state != "trailer" else _MAX_TRAILERS):
                    raise FramingError("chunk line too long")
                break
            if not isinstance(data, bytes):
                nl += pos
            line = self._line + bytes(data[pos:nl])
            self._line = b""
            pos = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if state == "size":
                m = _CHUNK_SIZE.fullmatch(line)
                if m is None:
                    raise FramingError(f"malformed chunk-size line {line[:40]!r}")
                self._left = int(m.group(1), 16)
                self._state = "data" if self._left else "trailer"
            elif state == "data-crlf":
                # §7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
                if line:
                    raise FramingError("chunk data not followed by CRLF")
                self._state = "size"
            else:                                   # trailer-section = *( field-line CRLF ), then CRLF
                if not line:
                    self.done = True
                else:
                    self._trailer_bytes += len(line)
                    if self._trailer_bytes > _MAX_TRAILERS:
                        raise FramingError("trailer section too long")
        return pos - start


# -- responses -----------------------------------------------------------------------------------------

def _fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """Field lines (§5.1) of a response head after its status line; raises FramingError on obs-fold (§5.2:
    a user agent may replace it, we need not frame it) or a malformed line."""
    fields = []
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        m = _FIELD.fullmatch(line)
        if m is None:
            raise FramingError(f"malformed header field line {line[:40]!r}")
        fields.append((m.group(1).lower(), m.group(2)))
    return fields


def _tokens(values: list[bytes]) -> list[bytes]:
    """RFC 9110 §5.6.1 list: comma-separated, empty elements ignored, lower-cased, parameters dropped."""
    return [item.split(b";", 1)[0].strip(b" \t").lower() for value in values for item in value.split(b",")
            if item.strip(b" \t")]


class ResponseFraming:
    """Frames the application's responses, one per request announced with :meth:`request_sent` (in order).

    :meth:`receive_data` returns the events found in the bytes; :meth:`receive_eof` those the end of the
    stream completes (a close-delimited body). :attr:`at_boundary` is True when every announced request has
    its final response complete and no byte of another is pending. :attr:`opaque` bytes (the rest of a
    Content-Length body, or of a chunk's data) need not be shown: move them and call :meth:`skip`.
    """

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._methods: deque[bytes] = deque()
        self._state = "idle"          # idle | head | length | chunked | close | failed | ended
        self._head = b""
        self._left = 0
        self._chunked: ChunkedBody | None = None
        self._current: Response | None = None
        self.failed: str | None = None
        self.responses = 0            # final responses complete

    # -- what the I/O layer asks ------------------------------------------------------------------
    def request_sent(self, method: bytes) -> None:
        """A request went to the application: its response comes next after the ones before it."""
        self._methods.append(method)

    @property
    def outstanding(self) -> int:
        """Requests sent whose final response is not complete."""
        return len(self._methods)

    @property
    def at_boundary(self) -> bool:
        return self.failed is None and not self._methods and self._state == "idle"

    @property
    def opaque(self) -> int:
        if self._state == "length":
            return self._left
        if self._state == "chunked" and self._chunked is not None:
            return self._chunked.opaque
        return 0

    @property
    def in_chunked(self) -> bool:
        """Inside a chunked body: the next bytes to show are a chunk-size line or a CRLF (a few bytes, then
        chunk data again), not a response head."""
        return self._state == "chunked"

    @property
    def rest_unseen(self) -> bool:
        """Nothing more to frame: a close-delimited body runs to the end of the stream (only
        :meth:`receive_eof` matters now), or the framing failed. Every next byte may pass unseen."""
        return self._state in ("close", "failed")

    def skip(self, n: int) -> list[ResponseEvent]:
        """``n`` bytes of :attr:`opaque` body went to the client unseen."""
        if n > self.opaque:
            raise ValueError(f"skip({n}) beyond the {self.opaque} opaque bytes")
        if self._state == "length":
            self._left -= n
            return self._end() if self._left == 0 else []
        assert self._chunked is not None
        self._chunked.skip(n)
        return []

    # -- bytes --------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        pos, n = 0, len(data)
        try:
            while pos < n:
                state = self._state
                if state in ("failed", "close"):
                    break                           # everything goes through, nothing more to frame
                if state == "ended":
                    raise FramingError("bytes after a response that closes the connection")
                if state == "length":
                    take = min(self._left, n - pos)
                    pos += take
                    self._left -= take
                    if self._left == 0:
                        events.extend(self._end())
                    continue
                if state == "chunked":
                    assert self._chunked is not None
                    pos += self._chunked.feed(data, pos)
                    if self._chunked.done:
                        events.extend(self._end())
                    continue
                # idle or head: gather the head
                if state == "idle":
                    self._state = "head"
                pos = self._gather_head(data, pos, events)
        except FramingError as e:
            events.append(self._fail(str(e)))
        return events

    def receive_eof(self) -> list[ResponseEvent]:
        """The application closed its side."""
        if self._state == "close":
            return self._end()
        if self._state in ("idle", "ended", "failed"):
            return []
        return [self._fail("the application closed in the middle of a response")]

    # -- inside ------------------------------------------------------------------------------------
    def _gather_head(self, data: bytes, pos: int, events: list[ResponseEvent]) -> int:
        # The end of the head may straddle two pieces: search the kept part's tail with the new bytes.
        keep = len(self._head)
        buf = self._head + data[pos:pos + self.max_head + 4]
        m = _END_OF_HEAD.search(buf, max(0, keep - 3))
        if m is None:
            if len(buf) > self.max_head:
                raise FramingError(f"response head longer than {self.max_head} bytes")
            self._head = buf
            return len(data)
        head = buf[:m.start()]
        if m.end() > self.max_head:
            raise FramingError(f"response head longer than {self.max_head} bytes")
        self._head = b""
        consumed = m.end() - keep
        events.extend(self._start(head, m.end()))
        return pos + consumed

    def _start(self, head: bytes, head_len: int) -> list[ResponseEvent]:
        line, _, rest = head.partition(b"\n")
        if line.endswith(b"\r"):
            line = line[:-1]
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            raise FramingError(f"malformed status line {line[:40]!r}")
        if m.group(1) != b"1":
            raise FramingError(f"HTTP/{m.group(1).decode()}.{m.group(2).decode()} response")
        if not self._methods:
            raise FramingError("a response to no request")
        minor, status = int(m.group(2)), int(m.group(3))
        fields = _fields(rest)
        method = self._methods[0]
        body, length = self._framing(method, status, fields)
        connection = _tokens([v for k, v in fields if k == b"connection"])
        keep_alive = b"close" not in connection and (minor >= 1 or b"keep-alive" in connection)
        response = Response(status=status, method=method, head_len=head_len, body=body, length=length,
                            keep_alive=keep_alive)
        self._current = response
        events: list[ResponseEvent] = [response]
        if body == "none":
            events.extend(self._end())
        elif body == "length":
            self._state, self._left = "length", length or 0
            if not self._left:
                events.extend(self._end())
        elif body == "chunked":
            self._state, self._chunked = "chunked", ChunkedBody()
        else:
            self._state = "close"
        return events

    @staticmethod
    def _framing(method: bytes, status: int, fields: list[tuple[bytes, bytes]]) -> tuple[str, int | None]:
        if status == 101 or (method == b"CONNECT" and 200 <= status < 300):
            # §6.3 ¶2 (CONNECT: a tunnel) and RFC 9110 §15.2.2 (101: another protocol from here on)
            raise FramingError(f"{status} to {method.decode('ascii', 'replace')}: the connection is a tunnel")
        if method == b"HEAD" or status < 200 or status in (204, 304):
            return "none", None                               # §6.3 ¶1
        codings = _tokens([v for k, v in fields if k == b"transfer-encoding"])
        if codings:                                           # §6.3 ¶3: TE overrides Content-Length
            if codings[-1] == b"chunked":
                return "chunked", None                        # §6.3 ¶4
            return "close", None                              # §6.3 ¶4: not chunked: until the close
        lengths = [item.strip(b" \t") for k, v in fields if k == b"content-length" for item in v.split(b",")]
        if lengths:
            if any(_DIGITS.fullmatch(x) is None or len(x.lstrip(b"0")) > _MAX_LENGTH_DIGITS for x in lengths):
                raise FramingError("invalid Content-Length")  # §6.3 ¶5: unrecoverable
            values = {int(x) for x in lengths}
            if len(values) != 1:
                raise FramingError("conflicting Content-Length values")
            return "length", values.pop()                    # §6.3 ¶6
        return "close", None                                  # §6.3 ¶8

    def _end(self) -> list[ResponseEvent]:
        response = self._current
        assert response is not None
        self._current = None
        self._chunked = None
        if response.interim:
            self._state = "idle"                              # the final response follows (RFC 9110 §15.2)
            return [ResponseEnd(response.status, interim=True)]
        self._methods.popleft()
        self.responses += 1
        self._state = "idle" if response.keep_alive and response.body != "close" else "ended"
        return [ResponseEnd(response.status)]

    def _fail(self, reason: str) -> Unframeable:
        self._state = "failed"
        self.failed = reason
        return Unframeable(reason)


# -- requests ------------------------------------------------------------------------------------------

class RequestStream:
    """Finds the requests in the client's stream: each head (:class:`Request`, with its offsets) and the end
    of its body (:class:`RequestEnd`). A head parse_request_head refuses gives :class:`BadRequest` and ends
    the framing (the rest of the stream is not looked at)."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self.offset = 0               # bytes of the stream consumed so far
        self._state = "head"          # head | length | chunked | failed
        self._head = b""
        self._left = 0
        self._chunked: ChunkedBody | None = None
        self.failed: str | None = None

    @property
    def head_start(self) -> int | None:
        """The stream offset where a head begins whose end has not come yet (None: no such head)."""
        return self.offset - len(self._head) if self._state == "head" and self._head else None

    @property
    def between_requests(self) -> bool:
        """No byte of a request is pending (its head or body only partly read)."""
        return self._state == "head" and not self._head

    def receive_data(self, data: bytes) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        pos, n = 0, len(data)
        while pos < n and self._state != "failed":
            if self._state == "length":
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = "head"
                    events.append(RequestEnd(self.offset + pos))
                continue
            if self._state == "chunked":
                assert self._chunked is not None
                try:
                    pos += self._chunked.feed(data, pos)
                except FramingError as e:
                    self._state, self.failed = "failed", str(e)
                    events.append(BadRequest(self.offset + pos, 400, str(e)))
                    break
                if self._chunked.done:
                    self._state, self._chunked = "head", None
                    events.append(RequestEnd(self.offset + pos))
                continue
            start = self.offset + pos - len(self._head)
            buf = self._head + data[pos:]
            try:
                result = parse_request_head(buf, self.max_head)
            except HeadError as e:
                self._state, self.failed = "failed", e.message
                events.append(BadRequest(start, e.status, e.message))
                break
            if result is NeedMore:
                self._head = buf
                pos = n
                break
            assert isinstance(result, RequestHead)
            consumed = result.head_len - len(self._head)
            self._head = b""
            pos += consumed
            events.append(Request(result, start, start + result.head_len))
            if result.chunked:
                self._state, self._chunked = "chunked", ChunkedBody()
            elif result.content_length:
                self._state, self._left = "length", result.content_length
            else:
                events.append(RequestEnd(self.offset + pos))       # §6.3 ¶7: a request without either
        self.offset += n
        return events


# -- the planner ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Plan:
    """What the I/O layer does after feeding the planner: write ``to_app`` to the application; when ``move``
    is set, the connection may move now and ``held`` (the client's bytes from the first byte of the request
    that goes elsewhere) must travel with it, ahead of anything still unread in the client's socket."""
    to_app: bytes = b""
    move: bool = False
    held: bytes = b""
    pinned: str | None = None     # set once when the connection stops being movable (log it once)
    refuse: int = 0               # answer this status to the client now (every response before is complete), then close
    drop: str | None = None       # a held request is dropped: end the connection when the application's response ends


class RehandoffPlanner:
    """The decision to move a keep-alive connection, at a response boundary only.

    ``stays(head) -> bool`` says whether a request may be served by this back end (the rules name it). The
    planner passes client bytes to the application until a request that does not stay; from its first byte
    on everything is held (the I/O layer stops reading the client: the rest waits in the socket, and moves
    with it). When every request passed to the application has its final response complete, :attr:`Plan.move`
    is set.

    A request the rules send elsewhere never reaches this application, whatever happens next (the rules may
    keep paths apart: ``^/admin/`` to its own pool). So:

    * a request head the front end's parser refuses (tcpha.sniff.http: the front end would answer it 400
      itself) is not passed either: at the response boundary :attr:`Plan.refuse` carries its status, and
      the I/O layer answers it and closes, as the front end does;
    * a response that cannot be framed pins the connection here (:attr:`Plan.pinned`, once): what follows
      goes to the application unframed, as a tunnel (101, CONNECT) must. A request held for elsewhere at
      that moment is dropped (:attr:`Plan.drop`): no boundary will come for it to move at, and the
      connection ends when the application's response does.
    """

    def __init__(self, stays: Callable[[RequestHead], bool], max_head: int = MAX_HEAD) -> None:
        self.stays = stays
        self.requests = RequestStream(max_head)
        self.responses = ResponseFraming(max_head)
        self.holding = False          # a request for elsewhere was found: hold from `_held_from`
        self._held = bytearray()
        self._pending = bytearray()   # client bytes read and not passed to the application yet
        self._passed = 0              # client bytes passed to the application (stream offset)
        self.pinned: str | None = None
        self.moved = False
        self.refusal = 0              # holding a bad request: the status to answer at the boundary

    @property
    def reading_client(self) -> bool:
        """Whether the I/O layer should read the client's socket now."""
        return not self.holding and not self.moved

    def client_data(self, data: bytes) -> Plan:
        if self.moved:                    # read after the move was planned: travels with it too
            if self.refusal or self.pinned is not None:
                return Plan()             # refused or dropped: never for this application
            return Plan(held=data)
        if self.pinned is not None:
            return Plan(to_app=data)
        if self.holding:                  # read before the I/O layer stopped: held with the rest
            if not self.refusal:
                self._held += data
            return Plan()
        self._pending += data
        for event in self.requests.receive_data(data):
            if isinstance(event, BadRequest):
                # Nothing from the bad head on reaches the application; what stayed before it does.
                plan = Plan(to_app=self._pass(event.start - self._passed))
                self._pending.clear()
                self.holding = True
                self.refusal = event.status
                return self._ready(plan)
            if isinstance(event, Request):
                if self.stays(event.head):
                    self.responses.request_sent(event.head.method)
                    continue
                cut = event.start - self._passed
                self.holding = True
                self._held += self._pending[cut:]
                plan = Plan(to_app=self._pass(cut))
                self._pending.clear()
                return self._ready(plan)
        # Everything but a head not complete yet: whether it stays is not known until it is.
        limit = self.requests.head_start if self.requests.head_start is not None else self.requests.offset
        return Plan(to_app=self._pass(limit - self._passed))

    def _pass(self, n: int) -> bytes:
        out = bytes(self._pending[:n])
        del self._pending[:n]
        self._passed += n
        return out

    def app_data(self, data: bytes) -> Plan:
        """Bytes from the application (they go to the client as they are, whatever the plan says)."""
        if self.pinned is not None or self.moved:
            return Plan()
        for event in self.responses.receive_data(data):
            if isinstance(event, Unframeable):
                return self._pin(f"response not framed: {event.reason}")
        return self._ready(Plan())

    @property
    def app_opaque(self) -> int:
        """How many next bytes of the application's stream the I/O layer may move to the client without
        showing them here (splice), then account for with :meth:`app_skipped`: the rest of a Content-Length
        body or of a chunk's data (:attr:`ResponseFraming.opaque`); :data:`UNFRAMED` once nothing is framed
        any more (the connection is pinned, or a close-delimited body runs to the end); 0 otherwise (a
        head, a chunk-size line, the CRLF after a chunk, or after the move was planned): then the bytes
        must be shown with :meth:`app_data`."""
        if self.pinned is not None:
            return UNFRAMED
        if self.moved:
            return 0
        if self.responses.rest_unseen:
            return UNFRAMED
        return self.responses.opaque

    def app_skipped(self, n: int) -> Plan:
        """``n`` opaque response bytes (see ResponseFraming.opaque) went to the client unseen."""
        if self.pinned is not None or self.moved or self.responses.rest_unseen:
            return Plan()
        self.responses.skip(n)
        return self._ready(Plan())

    def app_eof(self) -> Plan:
        if self.pinned is None and not self.moved:
            for event in self.responses.receive_eof():
                if isinstance(event, Unframeable):
                    return self._pin(f"response not framed: {event.reason}")
        return Plan()

    def _ready(self, plan: Plan) -> Plan:
        if self.holding and self.responses.at_boundary:
            self.moved = True
            if self.refusal:
                plan.refuse = self.refusal
            else:
                plan.move = True
                plan.held = bytes(self._held)
            self._held.clear()
        return plan

    def _pin(self, why: str) -> Plan:
        """Response framing lost: from now on everything goes to the application unframed; but a request
        held for elsewhere is dropped, never passed (see the class docstring)."""
        self.pinned = why
        if self.holding:
            self._held.clear()
            self.moved = True             # the client is not read again; the connection ends with the response
            return Plan(pinned=why, drop=f"{why}: the request held for another back end is dropped")
        out = bytes(self._pending)
        self._pending.clear()
        return Plan(to_app=out, pinned=why)
