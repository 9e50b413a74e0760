"""The runnable examples of docs/tls.md (docs/examples/): two instances of each, sharing one
dc_server, resume each other's sessions."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import client_context

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def https_get(port: int, ctx, session=None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
        return data.decode(), tls.session_reused, tls.session


def start_example(procs, name: str, certs, cache: str) -> int:
    proc = procs.add(subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), "--cert", certs.cert, "--key", certs.key,
         "--cache", cache, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    line = proc.stdout.readline()
    m = re.match(r"serving on https://127\.0\.0\.1:(\d+)", line)
    assert m, f"{name}: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
    return int(m.group(1))


@pytest.mark.parametrize("example", ["tls_asyncio_server.py", "tls_http_server.py"])
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_example_instances_resume_each_others_sessions(dc_server, procs, certs, example, version):
    cache, _ = dc_server()
    a = start_example(procs, example, certs, cache)
    b = start_example(procs, example, certs, cache)
    client = client_context(certs, version)

    text, reused, session = https_get(a, client)
    assert text.startswith("HTTP/1.0 200") and f"hello from port {a}, session reused: False" in text
    assert not reused
    text, reused, _ = https_get(b, client, session)
    assert f"hello from port {b}, session reused: True" in text
    assert reused


def _code_after_docstring(path: Path) -> str:
    import ast
    src = path.read_text()
    first = ast.parse(src).body[0]
    return "".join(src.splitlines(keepends=True)[first.end_lineno:]).lstrip("\n")


@pytest.mark.parametrize("example", ["tls_asyncio_server.py", "tls_http_server.py"])
def test_docs_show_the_tested_examples(example):
    doc = (EXAMPLES.parent / "tls.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert _code_after_docstring(EXAMPLES / example) in blocks
