"""End to end: what the front end's request parser accepts is routed by what nginx on the back end serves."""

from __future__ import annotations

import pytest

from tests.e2e.test_handoff import header, raw_exchange, status_of

pytestmark = pytest.mark.netns


def test_leading_empty_lines_before_the_request_line_are_routed(deployment):
    for prefix in (b"\r\n", b"\n", b"\r\n\r\n"):
        raw = raw_exchange(deployment, prefix + b"GET /img/logo.jpg HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert raw, f"no answer to {prefix!r}"
        assert status_of(raw) == 200, raw[:200]
        assert header(raw, b"x-tcpha-backend") == b"be1"


@pytest.mark.parametrize("parts", [
    [b"\r\n", b"GET /img/logo.jpg HTTP/1.1\r\nHost: a\r\n\r\n"],
    [b"\r", b"\nGET /img/logo.jpg HTTP/1.1\r\nHost: a\r\n\r\n"],
    [b"\r\nGET /img/logo.jpg HTTP/1.1\r\nHost: a\r\n\r\n"],
    [b"\r\n\r\nGET /img/logo.jpg HTTP/1.0\r\n\r\n"],
])
def test_leading_empty_lines_split(deployment, parts):
    import time
    s = deployment.connect()
    try:
        for p in parts:
            s.sendall(p)
            time.sleep(0.2)
        s.settimeout(10)
        raw = s.recv(65536)
    finally:
        s.close()
    assert raw, "no answer"
    assert status_of(raw) == 200, raw[:200]
