"""The README's main command: `tcpha-lab demo` runs the whole product in a namespace lab and says so."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tcpha-lab", "demo", *args], capture_output=True, text=True, timeout=600)


def _lab_prefix(out: str) -> str:
    m = re.search(r"^lab (\w+):", out, re.M)
    assert m, out
    return m.group(1)


def _leftovers(prefix: str) -> list[str]:
    """The lab's namespaces and scratch directories still there."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    dirs = [str(d) for d in Path(tempfile.gettempdir()).glob(f"tcpha-lab-{prefix}-*")]
    return [n for n in names if n.startswith(prefix + "-")] + dirs


def test_demo_routes_hands_off_and_resumes_tls_across_back_ends():
    r = _demo()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = re.findall(r"^(/\S+)\s+(\d{3})\s+(be\d)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", r.stdout, re.M)
    assert rows, out
    assert all(status == "200" for _, status, *_ in rows), out
    by_uri = {uri: be for uri, _, be, *_ in rows}
    assert by_uri["/img/photo.jpg"] == "be1" and by_uri["/video/clip.mp4"] == "be2", out
    received = sum(int(r[4].replace(",", "")) for r in rows)
    transmitted = sum(int(r[5].replace(",", "")) for r in rows)
    assert received > 20_000_000 and transmitted < 0.05 * received, out
    assert re.search(r"^TLSv1\.2 .*b\.example\s+be2\s+200\s+Reused$", r.stdout, re.M), out
    assert re.search(r"^TLSv1\.3 .*b\.example\s+be2\s+200\s+Reused$", r.stdout, re.M), out
    assert _leftovers(_lab_prefix(r.stdout)) == []


def test_demo_with_the_redis_cluster_behind_dc_server():
    r = _demo("--cache-backend", "redis-cluster")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Redis Cluster on the cache host (TLS on every link)" in r.stdout, out
    assert "a session made on be1 was resumed on be2" in r.stdout, out
    assert _leftovers(_lab_prefix(r.stdout)) == []


def test_demo_keep_prints_a_status_page_url_reachable_from_the_host():
    import json
    import urllib.request
    r = _demo("--keep")
    out = r.stdout + r.stderr
    prefix = _lab_prefix(r.stdout)
    try:
        assert r.returncode == 0, out
        m = re.search(r"^status page: (http://127\.0\.0\.1:\d+/) ", r.stdout, re.M)
        assert m, out
        url = m.group(1)
        with urllib.request.urlopen(url, timeout=30) as page:
            assert b"tcpha-fe status" in page.read()
        with urllib.request.urlopen(url + "status.json", timeout=30) as page:
            doc = json.load(page)
        assert [b["status"] for b in doc["backends"]] == ["up", "up"]
        assert doc["handoffs"] >= 1
    finally:
        down = subprocess.run(["tcpha-lab", "down", prefix], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert _leftovers(prefix) == []
    with pytest.raises(OSError):                      # the forwarder went with the lab
        urllib.request.urlopen(url, timeout=10)
