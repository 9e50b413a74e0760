"""Hypothesis fuzzing of both sniffers: only the documented outcomes, whatever the bytes; and properties that tie
incremental parsing to whole-buffer parsing."""

from __future__ import annotations

import ssl

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tcpha.fe.rules import RequestFacts, RuleTable
from tcpha.sniff.http import HeadError, NeedMore, RequestHead, normalise_path, parse_request_head
from tcpha.sniff.tls import ClientHello, TlsHelloError, parse_client_hello

MAX = 16384
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def http_outcome(buf: bytes, max_size: int = MAX):
    try:
        result = parse_request_head(buf, max_size)
    except HeadError as e:
        assert e.status in (400, 414, 501, 505) and str(e) and "\n" not in str(e)
        return e
    assert result is NeedMore or isinstance(result, RequestHead)
    return result


def tls_outcome(buf: bytes, max_size: int = MAX):
    try:
        result = parse_client_hello(buf, max_size)
    except TlsHelloError as e:
        assert str(e)
        return e
    assert result is NeedMore or isinstance(result, ClientHello)
    if isinstance(result, ClientHello):
        assert 0 < result.length <= min(len(buf), max_size)
    return result


# -- HTTP ---------------------------------------------------------------------------------------------------------

HTTPISH = st.lists(st.sampled_from([b"GET", b"POST", b" ", b"/", b"?", b"a", b"HTTP/1.1", b"HTTP/1.0", b"\r\n",
                                    b"\n", b"\r", b"Host", b":", b"\t", b"Content-Length", b"Transfer-Encoding",
                                    b"chunked", b"5", b",", b"\x00", b"\xff", b"[::1]", b"*", b"http://"]),
                   max_size=40).map(b"".join)


@FUZZ
@given(st.binary(max_size=300))
def test_http_any_bytes(buf):
    http_outcome(buf)


@FUZZ
@given(HTTPISH, st.integers(min_value=1, max_value=200))
def test_http_token_soup(buf, max_size):
    result = http_outcome(buf, max_size)
    if isinstance(result, RequestHead):
        assert result.head_len <= max_size
        # The head alone parses to the same thing; one byte less needs more.
        assert parse_request_head(buf[:result.head_len], max_size) == result
        assert parse_request_head(buf[:result.head_len - 1], max_size) is NeedMore


TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=12).map(str.encode)
VALUE = st.binary(max_size=30).map(lambda v: bytes(c for c in v if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80)
                                   .strip(b" \t"))
PATH = st.binary(max_size=40).map(lambda v: b"/" + bytes(c for c in v if 0x21 <= c <= 0x7E or c >= 0x80))


@FUZZ
@given(TOKEN, PATH, st.lists(st.tuples(TOKEN, VALUE), max_size=8), st.sampled_from([b"\r\n", b"\n"]),
       st.integers(min_value=0, max_value=3))
def test_valid_heads_parse_and_no_prefix_is_refused(method, path, fields, eol, empty_lines):
    try:
        normalise_path(path.split(b"?", 1)[0])
    except HeadError:
        assume(False)          # a path refused with 400 (tested below): not a valid head
    fields = [(n, v) for n, v in fields if n.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    raw = eol * empty_lines + method + b" " + path + b" HTTP/1.1" + eol + b"Host: a.example" + eol
    raw += b"".join(n + b": " + v + eol for n, v in fields) + eol
    head = parse_request_head(raw, MAX)
    assert isinstance(head, RequestHead)
    assert head.head_len == len(raw) and head.uri == path and head.host == b"a.example"
    assert head.headers[1:] == [(n.lower(), v) for n, v in fields]
    for cut in range(len(raw)):
        assert parse_request_head(raw[:cut], MAX) is NeedMore   # early refusal never hits a valid prefix


SEGMENTS = st.lists(st.sampled_from([b"", b".", b"..", b"a", b"b.jpg", b"%2E", b"%2e%2E", b"%2F", b"%00", b"%",
                                      b"%41", b"%2561", b"#", b"...", b".a", b"%C3%BC", b"\xff", b";x"]),
                    max_size=10).map(lambda parts: b"/" + b"/".join(parts))


@FUZZ
@given(SEGMENTS)
@example(b"/x/%2e%2e/a.jpg")
def test_normalised_path_has_no_dot_segments_or_empty_ones(path):
    try:
        out = normalise_path(path)
    except HeadError as e:
        assert e.status == 400
        assert any(bad in path for bad in (b"..", b"%2E", b"%2e", b"%2F", b"%00", b"#")) or \
            path.count(b"%") != path.count(b"%2") + path.count(b"%4") + path.count(b"%C")
        return
    assert out.startswith(b"/") and b"//" not in out
    segments = out.split(b"/")[1:]
    assert b"." not in segments and b".." not in segments
    assert b"\x00" not in out and b"#" not in out
    if b"%" not in path:
        assert normalise_path(out) == out                       # without percent-encoding: idempotent


# -- TLS ----------------------------------------------------------------------------------------------------------

def _real_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="fuzz.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


REAL = _real_hello()


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")
def test_tls_any_bytes(buf):
    tls_outcome(buf)


@FUZZ
@given(st.binary(max_size=300))
def test_tls_any_bytes_after_a_record_header(tail):
    tls_outcome(b"\x16\x03\x01" + len(tail).to_bytes(2, "big") + b"\x01" + tail)


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(REAL) - 1), st.integers(0, 255)),
                min_size=1, max_size=6),
       st.integers(min_value=0, max_value=len(REAL)))
def test_tls_mutated_real_hello(mutations, cut):
    buf = bytearray(REAL)
    for pos, value in mutations:
        buf[pos] = value
    tls_outcome(bytes(buf))
    tls_outcome(bytes(buf[:cut]))


@FUZZ
@given(st.integers(min_value=0, max_value=len(REAL)), st.binary(min_size=1, max_size=20),
       st.booleans())
def test_tls_insertions_and_deletions(pos, junk, delete):
    buf = REAL[:pos] + REAL[pos + len(junk):] if delete else REAL[:pos] + junk + REAL[pos:]
    tls_outcome(buf)


HANDSHAKE = REAL[5:]


@FUZZ
@given(st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=40),
       st.integers(min_value=0, max_value=3000))
def test_tls_refragmented_hello_same_result(sizes, cut):
    out, pos, i = b"", 0, 0
    while pos < len(HANDSHAKE):
        frag = HANDSHAKE[pos:pos + sizes[i % len(sizes)]]
        out += b"\x16\x03\x01" + len(frag).to_bytes(2, "big") + frag
        pos += len(frag)
        i += 1
    hello = parse_client_hello(out, MAX)
    assert isinstance(hello, ClientHello)
    assert (hello.sni, hello.alpn, hello.length) == ("fuzz.example", ["h2", "http/1.1"], len(out))
    if cut < len(out):
        assert parse_client_hello(out[:cut], MAX) is NeedMore


# -- built hellos: what goes in comes out ---------------------------------------------------------------------------

HOSTNAME = st.from_regex(rb"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}\Z")
ALPN_ID = st.binary(min_size=1, max_size=12).filter(lambda p: not (len(p) == 2 and p[0] == p[1]
                                                                   and p[0] & 0x0F == 0x0A))


@FUZZ
@given(st.one_of(st.none(), HOSTNAME), st.lists(ALPN_ID, max_size=5),
       st.lists(st.integers(min_value=0x0300, max_value=0x0304), min_size=1, max_size=5),
       st.lists(st.integers(min_value=100, max_value=60000), max_size=5, unique=True),
       st.binary(max_size=32), st.integers(min_value=1, max_value=400))
def test_tls_built_round_trip(b, host, alpn, versions, other_types, session_id, fragment):
    exts = [b.ext(t, bytes(t % 7)) for t in other_types if t not in (0, 16, 41, 43)]
    if host is not None:
        exts.append(b.sni_ext(host))
    if alpn:
        exts.append(b.alpn_ext(*alpn))
    exts.append(b.versions_ext(*versions))
    raw = b.records(b.HelloSpec(session_id=session_id, extensions=exts).handshake(), fragment)
    hello = parse_client_hello(raw, 1 << 20)
    assert isinstance(hello, ClientHello)
    assert hello.sni == (host.decode() if host is not None else None)
    assert hello.alpn == [p.decode("latin-1") for p in alpn]
    assert hello.versions == versions and hello.length == len(raw)
    # and the rule table takes whatever the parser gives, without error
    facts = RequestFacts.from_client_hello(hello)
    assert RULES.candidates(facts)[:1] in (["alpn"], ["sni"], ["host"], ["nosni"], [])


def _rule(target, field, pattern):
    import re

    from tcpha.config.loader import RuleSpec
    return RuleSpec(target, field, pattern, re.compile(pattern.encode(), re.I if field in ("host", "sni") else 0), 1)


RULES = RuleTable([_rule("sni", "sni", r"^[a-m]"), _rule("host", "host", r"\.[n-z]"),
                   _rule("alpn", "alpn", "."), _rule("nosni", "sni", "^$"), _rule("uri", "uri", ".*")])
