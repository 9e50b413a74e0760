"""Reading a file that holds a secret (the control channel's authkey, the session sealing keys).

Refused, each with one line naming the file: unreadable (with a hint to create one when missing), a
symbolic link or anything but a regular file, any access for group or others (as ssh refuses a
private key other users can read), and more than 64 KiB (not a key file).
"""

from __future__ import annotations

import os
import stat

__all__ = ["read_secret_file"]

MAX_SECRET_FILE = 65536


def read_secret_file(path: str, what: str = "key file") -> bytes:
    """The bytes of the secret file at `path`; ValueError (one line, naming `what` and the file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        hint = f" (create one with: tcpha-keygen {path})" if isinstance(exc, FileNotFoundError) else ""
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}{hint}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ValueError(f"{what} {path} is accessible by group or others (mode {mode:04o}); "
                             f"run: chmod 600 {path}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise ValueError(f"{what} {path} is larger than 64 KiB: not a key file")
    return data
