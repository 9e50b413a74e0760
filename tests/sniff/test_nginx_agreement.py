"""The path uri rules match is the path nginx serves: normalise_path against a real nginx on a Unix socket.

For a fixed set of paths built from the pieces that make paths ambiguous (%XX of dots, slashes, NUL, '%',
'?', '#', UTF-8; '.', '..', empty segments, ';'), nginx's $uri (what it resolves and serves) is compared with
tcpha.sniff.http.normalise_path: where the front end accepts a path, nginx must accept it too and resolve it to
the same bytes; the front end may refuse more (an encoded '/' or control byte) but never route a path to a
rule nginx then reads differently. The namespace-lab version with the whole front end is
tests/e2e/test_request_parsing.py.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess

import pytest

from tcpha.sniff.http import HeadError, normalise_path
from tests.support import wait_until

PIECES = [b"", b".", b"..", b"a", b"b.jpg", b"%2E", b"%2e%2E", b"%2F", b"%00", b"%41", b"%2561", b"...", b".a",
          b"%C3%BC", b"\xff", b";x", b"%20", b"%3F", b"%23", b"%25", b"x%2E", b"%2E.", b"+", b"%5C", b"\\",
          b"%0a", b"%7f"]


def paths(n: int = 600, seed: int = 17) -> list[bytes]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        segments = b"/".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))
        out.add((b"/a/b/" if rng.random() < 0.5 else b"/") + segments)
    return sorted(out)


@pytest.fixture
def nginx(tmp_path):
    """nginx on a Unix socket logging status and $uri per request; yields (socket path, log path)."""
    assert shutil.which("nginx"), "nginx is not installed (scripts/install-deps installs nginx-light)"
    (tmp_path / "root").mkdir()
    (tmp_path / "tmp").mkdir()
    sock, log = tmp_path / "nginx.sock", tmp_path / "access.log"
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format t '$status|$uri';
    access_log {log} t;
    client_body_temp_path {tmp_path}/tmp;
    server {{ listen unix:{sock}; root {tmp_path}/root; }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf),
                             "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def up() -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
        return True
    try:
        wait_until(up, timeout=10, what="nginx listening on its Unix socket")
        yield sock, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def get(sock_path, path: bytes) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_normalised_path_is_what_nginx_resolves(nginx):
    sock, log = nginx
    sent = paths()
    statuses = [get(sock, p) for p in sent]
    # nginx writes the log line before it closes the connection; every request (400s too) has one
    lines = wait_until(lambda: (lambda ls: ls if len(ls) == len(sent) else None)(log.read_bytes().splitlines()),
                       timeout=10, what="one access log line per request")
    unescape = lambda b: re.sub(rb"\\x([0-9A-F]{2})", lambda m: bytes((int(m.group(1), 16),)), b)  # noqa: E731
    accepted = 0
    for path, status, line in zip(sent, statuses, lines):
        try:
            ours = normalise_path(path)
        except HeadError as e:
            assert e.status == 400
            continue
        accepted += 1
        logged_status, _, uri = line.partition(b"|")
        assert int(logged_status) == status
        assert status != 400, f"the front end routes {path!r} as {ours!r}, nginx refuses it"
        assert unescape(uri) == ours, f"{path!r}: rules match {ours!r}, nginx serves {unescape(uri)!r}"
    assert accepted > len(sent) // 3          # the set exercises accepted paths, not only refusals
