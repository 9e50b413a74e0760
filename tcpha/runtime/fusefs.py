"""The control directory as a FUSE file system (pyfuse3), so that plain ``cat`` and ``echo`` work and
an invalid write fails with EINVAL in the writer's shell (``echo: write error: Invalid argument``).

Why FUSE: a /proc-like directory must show the value in force at every read (``conn`` is built on
each open) and refuse a bad value to the writer itself; a plain directory watched with inotify can
only revert the file after the fact. pyfuse3 is the maintained binding of libfuse 3 (fuse3 package);
it runs its trio loop in a thread of its own, so the daemon's own loop is never blocked by a reader.

Every open takes a snapshot of the file's text (direct_io: the kernel never caches it), reads serve
slices of it; writes collect the bytes of one open and apply them on each write(2), so the error
reaches the write(2) that carried the value.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
import time
from typing import Any

from tcpha.runtime.tree import ControlTree, WriteRefused

log = logging.getLogger("tcpha.runtime")

MNT_DETACH = 2


def fuse_available() -> str | None:
    """None when a FUSE mount can be tried here, else why not (one line)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        # lazy: optional (a socket control plane serves without them), and ~0.5 s to import
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not installed ({e})"
    return None


def detach_stale_mount(path: str) -> bool:
    """A FUSE mount left by a daemon that died answers ENOTCONN: detach it. True if one was removed."""
    try:
        os.stat(path)
        return False
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        return False
    log.warning("control directory %s: removed the stale mount of a daemon that died", path)
    return True


def unmount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(os.fsencode(path), MNT_DETACH)


class _Ops:  # the pyfuse3.Operations subclass is made in _make_ops (pyfuse3 imported lazily)
    pass


def _make_ops(tree: ControlTree, links: dict[str, str]) -> Any:
    # lazy: optional and ~0.5 s to import; only a FUSE control directory loads them
    import pyfuse3
    import trio

    class ControlOps(pyfuse3.Operations):
        enable_writeback_cache = False

        def __init__(self) -> None:
            super().__init__()
            self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
            self.inodes: dict[str, int] = {"": pyfuse3.ROOT_INODE}
            self.handles: dict[int, dict[str, Any]] = {}
            self.next_fh = 1
            self.started = time.time_ns()

        # -- names ---------------------------------------------------------------------------
        def _inode(self, path: str) -> int:
            ino = self.inodes.get(path)
            if ino is None:
                ino = len(self.paths) + 1
                while ino in self.paths:
                    ino += 1
                self.paths[ino] = path
                self.inodes[path] = ino
            return ino

        def _path(self, inode: int) -> str:
            try:
                return self.paths[inode]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        def _attr(self, path: str) -> Any:
            a = pyfuse3.EntryAttributes()
            if path in links:
                a.st_mode = stat.S_IFLNK | 0o777
                a.st_size = len(links[path])
            elif tree.is_file(path):
                writable = tree.file(path).write is not None
                a.st_mode = stat.S_IFREG | (0o644 if writable else 0o444)
                a.st_size = 0
            elif tree.is_dir(path):
                a.st_mode = stat.S_IFDIR | 0o755
                a.st_nlink = 2
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            a.st_ino = self._inode(path)
            a.st_uid = os.getuid()
            a.st_gid = os.getgid()
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns() if tree.is_file(path) else self.started
            a.entry_timeout = 0
            a.attr_timeout = 0
            return a

        async def lookup(self, parent_inode, name, ctx=None):
            parent = self._path(parent_inode)
            n = name.decode("utf-8", "replace")
            path = f"{parent}/{n}" if parent else n
            if n in (".", ".."):
                raise pyfuse3.FUSEError(errno.ENOENT)
            if path not in links and not tree.is_file(path) and not tree.is_dir(path):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(path)

        async def getattr(self, inode, ctx=None):
            return self._attr(self._path(inode))

        async def setattr(self, inode, attr, fields, fh, ctx):
            # `echo 5 > f` truncates first (O_TRUNC -> setattr size 0): accepted and ignored.
            return self._attr(self._path(inode))

        async def readlink(self, inode, ctx):
            path = self._path(inode)
            if path not in links:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(links[path])

        # -- directories ---------------------------------------------------------------------
        async def opendir(self, inode, ctx):
            path = self._path(inode)
            if not tree.is_dir(path):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            path = self._path(fh)
            names = tree.listdir(path)
            if path == "":
                names = sorted(set(names) | set(links))
            for i, name in enumerate(names):
                if i < start_id:
                    continue
                child = f"{path}/{name}" if path else name
                if not pyfuse3.readdir_reply(token, name.encode(), self._attr(child), i + 1):
                    break

        async def releasedir(self, fh):
            pass

        # -- files ---------------------------------------------------------------------------
        async def open(self, inode, flags, ctx):
            path = self._path(inode)
            if not tree.is_file(path):
                raise pyfuse3.FUSEError(errno.EISDIR if tree.is_dir(path) else errno.ENOENT)
            f = tree.file(path)
            writing = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
            if writing and f.write is None:
                raise pyfuse3.FUSEError(errno.EACCES)
            text = b""
            if (flags & os.O_ACCMODE) != os.O_WRONLY:
                try:
                    text = (await trio.to_thread.run_sync(tree.read, path)).encode("utf-8", "replace")
                except Exception as e:              # a reader never takes the daemon down
                    log.error("control file %s: read failed: %s", path, str(e) or type(e).__name__)
                    raise pyfuse3.FUSEError(errno.EIO) from None
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = {"path": path, "text": text, "buf": bytearray()}
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

        async def read(self, fh, off, size):
            h = self.handles.get(fh)
            if h is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            return h["text"][off:off + size]

        async def write(self, fh, off, buf):
            h = self.handles.get(fh)
            if h is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            data = h["buf"]
            if off > len(data):
                data.extend(b"\0" * (off - len(data)))
            data[off:off + len(buf)] = buf
            text = data.decode("utf-8", "replace")
            if text.strip():
                try:
                    await trio.to_thread.run_sync(tree.write, h["path"], text)
                except WriteRefused as e:
                    log.warning("control file %s: write refused: %s", h["path"], e)
                    data.clear()
                    raise pyfuse3.FUSEError(errno.EINVAL) from None
                except PermissionError:
                    raise pyfuse3.FUSEError(errno.EACCES) from None
                except Exception as e:
                    log.error("control file %s: write failed: %s", h["path"], e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
                data.clear()
            return len(buf)

        async def flush(self, fh):
            pass

        async def release(self, fh):
            self.handles.pop(fh, None)

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = 512
            s.f_namemax = 255
            return s

    return ControlOps()


class FuseMount:
    """The tree mounted at `path` by a thread running pyfuse3's trio loop."""

    def __init__(self, tree: ControlTree, path: str, *, links: dict[str, str] | None = None,
                 fsname: str = "tcpha"):
        self.tree = tree
        self.path = path
        self.links = links or {}
        self.fsname = fsname
        self._thread: threading.Thread | None = None
        self._token: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 5.0) -> None:
        # lazy: optional and ~0.5 s to import; only a FUSE control directory loads it
        import pyfuse3
        detach_stale_mount(self.path)
        os.makedirs(self.path, exist_ok=True)
        ops = _make_ops(self.tree, self.links)
        options = set(pyfuse3.default_options)
        options.add(f"fsname={self.fsname}")
        options.discard("default_permissions")
        options.add("default_permissions")
        pyfuse3.init(ops, self.path, options)
        self._thread = threading.Thread(target=self._run, name="tcpha-fuse", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"control directory {self.path}: FUSE loop did not start")
        if self._error is not None:
            raise RuntimeError(f"control directory {self.path}: {self._error}")

    def _run(self) -> None:
        # lazy: optional and ~0.5 s to import; only a FUSE control directory loads them
        import pyfuse3
        import trio

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await pyfuse3.main(min_tasks=2, max_tasks=8)

        try:
            trio.run(main)
        except BaseException as e:       # pragma: no cover - reported by start()/stop()
            self._error = e
            self._started.set()
            log.error("control directory %s: FUSE loop ended: %s", self.path, e)

    def stop(self) -> None:
        # lazy: optional and ~0.5 s to import; only a FUSE control directory loads them
        import pyfuse3
        import trio
        if self._thread is None:
            return
        if self._thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            except Exception:
                pass
            self._thread.join(5.0)
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            unmount(self.path)
        self._thread = None
