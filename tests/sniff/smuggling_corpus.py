"""The request-smuggling and rule-evasion corpus, shared by the parser's unit tests
(tests/sniff/test_smuggling.py) and the end-to-end test through the lab's nginx back ends
(tests/e2e/test_request_parsing.py).

Each case is written down once with its fixed expected outcomes: what the parser gives (a refusal status,
or the host and normalised path rules see) and where the lab's rules send it
(tests/e2e/conftest.py RULES_BE1_BE2: ``jpg$`` and ``host:^img\\.`` to be1, ``^/(?!private/)`` to be2,
``/private/...`` to no one: 503 written by the front end).
"""

from __future__ import annotations

from dataclasses import dataclass

HOST = b"www.example"


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    parsed: int | tuple[bytes | None, bytes]   # a refusal status, or (host, normalised path)
    lab: str | int                           # "be1" / "be2": the back end that answers; else the FE's status


def get(target: bytes, *fields: bytes, version: bytes = b"HTTP/1.1", method: bytes = b"GET",
        host: bytes | None = HOST, body: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += list(fields)
    lines.append(b"Connection: close")
    return eol.join(lines) + eol + eol + body


LONG = b"a" * 20000

CASES = [
    # -- rule evasion by percent-encoding, dot-segments, slashes (item 6) --------------------------------------
    Case("pct-encoded-dot", get(b"/img/logo%2Ejpg"), (HOST, b"/img/logo.jpg"), "be1"),
    Case("pct-encoded-lowercase", get(b"/img/logo%2ejp%67"), (HOST, b"/img/logo.jpg"), "be1"),
    Case("dot-segment-into-private", get(b"/index.html/../private/x"), (HOST, b"/private/x"), 503),
    Case("pct-encoded-private", get(b"/%70rivate/x"), (HOST, b"/private/x"), 503),
    Case("double-slash-private", get(b"//private/x"), (HOST, b"/private/x"), 503),
    Case("single-dot-segment-private", get(b"/./private/x"), (HOST, b"/private/x"), 503),
    Case("encoded-dot-segments", get(b"/img/%2e%2e/img/logo.jpg"), (HOST, b"/img/logo.jpg"), "be1"),
    Case("dot-segment-out-of-private", get(b"/private/../index.html"), (HOST, b"/index.html"), "be2"),
    Case("pct-encoded-percent-decoded-once", get(b"/%2570rivate/x"), (HOST, b"/%70rivate/x"), "be2"),
    Case("query-as-sent", get(b"/index.html?f=a.jpg"), (HOST, b"/index.html"), "be1"),
    Case("query-not-normalised", get(b"/index.html?f=/../private/x"), (HOST, b"/index.html"), "be2"),
    Case("encoded-slash", get(b"/img%2Flogo.jpg"), 400, 400),
    Case("encoded-slash-lowercase", get(b"/private%2f..%2fimg/logo.jpg"), 400, 400),
    Case("encoded-nul", get(b"/img/logo%00.jpg"), 400, 400),
    Case("encoded-lf", get(b"/img/logo%0a.jpg"), 400, 400),
    Case("above-root", get(b"/../img/logo.jpg"), 400, 400),
    Case("encoded-above-root", get(b"/img/%2E%2E/%2e%2e/img/logo.jpg"), 400, 400),
    Case("raw-hash", get(b"/private/x#/../../index.html"), 400, 400),
    Case("malformed-percent", get(b"/img/logo.jpg%zz"), 400, 400),
    Case("truncated-percent", get(b"/img/logo.jpg%2"), 400, 400),
    # -- leading empty lines (item 5) ---------------------------------------------------------------------------
    Case("leading-crlf", b"\r\n" + get(b"/img/logo.jpg"), (HOST, b"/img/logo.jpg"), "be1"),
    Case("leading-lf-lf", b"\n\n" + get(b"/index.html"), (HOST, b"/index.html"), "be2"),
    Case("bare-lf-line-ends", get(b"/img/logo.jpg", eol=b"\n"), (HOST, b"/img/logo.jpg"), "be1"),
    # -- Content-Length / Transfer-Encoding -----------------------------------------------------------------
    Case("cl-cl-conflicting", get(b"/index.html", b"Content-Length: 5", b"Content-Length: 6", method=b"POST",
                                  body=b"hello!"), 400, 400),
    Case("cl-list-conflicting", get(b"/index.html", b"Content-Length: 5, 6", method=b"POST", body=b"hello!"),
         400, 400),
    Case("cl-cl-identical", get(b"/index.html", b"Content-Length: 5", b"Content-Length: 5", method=b"POST",
                                body=b"hello"), (HOST, b"/index.html"), "be2"),
    Case("cl-signed", get(b"/index.html", b"Content-Length: +5", method=b"POST", body=b"hello"), 400, 400),
    Case("cl-hex", get(b"/index.html", b"Content-Length: 0x5", method=b"POST", body=b"hello"), 400, 400),
    Case("cl-and-te", get(b"/index.html", b"Content-Length: 5", b"Transfer-Encoding: chunked", method=b"POST",
                          body=b"0\r\n\r\n"), 400, 400),
    Case("te-and-cl", get(b"/index.html", b"Transfer-Encoding: chunked", b"Content-Length: 5", method=b"POST",
                          body=b"0\r\n\r\n"), 400, 400),
    Case("te-chunked-twice", get(b"/index.html", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                                 method=b"POST", body=b"0\r\n\r\n"), 400, 400),
    Case("te-chunked-not-last", get(b"/index.html", b"Transfer-Encoding: chunked, gzip", method=b"POST",
                                    body=b"0\r\n\r\n"), 400, 400),
    Case("te-space-before-colon", get(b"/index.html", b"Transfer-Encoding : chunked", method=b"POST",
                                      body=b"0\r\n\r\n"), 400, 400),
    Case("te-in-http10", get(b"/index.html", b"Transfer-Encoding: chunked", method=b"POST", version=b"HTTP/1.0",
                             body=b"0\r\n\r\n"), 400, 400),
    Case("te-unknown-coding", get(b"/index.html", b"Transfer-Encoding: xgzip, chunked", method=b"POST",
                                  body=b"0\r\n\r\n"), 501, 501),
    Case("te-chunked", get(b"/index.html", b"Transfer-Encoding: chunked", method=b"POST",
                           body=b"5\r\nhello\r\n0\r\n\r\n"), (HOST, b"/index.html"), "be2"),
    # -- obs-fold, bare CR, NUL, whitespace -------------------------------------------------------------------
    Case("obs-fold", get(b"/index.html", b"X-A: a", b" b"), 400, 400),
    Case("obs-fold-tab-host", get(b"/index.html", b"\timg.example", host=b"www.example"), 400, 400),
    Case("whitespace-before-first-field", b"GET /index.html HTTP/1.1\r\n Host: img.example\r\nHost: a\r\n\r\n",
         400, 400),
    Case("bare-cr-in-value", get(b"/index.html", b"X-A: a\rHost: img.example"), 400, 400),
    Case("bare-cr-line-end", get(b"/index.html", b"X-A: a\r\rTransfer-Encoding: chunked"), 400, 400),
    Case("bare-cr-in-request-line", get(b"/img/logo\r.jpg"), 400, 400),
    Case("nul-in-value", get(b"/index.html", b"X-A: a\x00b"), 400, 400),
    Case("nul-in-request-line", get(b"/index.html\x00.jpg"), 400, 400),
    Case("tab-in-request-line", b"GET\t/img/logo.jpg HTTP/1.1\r\nHost: a\r\n\r\n", 400, 400),
    Case("two-spaces-in-request-line", b"GET  /img/logo.jpg HTTP/1.1\r\nHost: a\r\n\r\n", 400, 400),
    # -- over-long lines ---------------------------------------------------------------------------------------
    Case("long-header-line", get(b"/index.html", b"X-Long: " + LONG), 400, 400),
    Case("long-request-line", get(b"/" + LONG), 414, 414),
    # -- Host and absolute-form ---------------------------------------------------------------------------------
    Case("absolute-form-host-wins", get(b"http://img.example/index.html"), (b"img.example", b"/index.html"), "be1"),
    Case("absolute-form-host-wins-reverse", get(b"http://www.example/index.html", host=b"img.example"),
         (b"www.example", b"/index.html"), "be2"),
    Case("absolute-form-case-and-port", get(b"http://IMG.Example:80/index.html"), (b"img.example", b"/index.html"),
         "be1"),
    Case("absolute-form-encoded-path", get(b"http://www.example/img/logo%2Ejpg"), (HOST, b"/img/logo.jpg"), "be1"),
    Case("absolute-form-dot-segments", get(b"http://www.example/index.html/../private/x"), (HOST, b"/private/x"),
         503),
    Case("absolute-form-userinfo", get(b"http://img.example@www.example/index.html"), 400, 400),
    Case("two-hosts", get(b"/index.html", b"Host: img.example"), 400, 400),
    Case("host-trailing-dot", get(b"/index.html", host=b"img.example."), (b"img.example", b"/index.html"), "be1"),
    Case("host-upper-case", get(b"/index.html", host=b"IMG.EXAMPLE"), (b"img.example", b"/index.html"), "be1"),
    Case("host-with-space", get(b"/index.html", host=b"img .example"), 400, 400),
    Case("http11-without-host", get(b"/index.html", host=None), 400, 400),
    Case("http10-without-host", get(b"/index.html", host=None, version=b"HTTP/1.0"), (None, b"/index.html"), "be2"),
]
