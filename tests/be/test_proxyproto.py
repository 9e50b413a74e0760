"""tcpha.proxyproto against byte examples written down from HAProxy's proxy-protocol.txt (sections 2.1
and 2.2): the v1 line's fields and longest forms, the v2 signature, version/command, family and the
address block in network order."""

from __future__ import annotations

import pytest

from tcpha.proxyproto import (V2_SIGNATURE, ProxyHeader, ProxyProtocolError, parse_v1, parse_v2, proxy_header,
                              v1_header, v2_header)

CLIENT4, VIP4 = ("192.0.2.1", 56324), ("198.51.100.10", 443)


def test_v2_signature_is_the_twelve_bytes_of_the_spec():
    assert V2_SIGNATURE == bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_v1_tcp4_line():
    assert v1_header(CLIENT4, VIP4) == b"PROXY TCP4 192.0.2.1 198.51.100.10 56324 443\r\n"


def test_v1_longest_tcp4_and_tcp6_lines_of_the_spec():
    top4 = ("255.255.255.255", 65535)
    assert v1_header(top4, top4) == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    top6 = ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    line = v1_header(top6, top6)
    assert line == (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                    b"65535 65535\r\n")
    assert len(line) == 104      # the spec: 107 is the UNKNOWN form with both addresses, the longest line


def test_v1_unknown():
    assert v1_header(None, VIP4) == b"PROXY UNKNOWN\r\n"


def test_v2_tcp4_header():
    assert v2_header(CLIENT4, VIP4) == bytes.fromhex(
        "0d0a0d0a000d0a515549540a"      # signature
        "21"                            # version 2, command PROXY
        "11"                            # AF_INET, STREAM
        "000c"                          # 12 bytes follow
        "c0000201" "c633640a"           # 192.0.2.1, 198.51.100.10
        "dc04" "01bb")                  # 56324, 443


def test_v2_tcp6_header():
    assert v2_header(("2001:db8::1", 1234), ("2001:db8::2", 80)) == bytes.fromhex(
        "0d0a0d0a000d0a515549540a" "21" "21" "0024"
        "20010db8000000000000000000000001" "20010db8000000000000000000000002" "04d2" "0050")


def test_v2_local_header_without_addresses():
    assert v2_header(None, None) == bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000")


def test_ipv4_mapped_peer_is_written_as_ipv4():
    assert v1_header(("::ffff:192.0.2.1", 56324), VIP4) == b"PROXY TCP4 192.0.2.1 198.51.100.10 56324 443\r\n"


def test_proxy_header_dispatches_and_round_trips():
    for version, parse in (("v1", parse_v1), ("v2", parse_v2)):
        data = proxy_header(version, CLIENT4, VIP4)
        header, n = parse(data + b"GET / HTTP/1.1\r\n")
        assert (header, n) == (ProxyHeader(CLIENT4, VIP4), len(data))


@pytest.mark.parametrize("bad", [("v3", CLIENT4, VIP4), ("v1", ("192.0.2.1", 1), ("2001:db8::2", 80)),
                                 ("v2", ("not-an-ip", 1), VIP4), ("v2", ("192.0.2.1", 70000), VIP4)])
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(ProxyProtocolError):
        proxy_header(*bad)


def test_parsers_refuse_what_is_not_a_header():
    with pytest.raises(ProxyProtocolError):
        parse_v1(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyProtocolError):
        parse_v2(b"GET / HTTP/1.1\r\n\r\n")
