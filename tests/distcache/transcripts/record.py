#!/usr/bin/env python3
"""Record the original C distcache tools' observable output for every case in cases.py.

    python3 tests/distcache/transcripts/record.py [--orig DIR]

DIR (default $DISTCACHE_ORIG, else bench/distcache/orig/, git-ignored) holds the original source;
it is cloned and built there when its binaries are missing (see build_original() in
bench/distcache/original.py).  Writes tests/distcache/transcripts/<tool>.json: a list of
{"args", "stdout", "stderr", "status"}; tests/distcache/test_transcripts.py compares our tools
to them byte for byte without needing the C binaries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from bench.distcache.original import ORIGINAL_DIR, build_original, original_version  # noqa: E402
from tests.distcache.transcripts.cases import CASES  # noqa: E402


def run_case(argv: list[str], args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="dc-rec-") as tmp:
        real = [a.replace("{tmp}", tmp) for a in args]
        proc = subprocess.run(argv + real, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        return {"args": args,
                "stdout": proc.stdout.decode("latin-1").replace(tmp, "{tmp}"),
                "stderr": proc.stderr.decode("latin-1").replace(tmp, "{tmp}"),
                "status": proc.returncode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--orig", type=Path, default=ORIGINAL_DIR)
    opts = ap.parse_args()
    binaries = build_original(opts.orig)
    for tool, cases in CASES.items():
        records = [run_case([str(binaries[tool])], args) for args in cases]
        out = HERE / f"{tool}.json"
        out.write_text(json.dumps({"version": original_version(opts.orig), "cases": records},
                                  indent=1) + "\n")
        print(f"{out.relative_to(ROOT)}: {len(records)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
