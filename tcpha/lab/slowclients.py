"""Slow and idle clients held open against a VIP (slowloris), for the front end's test and bench.

    crowd = SlowClients(lab, "client", vip, 80)
    crowd.open(10_000)            # half idle (connected, nothing sent), half an unfinished request head
    ... time a normal request ...
    answers = crowd.collect(timeout=30)   # per connection: the status line's code, or None (closed/reset)
    crowd.close()

Connections are opened with non-blocking connects, at most `batch` at once, so that the client's own
SYN backlog does not drop them; the process's RLIMIT_NOFILE is raised (soft to hard) as needed.
"""

from __future__ import annotations

import errno
import resource
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

PARTIAL_HEAD = b"GET /index.html HTTP/1.1\r\nHost: a\r\nX-Slow: "     # never finished


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least `needed` (up to the hard limit); returns the new soft limit.
    Raises OSError when the hard limit is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))   # root may raise the hard limit
        except (ValueError, OSError):
            raise OSError(errno.EMFILE, f"RLIMIT_NOFILE hard limit {hard} is below the {needed} needed") from None
        return needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


@dataclass
class SlowClients:
    lab: Any
    host: str
    addr: str
    port: int
    batch: int = 500
    socks: list[socket.socket] = field(default_factory=list)
    slow: set[int] = field(default_factory=set)        # fds of the connections that sent PARTIAL_HEAD

    def open(self, count: int, timeout: float = 60.0) -> None:
        """Open `count` connections; every second one sends PARTIAL_HEAD, the others nothing."""
        raise_fd_limit(count + len(self.socks) + 1024)
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        try:
            started = 0
            pending = 0
            while started < count or pending:
                while started < count and pending < self.batch:
                    s = self.lab.socket(self.host)
                    s.setblocking(False)
                    rc = s.connect_ex((self.addr, self.port))
                    if rc not in (0, errno.EINPROGRESS):
                        s.close()
                        raise OSError(rc, f"connect to {self.addr}:{self.port}: {errno.errorcode.get(rc, rc)}")
                    sel.register(s, selectors.EVENT_WRITE, started % 2 == 1)
                    started += 1
                    pending += 1
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(self.socks)} of {count} connections open after {timeout:g} s")
                for key, _ in sel.select(timeout=1.0):
                    s = key.fileobj
                    sel.unregister(s)
                    pending -= 1
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        s.close()
                        raise OSError(err, f"connect to {self.addr}:{self.port}: {errno.errorcode.get(err, err)}")
                    if key.data:
                        s.send(PARTIAL_HEAD)
                        self.slow.add(s.fileno())
                    self.socks.append(s)
        finally:
            sel.close()

    def collect(self, timeout: float) -> dict[str, list[int | None]]:
        """Wait until every connection was answered and closed by the server (or `timeout`); per kind
        ('idle', 'slow'), the HTTP status each got (None: closed without an answer, reset, or still open)."""
        sel = selectors.DefaultSelector()
        got: dict[int, bytes] = {}
        done: dict[int, int | None] = {}
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while len(done) < len(self.socks) and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    s = key.fileobj
                    fd = s.fileno()
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        got[fd] = got.get(fd, b"") + data
                        continue
                    sel.unregister(s)
                    raw = got.get(fd, b"")
                    parts = raw.split(b" ", 2)
                    done[fd] = int(parts[1]) if raw.startswith(b"HTTP/1.") and len(parts) > 1 and parts[1].isdigit() else None
        finally:
            sel.close()
        out: dict[str, list[int | None]] = {"idle": [], "slow": []}
        for s in self.socks:
            fd = s.fileno()
            out["slow" if fd in self.slow else "idle"].append(done.get(fd))
        return out

    def close(self) -> None:
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.socks.clear()
        self.slow.clear()


def timed_request(lab: Any, host: str, addr: str, port: int, path: str = "/index.html",
                  timeout: float = 30.0) -> tuple[float, int]:
    """(seconds from connect to the whole response, HTTP status) of one request on a new connection."""
    t0 = time.perf_counter()
    s = lab.connect(host, addr, port, timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    raw = b"".join(chunks)
    return time.perf_counter() - t0, int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else 0
