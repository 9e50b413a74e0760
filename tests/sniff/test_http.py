"""tcpha.sniff.http: request heads from real clients, every byte boundary, and every refusal RFC 9112 asks for."""

from __future__ import annotations

import pytest

from tcpha.fe.responses import error_response
from tcpha.sniff.http import HeadError, NeedMore, RequestHead, parse_request_head, target_path

MAX = 16384

CHROME = (b"GET /static/app.js?v=3 HTTP/1.1\r\n"
          b"Host: www.example.com\r\n"
          b"Connection: keep-alive\r\n"
          b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
          b"sec-ch-ua-mobile: ?0\r\n"
          b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
          b"Chrome/124.0.0.0 Safari/537.36\r\n"
          b'sec-ch-ua-platform: "Linux"\r\n'
          b"Accept: */*\r\n"
          b"Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: script\r\n"
          b"Referer: https://www.example.com/\r\n"
          b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
          b"Accept-Language: en-GB,en-US;q=0.9,en;q=0.8\r\n"
          b"Cookie: sid=4f2a; theme=dark\r\n\r\n")
FIREFOX = (b"POST /api/upload HTTP/1.1\r\n"
           b"Host: Upload.Example.com:8443\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0\r\n"
           b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Content-Type: multipart/form-data; boundary=---------------------------1234\r\n"
           b"Content-Length: 1048576\r\n"
           b"Origin: https://upload.example.com\r\nConnection: keep-alive\r\n"
           b"Upgrade-Insecure-Requests: 1\r\nPriority: u=0, i\r\n\r\n"
           b"-----------------------------1234\r\n")


def parse(buf: bytes, max_size: int = MAX) -> RequestHead:
    result = parse_request_head(buf, max_size)
    assert isinstance(result, RequestHead), result
    return result


def refused(buf: bytes, max_size: int = MAX) -> HeadError:
    with pytest.raises(HeadError) as info:
        parse_request_head(buf, max_size)
    return info.value


# -- real clients --------------------------------------------------------------------------------------------------

def test_curl_get(b):
    raw = b.http_head("curl", "-H", "X-Trace: 1")
    head = parse(raw)
    assert (head.method, head.uri, head.version, head.path) == (b"GET", b"/", b"HTTP/1.1", b"/")
    assert head.host == b"127.0.0.1"                     # port stripped
    assert head.head_len == len(raw)
    assert (b"x-trace", b"1") in head.headers and head.headers[0][0] == b"host"
    assert head.content_length is None and not head.chunked


def test_curl_post_body_after_head(b):
    raw = b.http_head("curl", "--data-binary", "hello=world")
    head = parse(raw)
    assert head.method == b"POST" and head.content_length == 11 and not head.chunked
    assert raw[head.head_len:] in (b"", b"hello=world")  # the body may come in the same segment


def test_curl_chunked_upload(b):
    raw = b.http_head("curl", "-H", "Transfer-Encoding: chunked", "--data-binary", "abc")
    head = parse(raw)
    assert head.chunked and head.content_length is None


def test_wrk(b):
    head = parse(b.http_head("wrk"))
    assert head.uri == b"/index.html" and head.host == b"127.0.0.1"


@pytest.mark.parametrize("raw", [CHROME, FIREFOX], ids=["chrome", "firefox"])
def test_browser_heads(raw):
    head = parse(raw)
    assert head.head_len == raw.index(b"\r\n\r\n") + 4
    assert head.headers[0][0] == b"host"


def test_browser_fields():
    chrome, firefox = parse(CHROME), parse(FIREFOX)
    assert chrome.uri == b"/static/app.js?v=3" and chrome.path == b"/static/app.js"
    assert chrome.host == b"www.example.com"
    assert firefox.host == b"upload.example.com" and firefox.content_length == 1048576
    assert (b"content-type", b"multipart/form-data; boundary=---------------------------1234") in firefox.headers


# -- incremental arrival ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [CHROME, FIREFOX, b"GET / HTTP/1.0\n\n", b"\r\n\r\nGET /x HTTP/1.1\nHost: a\n\n"],
                         ids=["chrome", "firefox", "lf", "leading-empty"])
def test_every_prefix_needs_more(raw):
    full = parse(raw)
    for cut in range(full.head_len):
        assert parse_request_head(raw[:cut], MAX) is NeedMore, cut
    assert parse(raw[:full.head_len]) == full


def test_need_more_is_a_sentinel():
    result = parse_request_head(b"GET", MAX)
    assert result is NeedMore and isinstance(result, NeedMore)


# -- tolerated -------------------------------------------------------------------------------------------------------

def test_bare_lf_and_mixed_line_ends():
    head = parse(b"GET /a HTTP/1.1\nHost: a.example\r\nAccept: */*\n\r\n")
    assert head.host == b"a.example" and head.headers[1] == (b"accept", b"*/*")


def test_leading_empty_lines_count_in_head_len():
    raw = b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    head = parse(raw)
    assert head.head_len == len(raw)
    assert head.leading == 5                 # the bytes the front end reads off before the handoff
    assert parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").leading == 0


# -- the path rules see: normalised as nginx resolves it (docs/rules.md) -------------------------

@pytest.mark.parametrize("target,path,rule_target", [
    (b"/a%2Ejpg", b"/a.jpg", b"/a.jpg"),
    (b"/a%2ejpg?v=%2E", b"/a.jpg", b"/a.jpg?v=%2E"),             # the query is matched as sent
    (b"/x/../a.jpg", b"/a.jpg", b"/a.jpg"),
    (b"/x/%2E%2E/a.jpg?q=/../", b"/a.jpg", b"/a.jpg?q=/../"),
    (b"//x///y", b"/x/y", b"/x/y"),                              # nginx merge_slashes
    (b"/x//../a", b"/a", b"/a"),                                 # merged first, as nginx does
    (b"/x/.", b"/x/", b"/x/"),
    (b"/x/y/..", b"/x/", b"/x/"),
    (b"/x/..", b"/", b"/"),
    (b"/%2561", b"/%61", b"/%61"),                               # decoded once
    (b"/a%20b%3F", b"/a b?", b"/a b?"),                          # every %XX, as nginx's $uri
    (b"/b%C3%BCcher", "/bücher".encode(), "/bücher".encode()),
    (b"/x/.../a", b"/x/.../a", b"/x/.../a"),
    (b"/a;p=1", b"/a;p=1", b"/a;p=1"),
    (b"http://h.example/x/../a%2Ejpg?z", b"/a.jpg", b"/a.jpg?z"),
])
def test_path_is_normalised_and_uri_kept(target, path, rule_target):
    head = parse(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (head.uri, head.path, head.target) == (target, path, rule_target)


@pytest.mark.parametrize("target", [
    b"/a%2Fb", b"/a%2fb", b"/a%00", b"/a%0D%0A", b"/a%7F", b"/a%zz", b"/a%4", b"/a%", b"/..", b"/../a",
    b"/x/../../a", b"/%2E%2E/a", b"/.%2e", b"/a#b", b"http://h/../a",
])
def test_paths_that_cannot_be_normalised_safely_are_400(target):
    assert refused(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n").status == 400


def test_non_path_targets_are_not_normalised():
    assert parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").target == b"*"
    assert parse(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n").target == b"h:443"


def test_http10_without_host():
    head = parse(b"GET /old HTTP/1.0\r\nUser-Agent: ancient\r\n\r\n")
    assert head.host is None and head.version == b"HTTP/1.0"


def test_higher_minor_version_accepted():
    assert parse(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n").version == b"HTTP/1.2"


@pytest.mark.parametrize("value,host", [
    (b"WWW.Example.COM", b"www.example.com"),
    (b"www.example.com:8080", b"www.example.com"),
    (b"www.example.com.", b"www.example.com"),
    (b"[2001:DB8::1]:443", b"[2001:db8::1]"),
    (b"10.0.0.1:80", b"10.0.0.1"),
    (b"", b""),                                      # RFC 9110 §7.2: empty authority → empty Host
    (b"  spaced.example  ", b"spaced.example"),      # OWS around the value is not part of it
])
def test_host_normalised(value, host):
    assert parse(b"GET / HTTP/1.1\r\nHost:" + value + b"\r\n\r\n").host == host


def test_absolute_form_host_wins():
    head = parse(b"GET http://Target.Example:81/p/a.jpg?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert head.host == b"target.example" and head.path == b"/p/a.jpg" and head.uri.startswith(b"http://")


def test_other_target_forms():
    assert parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").path == b"*"
    connect = parse(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n")
    assert connect.uri == b"db.example:5432" and connect.path == b""


def test_obs_text_in_target_tolerated():
    assert parse("GET /bücher HTTP/1.1\r\nHost: a\r\n\r\n".encode()).path == "/bücher".encode()


def test_identical_content_lengths_merge():
    assert parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 42\r\nContent-Length: 42\r\n\r\n").content_length == 42
    assert parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 42, 42\r\n\r\n").content_length == 42


def test_transfer_codings():
    assert parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").chunked
    assert parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n").chunked


def test_bytes_after_head_ignored():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n"
    assert parse(raw).head_len == raw.index(b"GET /next")


def test_accepts_bytearray_and_memoryview():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert parse(bytearray(raw)) == parse(raw) == parse(memoryview(raw))


# -- refused ---------------------------------------------------------------------------------------------------------

BAD_400 = {
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n",
    "whitespace-after-request-line": b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "no-colon": b"GET / HTTP/1.1\r\nHost: a\r\nnonsense\r\n\r\n",
    "empty-name": b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
    "bad-name-char": b"GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "bare-cr-in-request-line": b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n",
    "bad-method": b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "double-space": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "tab-separator": b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "leading-space": b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "trailing-space": b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    "lowercase-version": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "missing-host-11": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two-hosts-10": b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
    "bad-host": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "host-with-userinfo": b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
    "host-bad-port": b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n",
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "conflicting-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "conflicting-cl-list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
    "non-numeric-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: five\r\n\r\n",
    "signed-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
    "negative-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "empty-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n",
    "empty-cl-element": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,\r\n\r\n",
    "huge-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "te-not-final-chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "te-chunked-twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    "te-empty": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n",
    "te-in-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "asterisk-not-options": b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
    "relative-target": b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute-userinfo": b"GET http://u:p@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_400.values(), ids=BAD_400.keys())
def test_refused_400(raw):
    assert refused(raw).status == 400


def test_unknown_transfer_coding_501():
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: zstd, chunked\r\n\r\n").status == 501


@pytest.mark.parametrize("raw", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n",
                                 b"GET / HTTP/3.0\r\nHost: a\r\n\r\n"])
def test_other_major_versions_505(raw):
    assert refused(raw).status == 505


def test_error_message_is_one_line():
    e = refused(BAD_400["two-hosts"])
    assert "Host" in str(e) and "\n" not in str(e)


# -- early refusal: junk is refused before the head could be complete --------------------------------------------------

@pytest.mark.parametrize("raw", [b"\x00\x01\x02", b"SSH-2.0-OpenSSH_9.2\r\n", b"GET /x HTTQ", b"\x16\x03\x01\x02\x00\x01",
                                 b"GET / HTTP/1.1 extra\r\nHost:", b"PRI * HTTP/2.0\r\n"])
def test_junk_refused_early(raw):
    with pytest.raises(HeadError):
        parse_request_head(raw, MAX)


def test_partial_cr_waits():
    assert parse_request_head(b"\r", MAX) is NeedMore
    assert parse_request_head(b"GET / HTTP/1.1\r", MAX) is NeedMore


# -- size limit ------------------------------------------------------------------------------------------------------

def test_head_exactly_max_size_parses():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert parse(raw + b"body", max_size=len(raw)).head_len == len(raw)


def test_head_one_over_max_size_is_400():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert refused(raw, max_size=len(raw) - 1).status == 400


def test_long_request_line_is_414():
    raw = b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert refused(raw[:MAX], MAX).status == 414
    assert refused(raw, MAX).status == 414


def test_long_header_is_400_before_head_ends():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * MAX
    assert refused(raw[:MAX], MAX).status == 400


def test_short_of_max_size_waits():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 100
    assert parse_request_head(raw, len(raw) + 1) is NeedMore


def test_empty_lines_only_count_too():
    assert refused(b"\r\n" * 10, max_size=20).status == 414


# -- helpers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri,path", [(b"/a.jpg?x=1", b"/a.jpg"), (b"/a?b?c", b"/a"), (b"/", b"/"),
                                      (b"http://h/x?q", b"/x"), (b"https://h", b"/"), (b"*", b"*"),
                                      (b"h:443", b"")])
def test_target_path(uri, path):
    assert target_path(uri) == path


def test_error_response_is_valid_http():
    # The answer the front end writes itself (tcpha/fe/responses.py) when no back end takes a request.
    raw = error_response(503)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"503 Service Unavailable" in body
