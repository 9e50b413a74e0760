"""Passing open file descriptors (accepted sockets) between processes over a Unix socket (SCM_RIGHTS).

Thin wrappers over socket.send_fds / socket.recv_fds (Python 3.9+) that turn the awkward cases into
clear errors: a message with no data (SCM_RIGHTS needs at least one byte), a peer that closed, ancillary
data truncated because the receiver allowed too few descriptors (the kernel then closes the extra ones).
"""

from __future__ import annotations

import os
import socket

__all__ = ["FDPASS_MAGIC", "FdPassError", "send_fds", "recv_fds"]

# Start of a same-host fd-passing message (front end -> local back end): this magic, then the listening
# port of the front end (2 bytes, big endian; for logs), with the client socket attached.
FDPASS_MAGIC = b"TCPHAFD1"


class FdPassError(OSError):
    """Passing descriptors failed; str(e) says why in one line."""

    def __str__(self) -> str:
        return str(self.strerror)



def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send `data` with the descriptors `fds` attached, in one message (the data must not be empty)."""
    if not data:
        raise FdPassError(0, "send_fds: at least one byte of data must accompany the descriptors")
    if sock.family != socket.AF_UNIX:
        raise FdPassError(0, "send_fds: descriptors can only travel over a Unix socket")
    try:
        sent = socket.send_fds(sock, [data], list(fds))
    except OSError as exc:
        raise FdPassError(exc.errno, f"send_fds: {exc.strerror}") from None
    if sent != len(data):
        # A stream socket that took only part of the data: the descriptors went with the first part; finish
        # the data so the receiver's framing stays intact.
        try:
            sock.sendall(memoryview(data)[sent:])
        except OSError as exc:
            raise FdPassError(exc.errno, f"send_fds: {exc.strerror}") from None


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """Receive one message and the descriptors attached to it (at most `maxfds`).

    Returns (b"", []) when the peer closed the connection. The caller owns the returned descriptors.
    """
    try:
        data, fds, msg_flags, _addr = socket.recv_fds(sock, bufsize, maxfds)
    except OSError as exc:
        raise FdPassError(exc.errno, f"recv_fds: {exc.strerror}") from None
    if msg_flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise FdPassError(0, f"recv_fds: more than {maxfds} descriptors were sent; the extra ones were dropped")
    return data, list(fds)
