"""Same-host fd passing: a front end on this host hands accepted client sockets to the back end over a
UNIX seqpacket socket (SCM_RIGHTS) instead of moving them with TCP_REPAIR.

SameHostListener owns the socket at `unixpath` (mode 0600; only root or our own user may connect);
each connection from a front end is an FdPassSession, whose messages are FDPASS_MAGIC followed by the
front end's listening port, with one client socket each. adopt_client connects a passed socket to the
application (from the client's address when transparent, with a PROXY header when appproxy is set:
tcpha.be.appsource) and relays it like a handed-off one (no FlowClosed: no steering entry points here).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from typing import TYPE_CHECKING

from tcpha import fdpass
from tcpha.be.appsource import client_address, send_proxy_header
from tcpha.fdpass import FDPASS_MAGIC
from tcpha.relay import SpliceRelay

if TYPE_CHECKING:
    from tcpha.be.server import BackEnd

log = logging.getLogger("tcpha.be")


class FdPassSession:
    """A same-host front end passing accepted sockets over a UNIX seqpacket socket (SCM_RIGHTS)."""

    def __init__(self, listener: SameHostListener, sock: socket.socket):
        self.listener = listener
        self.loop = listener.backend.loop
        self.sock = sock
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, fds = fdpass.recv_fds(self.sock, 64, 1)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    return
                log.warning("fd-passing connection failed: %s", e)
                self.close()
                return
            if not data and not fds:
                self.close()
                return
            if not data.startswith(FDPASS_MAGIC):
                log.warning("fd-passing connection sent a malformed message; dropped")
                for fd in fds:
                    os.close(fd)
                self.close()
                return
            for fd in fds:
                self.listener.adopt_client(fd)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()


class SameHostListener:
    """The UNIX listener at `path` for same-host front ends, and the relays of the sockets they pass."""

    def __init__(self, backend: BackEnd, path: str):
        self.backend = backend
        self.path = path
        self._sock: socket.socket | None = None

    def listen(self) -> None:
        """Bind and listen (in the running loop: accepts are callbacks)."""
        path = self.path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # SOCK_SEQPACKET: one message per handed socket, boundaries kept (no framing to get wrong).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(64)
        s.setblocking(False)
        self._sock = s
        self.backend.loop.add_reader(s.fileno(), self._accept)
        log.info("accepting same-host sockets on unix:%s", path)

    def close(self) -> None:
        """Stop accepting and remove the socket file (the relays are the back end's to close)."""
        if self._sock is None:
            return
        try:
            self.backend.loop.remove_reader(self._sock.fileno())
        except (ValueError, OSError):
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("UNIX accept failed: %s", e)
                return
            # Only root or our own user may hand us sockets.
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                log.warning("fd-passing connection from uid %d refused", uid)
                sock.close()
                continue
            FdPassSession(self, sock)

    def adopt_client(self, fd: int) -> None:
        be = self.backend
        try:
            client = socket.socket(fileno=fd)
        except OSError as e:
            log.warning("passed fd %d unusable: %s", fd, e)
            os.close(fd)
            return
        if len(be.relays) >= be.maxclients:
            log.warning("passed connection dropped: busy (maxclients %d)", be.maxclients)
            client.close()
            return
        try:
            peer, local = client_address(client), client.getsockname()[:2]
        except OSError as e:
            log.warning("passed connection dropped: %s", e)
            client.close()
            return
        # From the client's address and port when transparent (tcpha.be.appsource), else our own.
        app, rc = be.appsource.connect(peer, be.app_addr)
        if rc in (errno.EINPROGRESS, errno.EAGAIN):
            # loopback connect: immediate, or refused at once
            _, writable, _ = select.select([], [app], [], 1.0)
            rc = app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if writable else errno.ETIMEDOUT
        try:
            if rc:
                raise OSError(rc, f"application at {be.app_addr[0]}:{be.app_addr[1]} unreachable: "
                                  f"{os.strerror(rc)}")
            app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if be.config.appproxy != "off":      # the client's and the VIP's addresses, first
                send_proxy_header(app, be.config.appproxy, peer, local)
        except OSError as e:
            log.warning("passed connection dropped: %s", e.strerror or e)
            app.close()
            client.close()
            return
        be.stats.fdpassed += 1
        be.start_relay(client, app, self._relay_done)

    def _relay_done(self, relay: SpliceRelay) -> None:
        self.backend.relay_ended(relay)
