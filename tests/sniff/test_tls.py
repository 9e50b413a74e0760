"""tcpha.sniff.tls: real ClientHellos (Python ssl, openssl s_client), split at every byte and across records, and a
malformed corpus that must give TlsHelloError, never anything else."""

from __future__ import annotations

import ssl

import pytest

from tcpha.sniff.tls import (HANDSHAKE_FAILURE_ALERT, ClientHello, NeedMore, TlsHelloError, alert_record,
                             looks_like_tls, parse_client_hello)

MAX = 16384
TLS12, TLS13 = 0x0303, 0x0304


def parse(buf: bytes, max_size: int = MAX) -> ClientHello:
    result = parse_client_hello(buf, max_size)
    assert isinstance(result, ClientHello), result
    return result


def malformed(buf: bytes, max_size: int = MAX) -> str:
    with pytest.raises(TlsHelloError) as info:
        parse_client_hello(buf, max_size)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# -- real clients --------------------------------------------------------------------------------------------------

def test_python_client_sni_alpn(real_hellos):
    hello = parse(real_hellos["py-sni-alpn"])
    assert hello.sni == "www.example.com"
    assert hello.alpn == ["h2", "http/1.1"]
    assert TLS13 in hello.versions and TLS12 in hello.versions
    assert hello.length == len(real_hellos["py-sni-alpn"])
    assert hello.extensions[:1] == [0]


def test_python_client_without_sni(real_hellos):
    hello = parse(real_hellos["py-nosni"])
    assert hello.sni is None and hello.alpn == [] and 0 not in hello.extensions


def test_python_client_tls12_only(real_hellos):
    hello = parse(real_hellos["py-tls12"])
    assert hello.sni == "shop.example.org" and hello.versions == [TLS12] and hello.alpn == ["http/1.1"]


def test_python_client_idn_is_a_label(real_hellos):
    assert parse(real_hellos["py-idn"]).sni == "xn--bcher-kva.example"


def test_openssl_s_client(real_hellos):
    hello = parse(real_hellos["openssl-sni-alpn"])
    assert hello.sni == "api.example.net"                   # lower-cased
    assert hello.alpn == ["h2", "http/1.1"]
    legacy = parse(real_hellos["openssl-tls12"])
    assert legacy.sni == "legacy.example.com" and TLS13 not in legacy.versions
    assert parse(real_hellos["openssl-noservername"]).sni is None


def test_looks_like_tls(real_hellos):
    for raw in real_hellos.values():
        assert looks_like_tls(raw) and looks_like_tls(raw[:1])
    for raw in (b"", b"GET / HTTP/1.1\r\n", b"\x80\x2e\x01\x03\x01", b"PRI * HTTP/2.0"):
        assert not looks_like_tls(raw)   # SSLv2-format hellos (0x80) are not TLS for us


# -- incremental arrival and fragmentation --------------------------------------------------------------------------

def test_every_prefix_needs_more(real_hellos):
    for name, raw in real_hellos.items():
        for cut in range(len(raw)):
            assert parse_client_hello(raw[:cut], MAX) is NeedMore, (name, cut)


def test_bytes_after_hello_ignored(real_hellos):
    raw = real_hellos["py-sni-alpn"]
    hello = parse(raw + b"\x17\x03\x03\x00\x05early")     # e.g. 0-RTT application data records
    assert hello.length == len(raw)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 100, 511])
def test_hello_fragmented_over_records(b, real_hellos, size):
    raw = real_hellos["py-sni-alpn"]
    handshake = b.unwrap(raw)
    fragmented = b.records(handshake, size)
    hello = parse(fragmented)
    assert (hello.sni, hello.alpn) == ("www.example.com", ["h2", "http/1.1"])
    assert hello.length == len(fragmented)


def test_fragmented_every_prefix_needs_more(b, real_hellos):
    handshake = b.unwrap(real_hellos["openssl-sni-alpn"] if "openssl-sni-alpn" in real_hellos
                         else real_hellos["py-sni-alpn"])
    fragmented = b.records(handshake, [3, 1, 50, 2, 200, len(handshake)])
    for cut in range(len(fragmented)):
        assert parse_client_hello(fragmented[:cut], MAX) is NeedMore, cut
    assert parse(fragmented).length == len(fragmented)


def test_record_version_0300_and_0303_accepted(b, real_hellos):
    handshake = b.unwrap(real_hellos["py-sni-alpn"])
    for version in (0x0300, 0x0301, 0x0303):
        assert parse(b.records(handshake, record_version=version)).sni == "www.example.com"


# -- hand-built shapes ------------------------------------------------------------------------------------------------

def build(b, **kw) -> bytes:
    return b.records(b.HelloSpec(**kw).handshake())


def test_no_extensions_block(b):
    hello = parse(build(b, legacy_version=0x0301, extensions=None))
    assert hello.sni is None and hello.versions == [0x0301] and hello.extensions == []


def test_empty_extensions_block(b):
    assert parse(build(b, extensions=[])).extensions == []


def test_grease_dropped(b):
    hello = parse(build(b, extensions=[b.ext(0x0A0A, b""), b.sni_ext(b"g.example"),
                                       b.alpn_ext(b"\x1a\x1a", b"h2"), b.versions_ext(0x2A2A, TLS13, TLS12),
                                       b.ext(0xFAFA, b"\x00")]))
    assert hello.sni == "g.example" and hello.alpn == ["h2"] and hello.versions == [TLS13, TLS12]


def test_trailing_dot_and_case(b):
    assert parse(build(b, extensions=[b.sni_ext(b"WWW.Example.COM.")])).sni == "www.example.com"


def test_unknown_name_type_skipped(b):
    data = b.vec16(b"\x07" + b.vec16(b"opaque") + b"\x00" + b.vec16(b"real.example"))
    assert parse(build(b, extensions=[b.ext(0, data)])).sni == "real.example"


def test_pre_shared_key_last_is_fine(b):
    assert parse(build(b, extensions=[b.sni_ext(b"a.example"), b.ext(41, b"\x00" * 10)])).sni == "a.example"


def test_non_latin_alpn_round_trips(b):
    assert parse(build(b, extensions=[b.alpn_ext(b"\xff\xfeproto")])).alpn == ["\xff\xfeproto"]


# -- malformed corpus -------------------------------------------------------------------------------------------------

def test_record_layer_errors(b, real_hellos):
    raw = real_hellos["py-sni-alpn"]
    assert "content type" in malformed(b"\x17" + raw[1:])
    assert "major" in malformed(raw[:1] + b"\x02" + raw[2:])
    assert "zero-length" in malformed(b"\x16\x03\x01\x00\x00" + raw)
    assert "2^14" in malformed(b"\x16\x03\x01\x40\x01" + raw[5:])
    assert "not ClientHello" in malformed(raw[:5] + b"\x02" + raw[6:])


def test_errors_seen_before_the_record_is_complete(real_hellos):
    raw = real_hellos["py-sni-alpn"]
    malformed(b"\x15")                                    # an alert: not a ClientHello at byte 1
    malformed(b"\x16\x04")
    malformed(raw[:5] + b"\x02")                          # a ServerHello, record still incomplete
    malformed(raw[:6] + b"\xff\xff\xff", max_size=MAX)    # 16 MiB hello > max_size, said by its header


def test_other_record_type_interleaved(b, real_hellos):
    handshake = b.unwrap(real_hellos["py-sni-alpn"])
    two = b.records(handshake, [100, len(handshake) - 100])
    bad = two[:105] + b"\x15\x03\x03\x00\x02\x02\x28" + two[105:]
    assert "inside the ClientHello" in malformed(bad)


def test_handshake_data_after_hello_in_same_record(b, real_hellos):
    handshake = b.unwrap(real_hellos["py-sni-alpn"]) + b"\x0b\x00\x00\x00"
    assert "after the ClientHello" in malformed(b.records(handshake))


def test_longer_than_max_size(real_hellos):
    raw = real_hellos["py-sni-alpn"]
    assert "longer than" in malformed(raw, max_size=len(raw) - 1)
    assert parse(raw, max_size=len(raw)).length == len(raw)
    assert "longer than" in malformed(raw[:3], max_size=4)   # not even a record header fits


BAD_BODIES = {
    "legacy-version-not-tls": dict(legacy_version=0x0200),
    "session-id-33": dict(session_id=bytes(33)),
    "no-cipher-suites": dict(suites=b""),
    "odd-cipher-suites": dict(suites=b"\x13\x01\x13"),
    "no-compression": dict(compression=b""),
    "duplicate-extension": dict(extensions=[b"\x00\x17\x00\x00", b"\x00\x17\x00\x00"]),
    "psk-not-last": dict(extensions=[b"\x00\x29\x00\x02\x00\x00", b"\x00\x17\x00\x00"]),
    "sni-empty-extension": dict(extensions=[b"\x00\x00\x00\x00"]),
    "sni-empty-list": dict(extensions=[b"\x00\x00\x00\x02\x00\x00"]),
    "sni-empty-name": dict(extensions=[b"\x00\x00\x00\x05\x00\x03\x00\x00\x00"]),
    "sni-two-host-names": dict(extensions=[b"\x00\x00\x00\x0a\x00\x08\x00\x00\x01a\x00\x00\x01b"]),
    "sni-not-printable": dict(extensions=[b"\x00\x00\x00\x08\x00\x06\x00\x00\x03a\nb"]),
    "sni-utf8": dict(extensions=[b"\x00\x00\x00\x09\x00\x07\x00\x00\x04\xc3\xbc.x"]),
    "sni-only-dot": dict(extensions=[b"\x00\x00\x00\x06\x00\x04\x00\x00\x01."]),
    "sni-list-short": dict(extensions=[b"\x00\x00\x00\x07\x00\x04\x00\x00\x03abc"]),
    "sni-list-long": dict(extensions=[b"\x00\x00\x00\x07\x00\x06\x00\x00\x03abc"]),
    "sni-name-long": dict(extensions=[b"\x00\x00\x00\x08\x00\x06\x00\x00\x09abc"]),
    "sni-no-host-name": dict(extensions=[b"\x00\x00\x00\x08\x00\x06\x05\x00\x03abc"]),
    "alpn-empty-list": dict(extensions=[b"\x00\x10\x00\x02\x00\x00"]),
    "alpn-empty-name": dict(extensions=[b"\x00\x10\x00\x05\x00\x03\x00\x01h"]),
    "alpn-name-overruns": dict(extensions=[b"\x00\x10\x00\x05\x00\x03\x05h2"]),
    "alpn-trailing": dict(extensions=[b"\x00\x10\x00\x06\x00\x03\x02h2\x00"]),
    "versions-odd": dict(extensions=[b"\x00\x2b\x00\x04\x03\x03\x04\x03"]),
    "versions-empty": dict(extensions=[b"\x00\x2b\x00\x01\x00"]),
    "versions-trailing": dict(extensions=[b"\x00\x2b\x00\x04\x02\x03\x04\x00"]),
    "extension-overruns-block": dict(extensions=[b"\x00\x17\x00\x09"]),
    "extension-header-cut": dict(extensions=[b"\x00\x17\x00"]),
}


@pytest.mark.parametrize("spec", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_bodies(b, spec):
    malformed(build(b, **spec))


def test_bytes_after_extensions_block(b):
    handshake = b.HelloSpec(extensions=[b.sni_ext(b"a.example")]).handshake()
    body = handshake[4:] + b"\x00"
    malformed(b.records(b"\x01" + len(body).to_bytes(3, "big") + body))


def test_every_truncation_of_a_complete_message(b, real_hellos):
    """Shorten the ClientHello body by k bytes while the length fields around it say so: always malformed."""
    handshake = b.unwrap(real_hellos["py-sni-alpn"])
    body = handshake[4:]
    pos = 35 + body[34]                                   # after legacy_version, random, session id
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")   # cipher suites
    no_extensions = pos + 1 + body[pos]                   # compression methods: a TLS 1.2 hello may end here
    for k in range(1, len(body)):
        cut = body[:-k]
        if len(cut) == no_extensions:
            assert parse(b.records(b"\x01" + len(cut).to_bytes(3, "big") + cut)).extensions == []
            continue
        result_is_error = False
        try:
            parse_client_hello(b.records(b"\x01" + len(cut).to_bytes(3, "big") + cut), MAX)
        except TlsHelloError:
            result_is_error = True
        assert result_is_error, k


def test_every_length_byte_corrupted(real_hellos):
    """Flip each byte of a real hello: the result is a ClientHello, NeedMore or TlsHelloError — nothing else."""
    raw = real_hellos["py-sni-alpn"]
    outcomes = set()
    for i in range(len(raw)):
        for delta in (1, 0x80, 0xFF):
            bad = raw[:i] + bytes([(raw[i] + delta) & 0xFF]) + raw[i + 1:]
            try:
                result = parse_client_hello(bad, MAX)
            except TlsHelloError:
                outcomes.add("error")
            else:
                outcomes.add("needmore" if result is NeedMore else "hello")
    assert outcomes == {"error", "needmore", "hello"}


# -- the alert the front end sends when no rule matches ---------------------------------------------------------------

def test_handshake_failure_alert_understood_by_openssl(real_hellos):
    assert HANDSHAKE_FAILURE_ALERT == b"\x15\x03\x01\x00\x02\x02\x28"
    assert alert_record(112) == b"\x15\x03\x01\x00\x02\x02\x70"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="www.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    incoming.write(HANDSHAKE_FAILURE_ALERT)
    with pytest.raises(ssl.SSLError, match="(?i)handshake.failure"):
        client.do_handshake()


# -- resumption: what a returning client sends (the case the shared session cache exists for) -------------------------

def test_tls13_resumption_hello_with_pre_shared_key(resumption_hellos):
    raw = resumption_hellos["tls13"]
    hello = parse(raw)
    assert hello.sni == "resume.example" and hello.versions == [TLS13]
    assert hello.extensions[-1] == 41                     # pre_shared_key, last as RFC 8446 §4.2.11 requires
    for cut in range(len(raw)):
        assert parse_client_hello(raw[:cut], MAX) is NeedMore


def test_tls12_resumption_hello_with_ticket(resumption_hellos):
    hello = parse(resumption_hellos["tls12"])
    assert hello.sni == "resume.example" and hello.versions == [TLS12]
    assert 35 in hello.extensions                          # session_ticket carrying the ticket


def test_pre_shared_key_moved_is_malformed(b, resumption_hellos):
    """Reorder a real resumption hello's extensions so that pre_shared_key is not last."""
    handshake = b.unwrap(resumption_hellos["tls13"])
    body = handshake[4:]
    pos = 35 + body[34]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    exts, block = [], body[pos + 2:]
    while block:
        length = int.from_bytes(block[2:4], "big")
        exts.append(block[:4 + length])
        block = block[4 + length:]
    assert int.from_bytes(exts[-1][:2], "big") == 41
    reordered = b"".join([exts[-1]] + exts[:-1])
    new_body = body[:pos] + b.vec16(reordered)
    assert "pre_shared_key" in malformed(b.records(b"\x01" + len(new_body).to_bytes(3, "big") + new_body))
