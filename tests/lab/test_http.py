"""Origin servers on the lab's back ends."""

from __future__ import annotations

import hashlib
import json

import pytest

from tcpha.lab import LabError
from tcpha.lab.http import BACKEND_HEADER, file_content, file_sha256, nginx_available, start_backends_http
from tcpha.lab.http import start_http

pytestmark = pytest.mark.netns

FILES = {"1k.bin": 1024, "big.bin": 3 * (1 << 20) + 17, "img/pic.jpg": 7000, "empty": 0}


def fetch(lab, host, url):
    """curl from `host`; returns (status, backend header, body)."""
    r = lab.run(host, ["curl", "-sS", "-D", "/dev/stderr", "-o", "-", url], capture_output=True)
    assert r.returncode == 0, r.stderr
    head = r.stderr.decode().splitlines()
    status = int(head[0].split()[1])
    backend = next((l.split(":", 1)[1].strip() for l in head if l.lower().startswith(BACKEND_HEADER.lower())),
                   None)
    return status, backend, r.stdout


def test_file_content_is_deterministic():
    assert file_content("a", 3 << 20) == file_content("a", 3 << 20)
    assert file_content("a", 100) != file_content("b", 100)
    assert file_content("a", 100) == file_content("a", 2 << 20)[:100]
    assert file_sha256("a", 2_500_000) == hashlib.sha256(file_content("a", 2_500_000)).hexdigest()


@pytest.mark.parametrize("kind", ["nginx", "python"])
def test_each_backend_serves_files_and_says_who_it_is(lab, kind):
    if kind == "nginx" and not nginx_available():
        pytest.fail("nginx missing: scripts/install-deps installs nginx-light")
    servers = start_backends_http(lab, files=FILES, kind=kind)
    assert set(servers) == {"be1", "be2"}
    for host, web in servers.items():
        assert web.kind == kind and web.running()
        for name in FILES:
            status, backend, body = fetch(lab, "client", web.url(name))
            assert (status, backend) == (200, host)
            assert body == web.expected(name)
        status, backend, body = fetch(lab, "client", web.url("whoami"))
        assert (status, backend, body) == (200, host, f"{host}\n".encode())
        status, _, _ = fetch(lab, "client", web.url("missing"))
        assert status == 404


def test_python_server_hashes_uploads(lab):
    web = start_http(lab, "be2", kind="python", port=9000, files={})
    body = file_content("upload", 5_000_000)
    path = lab.workdir / "upload.bin"
    path.write_bytes(body)
    for mode in (["--data-binary", f"@{path}"], ["-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}"]):
        r = lab.run("client", ["curl", "-sS", *mode, web.url("up")], capture_output=True, check=True)
        answer = json.loads(r.stdout)
        assert answer == {"backend": "be2", "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_servers_are_killed_by_down(lab_factory):
    lab = lab_factory()
    web = start_http(lab, "be1", files={"a": 10})
    assert web.running()
    lab.down()
    assert not web.running()


def test_stop_one_server_and_port_clash(lab):
    web = start_http(lab, "be1", kind="python", files={"a": 10})
    with pytest.raises(LabError):  # same name twice
        start_http(lab, "be1", kind="python", files={"a": 10})
    with pytest.raises(LabError, match="exited"):  # port taken
        start_http(lab, "be1", kind="python", name="other", files={"a": 10})
    web.stop()
    assert not web.running() and not lab.processes()
