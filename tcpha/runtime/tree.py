"""The control files of a daemon, as data: path, how to read it, how to write it (sans-I/O).

Both front doors use the same tree: the FUSE file system (``tcpha.runtime.fusefs``: ``cat``/``echo``)
and the control socket (``tcpha.runtime.ctlsock``, ``tcpha-ctl``). A write is the text an operator
would ``echo`` (a trailing newline is ignored); a value that does not parse or is out of range raises
``WriteRefused`` with one line, which FUSE turns into EINVAL for the writer and the socket into an
error answer. Reads return the value in force, followed by a newline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["ControlFile", "ControlTree", "WriteRefused", "int_setter", "float_setter", "bool_setter"]


class WriteRefused(ValueError):
    """An invalid value written to a control file; str(e) is one line for the writer's log."""


@dataclass
class ControlFile:
    path: str                                   # 'sys/dbglevel' (no leading slash)
    read: Callable[[], str]                     # the value in force, without the newline
    write: Callable[[str], None] | None = None  # raises WriteRefused; None: read-only
    doc: str = ""
    data: Callable[[], Any] | None = None       # structured value for `tcpha-ctl --json`


def _clean(text: str) -> str:
    return text.strip()


def int_setter(apply: Callable[[int], None], low: int, high: int, what: str) -> Callable[[str], None]:
    def write(text: str) -> None:
        t = _clean(text)
        if not t.lstrip("-").isdigit():
            raise WriteRefused(f"{what}: {t[:40]!r} is not a whole number")
        value = int(t)
        if not low <= value <= high:
            raise WriteRefused(f"{what}: {value} is out of range ({low}-{high})")
        apply(value)
    return write


def float_setter(apply: Callable[[float], None], low: float, high: float, what: str) -> Callable[[str], None]:
    def write(text: str) -> None:
        t = _clean(text)
        try:
            value = float(t)
        except ValueError:
            raise WriteRefused(f"{what}: {t[:40]!r} is not a number") from None
        if not low <= value <= high or value != value:
            raise WriteRefused(f"{what}: {t} is out of range ({low:g}-{high:g})")
        apply(value)
    return write


def bool_setter(apply: Callable[[bool], None], what: str) -> Callable[[str], None]:
    def write(text: str) -> None:
        t = _clean(text).lower()
        if t in ("1", "yes", "on", "true"):
            apply(True)
        elif t in ("0", "no", "off", "false"):
            apply(False)
        else:
            raise WriteRefused(f"{what}: expected 0 or 1, not {t[:40]!r}")
    return write


class ControlTree:
    """Files by path; directories are implied by the paths (``sys/unload`` makes ``sys``)."""

    def __init__(self) -> None:
        self.files: dict[str, ControlFile] = {}

    def add(self, f: ControlFile) -> ControlFile:
        self.files[f.path.strip("/")] = f
        return f

    def remove_prefix(self, prefix: str) -> None:
        prefix = prefix.strip("/") + "/"
        for path in [p for p in self.files if p.startswith(prefix)]:
            del self.files[path]

    def is_dir(self, path: str) -> bool:
        path = path.strip("/")
        if path == "":
            return True
        return any(p.startswith(path + "/") for p in self.files)

    def is_file(self, path: str) -> bool:
        return path.strip("/") in self.files

    def listdir(self, path: str) -> list[str]:
        """Names directly under `path` ('' is the top), sorted."""
        path = path.strip("/")
        prefix = path + "/" if path else ""
        names = set()
        for p in self.files:
            if p.startswith(prefix):
                names.add(p[len(prefix):].split("/", 1)[0])
        return sorted(names)

    def file(self, path: str) -> ControlFile:
        try:
            return self.files[path.strip("/")]
        except KeyError:
            raise FileNotFoundError(f"no control file {path!r}") from None

    def read(self, path: str) -> str:
        return self.file(path).read() + "\n"

    def data(self, path: str) -> Any:
        f = self.file(path)
        return f.data() if f.data is not None else f.read()

    def write(self, path: str, text: str) -> None:
        f = self.file(path)
        if f.write is None:
            raise PermissionError(f"{path} is read-only")
        f.write(text)

    def describe(self) -> list[dict[str, Any]]:
        return [{"path": p, "writable": f.write is not None, "doc": f.doc} for p, f in sorted(self.files.items())]
