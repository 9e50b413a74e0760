"""Fallback control directory when FUSE is not available: real files, refreshed every second, and an
inotify watch (IN_CLOSE_WRITE) on every directory; a written file is applied through the same tree,
and an invalid value is logged and the file rewritten with the value in force (the writer cannot be
told at write time: that is what FUSE adds).

inotify through ctypes (three libc calls) rather than a PyPI binding: this is a fallback path and a
dependency for three calls is not worth it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import struct
import threading

from tcpha.runtime.tree import ControlTree, WriteRefused

log = logging.getLogger("tcpha.runtime")

IN_CLOSE_WRITE = 0x00000008
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
REFRESH = 1.0


class MirrorDirectory:
    def __init__(self, tree: ControlTree, path: str):
        self.tree = tree
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict[str, str] = {}
        self._wd: dict[int, str] = {}
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = -1

    def start(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="tcpha-mirror", daemon=True)
        self._thread.start()

    def _watch(self, d: str) -> None:
        if d in self._wd.values():
            return
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(d), IN_CLOSE_WRITE)
        if wd >= 0:
            self._wd[wd] = d

    def refresh(self) -> None:
        for rel, f in list(self.tree.files.items()):
            full = os.path.join(self.path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            self._watch(os.path.dirname(full))
            try:
                text = self.tree.read(rel)
            except Exception as e:
                log.error("control file %s: read failed: %s", rel, str(e) or type(e).__name__)
                continue
            if self._written.get(rel) == text:
                continue
            tmp = full + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644 if f.write is not None else 0o444)
            os.replace(tmp, full)
            self._written[rel] = text

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self._fd], [], [], REFRESH)
            if r:
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    data = b""
                pos = 0
                while pos + _EVENT.size <= len(data):
                    wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                    name = data[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0").decode()
                    pos += _EVENT.size + length
                    d = self._wd.get(wd)
                    if d is not None and name and not name.endswith(".tmp"):
                        self._changed(os.path.relpath(os.path.join(d, name), self.path))
            try:
                self.refresh()
            except Exception as e:
                log.error("control directory %s: refresh failed: %s", self.path, e)

    def _changed(self, rel: str) -> None:
        if not self.tree.is_file(rel):
            return
        try:
            with open(os.path.join(self.path, rel)) as fh:
                text = fh.read()
        except OSError:
            return
        if text == self._written.get(rel):
            return
        try:
            self.tree.write(rel, text)
        except (WriteRefused, PermissionError) as e:
            log.error("control file %s: invalid write reverted: %s", rel, e)
        self._written.pop(rel, None)        # rewrite with the value in force
        self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
