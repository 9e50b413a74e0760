"""Build the original C distcache tools for side-by-side comparisons.

Used by bench/distcache/versus_original.py and tests/distcache/transcripts/record.py.  The
source is LGPL: it is only cloned and built, in bench/distcache/orig/ (git-ignored: never committed)
or in $DISTCACHE_ORIG when that is set, never copied into the repository's files.

The source comes from $DISTCACHE_GIT (a git URL or path; default the GitHub repository
mingzym/distcache).  Build steps (the ssl/ directory does not build against OpenSSL 3, so only
the subdirectories of the tools are made): autoreconf -fi; ./configure
ac_cv_lib_crypto_SSLeay_version=yes; make in libsys libnal libdistcache libdistcacheserver util
sessserver sessclient test snoop.  Needs git, autoconf, automake, libtool, gcc, make.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ORIGINAL_DIR = Path(os.environ.get("DISTCACHE_ORIG", Path(__file__).resolve().parent / "orig"))
SOURCE = os.environ.get("DISTCACHE_GIT", "https://github.com/mingzym/distcache")
SUBDIRS = ("libsys", "libnal", "libdistcache", "libdistcacheserver", "util", "sessserver",
           "sessclient", "test", "snoop")
BINARIES = {"dc_server": "sessserver/dc_server", "dc_client": "sessclient/dc_client",
            "dc_test": "test/dc_test", "dc_snoop": "snoop/dc_snoop"}


def binaries(where: Path = ORIGINAL_DIR) -> dict[str, Path]:
    return {tool: where / rel for tool, rel in BINARIES.items()}


def build_original(where: Path = ORIGINAL_DIR) -> dict[str, Path]:
    """The paths of the original tools, cloned and built in `where` if they are not there yet."""
    tools = binaries(where)
    if all(os.access(p, os.X_OK) for p in tools.values()):
        return tools
    if not (where / "configure.ac").exists():
        subprocess.run(["git", "clone", "-q", SOURCE, str(where)], check=True)
    if not (where / "configure").exists():
        subprocess.run(["autoreconf", "-fi"], cwd=where, check=True, capture_output=True)
    if not (where / "Makefile").exists():
        subprocess.run(["./configure", "ac_cv_lib_crypto_SSLeay_version=yes"], cwd=where, check=True,
                       capture_output=True)
    for sub in SUBDIRS:
        subprocess.run(["make", "-C", sub], cwd=where, check=True, capture_output=True)
    return tools


def original_version(where: Path = ORIGINAL_DIR) -> str:
    """`distcache <configure version>, commit <hash>` of the built source."""
    version = "?"
    for line in (where / "configure.ac").read_text().splitlines():
        if line.startswith("AC_INIT("):
            version = line.split(",")[1].strip().strip("[]")
    commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"distcache {version} (git {commit[:12]})"
