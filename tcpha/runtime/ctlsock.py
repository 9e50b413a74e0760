"""The control socket (``RUNDIR/ctl.sock``): the control files' reads and writes for scripts (``tcpha-ctl``).

One JSON object per line each way (newline-delimited JSON), any number of requests per connection:

    {"op": "list"}                              -> {"ok": true, "files": [{"path", "writable", "doc"}, ...]}
    {"op": "read", "path": "sys/dbglevel"}      -> {"ok": true, "text": "3\n", "data": 3}
    {"op": "write", "path": "sys/dbglevel", "value": "5"}  -> {"ok": true}
    anything wrong                              -> {"ok": false, "error": "one line"}

Only root (or the daemon's own user) may connect: the socket is created mode 0600 and the peer's
credentials (SO_PEERCRED) are checked. Extra operations (e.g. the upgrade's ``takeover``) are
registered by the daemon with ``extra_ops``.

The socket is bound under a temporary name and renamed onto its path (an atomic replacement: a
client finds either the old daemon's socket or ours, never none), and at close the path is removed
only while it is still ours (a successor may have replaced it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from tcpha.runtime.tree import ControlTree, WriteRefused

log = logging.getLogger("tcpha.runtime")

MAX_LINE = 64 * 1024

Handler = Callable[[dict, Any], Awaitable[dict]]


def _run_blocking(fn: Callable[[], Any]) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(None, fn)


async def answer(tree: ControlTree, request: dict) -> dict:
    """The reply to one request (sans socket: tests feed dicts)."""
    op = request.get("op")
    path = request.get("path", "")
    try:
        if op == "list":
            return {"ok": True, "files": tree.describe()}
        if op == "read":
            if not isinstance(path, str):
                raise ValueError("path must be a string")
            text = await _run_blocking(lambda: tree.read(path))
            data = await _run_blocking(lambda: tree.data(path))
            return {"ok": True, "text": text, "data": data}
        if op == "write":
            value = request.get("value")
            if not isinstance(path, str) or not isinstance(value, str):
                raise ValueError("write needs 'path' and 'value' strings")
            await _run_blocking(lambda: tree.write(path, value))
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}
    except (WriteRefused, ValueError, FileNotFoundError, PermissionError) as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:                     # a client never takes the daemon down
        log.exception("control socket: %s %s failed", op, path)
        return {"ok": False, "error": f"internal error: {e}"}


def listener_pid(s: socket.socket) -> int:
    """The pid of the process that made the listening socket `s` is connected to (SO_PEERCRED: for a
    connecting socket, the listener's credentials at listen(); 0 when not visible from here)."""
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def process_alive(pid: int) -> bool:
    """True when `pid` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


@dataclass
class PreparedSocket:
    """A control socket bound and listening under a temporary name, to be renamed onto `path`
    (install): clients connecting from then on queue in its backlog until it is served."""
    path: str
    tmp: str
    sock: socket.socket
    identity: tuple[int, int]           # (st_dev, st_ino) of the socket file

    def install(self) -> None:
        os.rename(self.tmp, self.path)

    def discard(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def prepare_socket(path: str) -> PreparedSocket:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(tmp)
        sock.listen(128)
        st = os.stat(tmp)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return PreparedSocket(path, tmp, sock, (st.st_dev, st.st_ino))


class ControlSocketServer:
    def __init__(self, tree: ControlTree, path: str, extra_ops: dict[str, Handler] | None = None):
        self.tree = tree
        self.path = path
        self.extra_ops = extra_ops or {}
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None      # (st_dev, st_ino) of the file we bound

    async def start(self, installed: PreparedSocket | None = None) -> None:
        """Bind and serve (atomically replacing whatever is at `path`), or serve a socket already
        prepared and installed there (a seamless upgrade's, tcpha.fe.upgrade)."""
        if installed is None:
            installed = prepare_socket(self.path)
            try:
                installed.install()
            except OSError:
                installed.discard()
                raise
        self._identity = installed.identity
        self._server = await asyncio.start_unix_server(self._client, sock=installed.sock, limit=MAX_LINE)

    def owns_path(self) -> bool:
        """True while the file at `path` is the socket we bound (not replaced or removed since)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return self._identity == (st.st_dev, st.st_ino)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            if self.owns_path():
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
            if uid not in (0, os.geteuid()):
                writer.write(b'{"ok": false, "error": "permission denied"}\n')
                writer.close()
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    reply: dict = {"ok": False, "error": f"bad request: {e}"}
                else:
                    handler = self.extra_ops.get(request.get("op"))
                    if handler is not None:
                        try:
                            reply = await handler(request, writer)
                        except Exception as e:
                            log.exception("control socket: %s failed", request.get("op"))
                            reply = {"ok": False, "error": str(e)}
                    else:
                        reply = await answer(self.tree, request)
                if reply is None:               # the handler wrote its own answer
                    continue
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def request(path: str, req: dict, timeout: float = 5.0) -> dict:
    """One request to a daemon's control socket (blocking; for tcpha-ctl and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError(f"{path}: the daemon closed the connection without an answer")
    return json.loads(buf)
