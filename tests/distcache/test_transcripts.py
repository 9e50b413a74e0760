"""Our dc_server, dc_client, dc_test and dc_snoop against recorded transcripts of the original C tools.

tests/distcache/transcripts/<tool>.json were written by tests/distcache/transcripts/record.py,
which builds and runs the original (the version is in each file).  For every recorded command
line (option errors, -h texts, unusable addresses) our tool must print the same bytes on stdout
and on stderr and exit with the same status.  The cases where we differ on purpose are not here:
they are listed in docs/distcache.md, each with its own test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distcache.transcripts.cases import CASES, DELIBERATE

HERE = Path(__file__).resolve().parent / "transcripts"


def _recorded() -> list[tuple[str, dict]]:
    out = []
    for tool in CASES:
        for case in json.loads((HERE / f"{tool}.json").read_text())["cases"]:
            out.append((tool, case))
    return out


RECORDED = _recorded()


def test_every_case_is_recorded() -> None:
    """cases.py and the transcripts agree (re-run record.py after changing cases.py)."""
    assert [(t, c["args"]) for t, c in RECORDED] == [(t, a) for t, cs in CASES.items() for a in cs]


@pytest.mark.parametrize("tool,case", RECORDED, ids=[f"{t} {' '.join(c['args'])}" for t, c in RECORDED])
def test_same_output_as_original(tool: str, case: dict, tmp_path: Path) -> None:
    tmp = str(tmp_path)
    args = [a.replace("{tmp}", tmp) for a in case["args"]]
    proc = subprocess.run([sys.executable, "-m", f"tcpha.cli.{tool}", *args], capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    got = {"stdout": proc.stdout.decode("latin-1").replace(tmp, "{tmp}"),
           "stderr": proc.stderr.decode("latin-1").replace(tmp, "{tmp}"),
           "status": proc.returncode}
    expected = {k: case[k] for k in ("stdout", "stderr", "status")}
    # A documented, deliberate difference (cases.DELIBERATE says which field and why).
    deliberate = DELIBERATE.get((tool, tuple(case["args"])), {})
    expected.update({k: v for k, v in deliberate.items() if k in expected})
    if "stderr_line" in deliberate:
        lines = got.pop("stderr").splitlines(keepends=True)
        del expected["stderr"]
        assert len(lines) == 1 and lines[0].startswith(deliberate["stderr_line"]) and lines[0].endswith("\n")
    assert got == expected


def test_deliberate_differences_are_real() -> None:
    """Every DELIBERATE entry names a recorded case and really changes what the original did."""
    recorded = {(t, tuple(c["args"])): c for t, c in RECORDED}
    for key, diff in DELIBERATE.items():
        assert key in recorded, key
        assert diff["why"]
        assert any(recorded[key][k] != v for k, v in diff.items() if k in ("stdout", "status")) or \
            ("stderr_line" in diff and not recorded[key]["stderr"]), key
