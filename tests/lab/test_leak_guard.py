"""The session hook in tests/conftest.py removes what a test leaked under this run's prefixes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_leaked_lab_is_removed_at_session_end(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    out = tmp_path / "prefix"
    (tmp_path / "test_leaky.py").write_text(f"""
from tcpha.lab import DEFAULT_TOPOLOGY, NamespaceLab

def test_leaks(run_prefix):
    import nftables
    NamespaceLab(DEFAULT_TOPOLOGY, run_prefix).up()   # never torn down
    # nor these, in the root namespace
    assert nftables.Nftables().cmd(f"add table inet {{run_prefix}}_t")[0] == 0
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("add", ifname=run_prefix + "-a", kind="veth", peer=run_prefix + "-b")
    open({str(out)!r}, "w").write(run_prefix)
""")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                        str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    prefix = out.read_text()
    assert "removed leaked namespaces" in r.stdout and f"{prefix}-be1" in r.stdout
    # one end of the veth pair is deleted by name; the kernel removes its peer with it
    assert f"nft table inet {prefix}_t" in r.stdout and f"link {prefix}-" in r.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefix + "-" not in listed
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert prefix not in links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert prefix not in tables
