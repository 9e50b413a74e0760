"""Shared helpers of the distcache tools tests: real processes and scripted fake servers.

Imported by test_client*.py, test_agent*.py, test_snoop*.py, test_dctest*.py, test_fuzz*.py.
Every process and thread started here is stopped by the ``procs`` / ``fake_servers`` fixtures,
even when the test fails.  Loopback and UNIX sockets in the test's tmp dir only.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tcpha.distcache.address import connect_socket, parse_address
from tcpha.distcache.codec import Message, MessageReader, Op, ProtocolError, encode_message
from tests.support import wait_until

PY = sys.executable


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def agent_has_upstream(addr: str) -> bool:
    """True when a HAVE through the agent gets a real answer (not the empty 'no server' one)."""
    from tcpha.distcache.client import DistcacheClient, DistcacheError
    try:
        DistcacheClient(addr, 0, timeout=2).has(b"agent-probe")
        return True
    except DistcacheError:
        return False


def can_connect(addr: str) -> bool:
    try:
        connect_socket(parse_address(addr), 0.5).close()
        return True
    except OSError:
        return False


class Proc:
    """One of our command-line tools, run as a real process (python -m tcpha.cli.X)."""

    def __init__(self, module: str, args: list[str], tmp: Path, *, ready: str | None = None,
                 name: str | None = None, stdout=None) -> None:
        self.name = name or module.rsplit(".", 1)[-1]
        self.out_path = tmp / f"{self.name}-{id(self)}.out"
        self.err_path = tmp / f"{self.name}-{id(self)}.err"
        self._out = open(self.out_path, "wb") if stdout is None else None
        self._err = open(self.err_path, "wb")
        self.argv = [PY, "-m", module, *args]
        self.p = subprocess.Popen(self.argv, stdout=self._out if stdout is None else stdout,
                                  stderr=self._err, stdin=subprocess.DEVNULL)
        if ready is not None:
            wait_until(lambda: self.p.poll() is not None or can_connect(ready), 15,
                       f"{self.name} to accept on {ready}")
            if self.p.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.p.returncode}: {self.stderr()}")

    @property
    def pid(self) -> int:
        return self.p.pid

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self._out is not None else ""

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 20.0) -> int:
        return self.p.wait(timeout)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        for f in (self._out, self._err):
            if f is not None:
                f.close()


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []
        self.extra_pids: list[int] = []

    def start(self, module: str, *args: str, ready: str | None = None, **kw) -> Proc:
        p = Proc(module, list(args), self.tmp, ready=ready, **kw)
        self.all.append(p)
        return p

    def server(self, listen: str, *args: str) -> Proc:
        return self.start("tcpha.cli.dc_server", "-listen", listen, *args, ready=listen)

    def agent(self, listen: str, *servers: str, args: tuple[str, ...] = (), upstream: bool = True) -> Proc:
        """Start dc_client; with ``upstream`` wait until it answers through a server."""
        argv = ["-listen", listen]
        for s in servers:
            argv += ["-server", s]
        p = self.start("tcpha.cli.dc_client", *argv, *args, ready=listen)
        if upstream:
            wait_until(lambda: agent_has_upstream(listen), 10, "the agent's upstream connection")
        return p

    def run(self, module: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def stop_all(self) -> None:
        for p in self.all:
            p.stop()
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def procs(tmp_path):
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


# --- a scripted fake server (in a thread) ---------------------------------------------------

class FakeServer:
    """A distcache server whose behaviour a test scripts.

    ``policy(conn_index, msg) -> bytes | None | 'close'``: the reply payload, None to stay
    silent, 'close' to close the connection.  The default keeps a dict store like dc_server.
    Records each accepted connection's peer pid (SO_PEERCRED, UNIX sockets) and every request.
    ``reorder``: answer each batch of requests read together in reverse order (uid matching).
    """

    def __init__(self, path: str, policy=None, reorder: bool = False) -> None:
        self.path = path
        self.address = f"UNIX:{path}"
        self.policy = policy or self._store_policy
        self.reorder = reorder
        self.store: dict[bytes, bytes] = {}
        self.peer_pids: list[int] = []
        self.requests: list[Message] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self._stop = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    @property
    def connections(self) -> int:
        return len(self.peer_pids)

    def _store_policy(self, conn_index: int, msg: Message):
        p = msg.payload
        if msg.op == Op.ADD:
            timeout, idlen = struct.unpack_from(">II", p)
            sid, data = p[8:8 + idlen], p[8 + idlen:]
            if sid in self.store:
                return b"\x65"
            self.store[sid] = data
            return b"\x00"
        if msg.op == Op.GET:
            return self.store.get(p, b"\x01")
        if msg.op == Op.REMOVE:
            return b"\x00" if self.store.pop(p, None) is not None else b"\x01"
        return b"\x00" if p in self.store else b"\x01"

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", cred)[0]
            with self.lock:
                index = len(self.peer_pids)
                self.peer_pids.append(pid)
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        reader = MessageReader(expect_response=False)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                try:
                    msgs = reader.feed(data)
                except ProtocolError:
                    return
                replies = []
                for msg in msgs:
                    with self.lock:
                        self.requests.append(msg)
                        answer = self.policy(index, msg)
                    if answer == "close":
                        conn.close()
                        return
                    if answer is not None:
                        replies.append(encode_message(Message(True, msg.uid, msg.op, answer)))
                if self.reorder:
                    replies.reverse()
                if replies:
                    conn.sendall(b"".join(replies))
        except OSError:
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close_connections(self) -> None:
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.close_connections()
        self.thread.join(2)
        try:
            os.unlink(self.path)
        except OSError:
            pass


@pytest.fixture
def fake_servers():
    made: list[FakeServer] = []

    def make(path, **kw) -> FakeServer:
        s = FakeServer(str(path), **kw)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


# --- raw protocol helpers ----------------------------------------------------------------

def request(uid: int, op: Op, payload: bytes) -> bytes:
    return encode_message(Message(False, uid, op, payload))


def read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list[Message]:
    reader = MessageReader(expect_response=True)
    out: list[Message] = []
    sock.settimeout(timeout)
    while len(out) < count:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed after {len(out)} of {count} responses")
        out.extend(reader.feed(data))
    return out


def unix_connect(path, timeout: float = 5.0) -> socket.socket:
    """Connect to a UNIX socket, retrying while it is not there or not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


@pytest.fixture
def sockdir():
    """A short directory for UNIX sockets (pytest's tmp_path can exceed sun_path's 107 bytes)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="dct-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
