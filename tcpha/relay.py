"""Kernel relay between a handed-off client socket and the local application: splice(2) both ways.

Bytes go socket -> pipe -> socket inside the kernel (os.splice, Linux, Python >= 3.10); Python only
sees lengths. Each direction is one pipe. The relay is driven by an asyncio loop's add_reader /
add_writer callbacks (no coroutine per connection: the per-connection cost stays a few callbacks).

Half-close is kept: when one side sends FIN and its pipe is drained, the relay shuts down writing
towards the other side, so HTTP/1.0-style "send, shutdown, read the answer" clients work. When both
directions have ended (or either side fails), both sockets are closed and `on_done` is called once.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
from typing import Callable

log = logging.getLogger("tcpha.be.relay")

PIPE_SIZE = 1 << 20          # 1 MiB pipes: one splice call moves up to this much (fs.pipe-max-size default)
CHUNK = PIPE_SIZE
_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
# Drained pipes of finished relays are kept for the next ones (a handoff would otherwise cost two
# pipe2 + two F_SETPIPE_SZ + four close calls). Bounded; one event loop per process uses them.
PIPE_POOL = 256
_PIPES: list[tuple[int, int]] = []


def peer_text(sock: socket.socket) -> str:
    """A relay's name in log lines: its client's address, or "?" once the socket is gone."""
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def close_sockets(*socks: socket.socket) -> None:
    """Close a relay's two sockets; one already closed or reset is no error at the end of a relay."""
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def take_pipe() -> tuple[int, int]:
    """A non-blocking pipe (read fd, write fd) of PIPE_SIZE, from the pool when one is there."""
    if _PIPES:
        return _PIPES.pop()
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass                                        # smaller pipes still work, only more calls
    return rfd, wfd


def put_pipe(rfd: int, wfd: int, *, empty: bool) -> None:
    """Give back a pipe from take_pipe: an empty one goes to the pool (while there is room), others close."""
    if empty and len(_PIPES) < PIPE_POOL:
        _PIPES.append((rfd, wfd))
        return
    for fd in (rfd, wfd):
        try:
            os.close(fd)
        except OSError:
            pass


class _Direction:
    """One way of the relay: src socket -> pipe -> dst socket."""

    __slots__ = ("relay", "src", "dst", "rfd", "wfd", "buffered", "eof", "done", "moved",
                 "reading", "writing", "name")

    def __init__(self, relay: "SpliceRelay", src: socket.socket, dst: socket.socket, name: str):
        self.relay = relay
        self.src = src
        self.dst = dst
        self.name = name
        self.rfd, self.wfd = take_pipe()
        self.buffered = 0                           # bytes sitting in the pipe
        self.eof = False                            # src sent FIN
        self.done = False                           # FIN passed on to dst (or direction aborted)
        self.moved = 0
        self.reading = False
        self.writing = False

    # -- kernel moves --------------------------------------------------------------------------
    def pump(self) -> None:
        """Move as much as the kernel allows without blocking; (re)arm the watchers we need."""
        while not self.done:
            if self.buffered:
                try:
                    n = os.splice(self.rfd, self.dst.fileno(), self.buffered, flags=_FLAGS)
                except OSError as e:
                    if e.errno in _AGAIN:
                        self._want(read=False, write=True)
                        return
                    raise
                self.buffered -= n
                self.moved += n
                if self.buffered:
                    continue
            if self.eof:
                self._finish()
                return
            try:
                n = os.splice(self.src.fileno(), self.wfd, CHUNK, flags=_FLAGS)
            except OSError as e:
                if e.errno in _AGAIN:
                    self._want(read=True, write=False)
                    return
                raise
            if n == 0:
                self.eof = True
            else:
                self.buffered += n

    def _finish(self) -> None:
        self.done = True
        self._want(read=False, write=False)
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.relay._direction_done()

    def _want(self, *, read: bool, write: bool) -> None:
        loop = self.relay.loop
        if read != self.reading:
            if read:
                loop.add_reader(self.src.fileno(), self.relay._step, self)
            else:
                self.relay._remove_reader(self.src.fileno(), self)
            self.reading = read
        if write != self.writing:
            if write:
                loop.add_writer(self.dst.fileno(), self.relay._step, self)
            else:
                loop.remove_writer(self.dst.fileno())
            self.writing = write

    def close(self) -> None:
        self._want(read=False, write=False)
        put_pipe(self.rfd, self.wfd, empty=self.buffered == 0)     # empty: reusable by the next relay


class SpliceRelay:
    """Relays `client` <-> `app` with splice until both directions end.

    Both sockets must be connected; they are made non-blocking and owned by the relay (closed at the end).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, app: socket.socket,
                 on_done: Callable[["SpliceRelay"], None] | None = None):
        self.loop = loop
        self.client = client
        self.app = app
        self.on_done = on_done
        client.setblocking(False)
        app.setblocking(False)
        self.up = _Direction(self, client, app, "client->app")
        self.down = _Direction(self, app, client, "app->client")
        self.closed = False
        self.held = False
        self.error: str | None = None

    def start(self, *, hold_down: bool = False) -> None:
        """Start relaying. hold_down: nothing moves until release() (the front end has not yet steered
        the flow here). Not even the client's bytes are read: reading opens the restored socket's
        receive window, the kernel tells the client so, and a client that was waiting for that window
        (an upload) would send into the front end's freeze, lose it all and wait out its backed-off
        retransmission timeout (docs/kernel.md, "the freeze window")."""
        self.held = hold_down
        if hold_down:
            return
        self._step(self.up)
        if not self.closed:
            self._step(self.down)

    def release(self) -> None:
        """Start both directions held by start(hold_down=True)."""
        if not self.held:
            return
        self.held = False
        for direction in (self.up, self.down):
            if not self.closed and not direction.reading and not direction.writing and not direction.done:
                self._step(direction)

    @property
    def bytes_up(self) -> int:
        return self.up.moved

    @property
    def bytes_down(self) -> int:
        return self.down.moved

    def _remove_reader(self, fd: int, direction: _Direction) -> None:
        self.loop.remove_reader(fd)

    def _step(self, direction: _Direction) -> None:
        if self.closed:
            return
        try:
            direction.pump()
        except OSError as e:
            # ECONNRESET / EPIPE from either side: the connection is over; close both ends.
            self.error = f"{direction.name}: {os.strerror(e.errno) if e.errno else e}"
            log.debug("relay %s ended: %s", self.describe(), self.error)
            self.close()

    def _direction_done(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def describe(self) -> str:
        return peer_text(self.client)

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for d in (self.up, self.down):
            d.close()
        close_sockets(self.client, self.app)
        if self.on_done is not None:
            self.on_done(self)
