"""tcpha-keygen PATH: write a new random key file for the FE<->BE control channel (authkey).

The file holds 64 hex digits (256 random bits from the OS) and a newline, mode 0600, owned by
the caller. An existing file is never overwritten without --force; the file appears atomically
(written to a temporary file in the same directory, then linked/renamed into place), so a
daemon never reads a half-written key.

tcpha-keygen --statsadmin-token PATH prints the status page's write-mode credential derived from an
existing key file (tcpha.fe.status: the page never holds the control channel's key itself).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from tcpha.config import read_authkey
from tcpha.fe.status import admin_token

KEY_BYTES = 32


def write_key(path: str, *, force: bool = False) -> None:
    """Write a new key to ``path``; OSError / FileExistsError on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    content = (secrets.token_hex(KEY_BYTES) + "\n").encode("ascii")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with EEXIST instead of replacing: no check-then-write race
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tcpha-keygen",
        description="Write a new random key file for 'authkey = PATH' in tcphafe.conf and tcphabe.conf "
                    "(256 bits, 64 hex digits, mode 0600). Copy the same file to the front end and "
                    "every back end.")
    parser.add_argument("path", metavar="PATH", help="key file to create")
    parser.add_argument("-f", "--force", action="store_true", help="replace an existing file")
    parser.add_argument("--statsadmin-token", action="store_true",
                        help="print the status page's write-mode token derived from the existing key file PATH")
    args = parser.parse_args(argv)
    if args.statsadmin_token:
        try:
            print(admin_token(read_authkey(args.path)))
        except ValueError as exc:
            print(f"tcpha-keygen: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        write_key(args.path, force=args.force)
    except FileExistsError:
        print(f"tcpha-keygen: {args.path} already exists; use --force to replace it "
              f"(every node using the old key must get the new one)", file=sys.stderr)
        return 1
    except IsADirectoryError:
        print(f"tcpha-keygen: {args.path} is a directory", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tcpha-keygen: cannot write {args.path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"tcpha-keygen: wrote a new 256-bit key to {args.path} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
