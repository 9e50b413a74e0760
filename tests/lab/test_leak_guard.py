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
    NamespaceLab(DEFAULT_TOPOLOGY, run_prefix).up()   # never torn down
    open({str(out)!r}, "w").write(run_prefix)
""")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                        str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    prefix = out.read_text()
    assert "removed leaked namespaces" in r.stdout and f"{prefix}-be1" in r.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefix + "-" not in listed
