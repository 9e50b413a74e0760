"""Per-connection cost of the front end's sniffing and rule matching (run by hand; not a test).

    python3 bench/rules.py            # writes bench/results/rules.md

Measures µs per call of RuleTable.candidates() for small and large rule tables, HTTP and TLS facts, and of the two
sniffers on realistic input (a browser request head, a real OpenSSL ClientHello), on this machine, one core.
"""

from __future__ import annotations

import os
import platform
import re
import ssl
import sys
import time
from dataclasses import dataclass

from tcpha.fe.rules import RequestFacts, RuleTable
from tcpha.sniff.http import parse_request_head
from tcpha.sniff.tls import parse_client_hello

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rules.md")


@dataclass(frozen=True)
class Rule:
    target: str
    field: str
    pattern: str
    regex: re.Pattern
    lineno: int


def table(lines: list[tuple[str, str]]) -> RuleTable:
    rules = []
    for i, (target, text) in enumerate(lines):
        field, pattern = "uri", text
        prefix, sep, rest = text.partition(":")
        if sep and prefix in ("host", "sni", "alpn"):
            field, pattern = prefix, rest
        flags = re.I if field in ("host", "sni") else 0
        rules.append(Rule(target, field, pattern, re.compile(pattern.encode(), flags), i + 1))
    return RuleTable(rules)


def per_call_us(fn, arg, min_time: float = 0.3) -> float:
    n = 1000
    while True:
        t0 = time.process_time()
        for _ in range(n):
            fn(arg)
        elapsed = time.process_time() - t0
        if elapsed >= min_time:
            break
        n *= 4
    best = elapsed / n
    for _ in range(2):  # best of three runs
        t0 = time.process_time()
        for _ in range(n):
            fn(arg)
        best = min(best, (time.process_time() - t0) / n)
    return best * 1e6


def real_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="www.example.com")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


HEAD = (b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: www.example.com\r\nConnection: keep-alive\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36\r\n"
        b"Accept: */*\r\nReferer: https://www.example.com/\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
        b"Accept-Language: en-GB,en-US;q=0.9,en;q=0.8\r\nCookie: sid=4f2a; theme=dark\r\n\r\n")

# the same head with a path that needs every normalisation step (%XX, //, ., ..)
ENCODED = HEAD.replace(b"/static/app.js", b"/static//old/./../app%2Ejs", 1)


def main() -> int:
    tcpha4 = table([("be1", "jpg$"), ("be1", "gif$"), ("be2", r"\.php"), ("be3", ".*")])
    mixed20 = table([(f"be{i % 6}", f"host:^site{i}\\.example\\.com$") for i in range(8)]
                    + [(f"be{i % 6}", f"sni:^site{i}\\.example\\.com$") for i in range(8)]
                    + [("be1", "alpn:^h2$"), ("be2", r"\.(jpg|png|gif)$"), ("be3", "^/api/"), ("be4", ".*")])
    big100 = table([(f"be{i % 10}", f"^/app{i}/") for i in range(99)] + [("be0", ".*")])
    http_facts = RequestFacts(uri=b"/static/app.js?v=3", host=b"www.example.com", sni=None, alpn=[])
    tls_facts = RequestFacts(uri=None, host=None, sni="site7.example.com", alpn=["h2", "http/1.1"])
    hello = real_hello()
    rows = [
        ("candidates, 4 TCPHA uri rules, HTTP", per_call_us(tcpha4.candidates, http_facts)),
        ("candidates, 20 mixed rules, HTTP", per_call_us(mixed20.candidates, http_facts)),
        ("candidates, 20 mixed rules, TLS (SNI + ALPN)", per_call_us(mixed20.candidates, tls_facts)),
        ("candidates, 100 uri rules, HTTP (last rule matches)", per_call_us(big100.candidates, http_facts)),
        (f"parse_request_head, browser head ({len(HEAD)} B)", per_call_us(lambda b: parse_request_head(b, 16384), HEAD)),
        (f"parse_request_head, browser head, path to normalise ({len(ENCODED)} B)",
         per_call_us(lambda b: parse_request_head(b, 16384), ENCODED)),
        (f"parse_request_head, incomplete head ({len(HEAD) - 3} B → NeedMore)",
         per_call_us(lambda b: parse_request_head(b, 16384), HEAD[:-3])),
        (f"parse_client_hello, OpenSSL 3 hello ({len(hello)} B)",
         per_call_us(lambda b: parse_client_hello(b, 16384), hello)),
    ]
    lines = ["# Sniffing and rule matching: cost per connection", "",
             f"`python3 bench/rules.py` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs (shared machine; "
             "CPU time, best of three runs, one core).", "",
             "| operation | µs per call |", "| --- | ---: |"]
    lines += [f"| {name} | {us:.2f} |" for name, us in rows]
    lines += ["", "The front end's budget is 150 µs of CPU per handed-off connection; sniffing plus "
              "matching uses the sum of one parse and one candidates() call."]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
