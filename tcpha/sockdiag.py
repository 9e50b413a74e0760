"""TCP sockets by their 4-tuple over NETLINK_SOCK_DIAG: destroying a stale one (SOCK_DESTROY, what
`ss -K` does), and looking one up (SocketLookup).

A back end restores a handed-off connection with TCP_REPAIR, and connect() in repair mode fails with
EADDRNOTAVAIL when a socket of an *earlier* connection on the same 4-tuple still exists there: typically
one in FIN-WAIT-2 whose client's FIN never reached the back end (its steering entry was already gone,
so the client's last packets went to the front end), kept by the kernel for tcp_fin_timeout (60 s). The
client itself has long forgotten that connection and reuses the port, so the old socket is dead by
definition: the new connection's SYN was answered by the front end. (A TIME-WAIT socket does not block
a repair-mode connect.)

pyroute2 encodes the request (its inet_diag_req); it has no call for SOCK_DESTROY, hence this module.
Needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import socket
import struct

from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.diag import SOCK_DESTROY, inet_diag_req
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["SocketLookup", "destroy"]

_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFFFFFFFFFF     # INET_DIAG_NOCOOKIE: find the socket by its addresses alone


def _words(addr: str) -> tuple[int, int, int, int]:
    """An address in inet_diag's four 32-bit big-endian words (IPv4 in the first)."""
    packed = ipaddress.ip_address(addr).packed.ljust(16, b"\0")
    return struct.unpack(">4I", packed)  # type: ignore[return-value]


def destroy(local: tuple[str, int], peer: tuple[str, int]) -> bool:
    """Destroy the TCP socket local <-> peer in this network namespace. True if one was destroyed,
    False if there is none; OSError if the kernel refuses (no CAP_NET_ADMIN, no INET_DIAG_DESTROY).

    Callable from a thread running an asyncio loop (the back end's): pyroute2's synchronous sockets
    drive an event loop of their own, which cannot run inside a running one ("This event loop is
    already running"), so the request is then made from a short-lived thread (same process, same
    network namespace) and waited for; it takes well under a millisecond.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _destroy(local, peer)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sockdiag") as pool:
        return pool.submit(_destroy, local, peer).result()


def _destroy(local: tuple[str, int], peer: tuple[str, int]) -> bool:
    family = socket.AF_INET6 if ipaddress.ip_address(local[0]).version == 6 else socket.AF_INET
    req = inet_diag_req()
    req["sdiag_family"] = family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = _ALL_STATES
    req["idiag_sport"] = int(local[1])
    req["idiag_dport"] = int(peer[1])
    req["idiag_src"] = _words(local[0])
    req["idiag_dst"] = _words(peer[0])
    req["idiag_if"] = 0
    req["idiag_cookie"] = _NO_COOKIE
    try:
        with DiagSocket() as ds:
            ds.bind()
            list(ds.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK))
    except NetlinkError as e:
        if e.code == errno.ENOENT:
            return False
        raise OSError(e.code, f"SOCK_DESTROY {local[0]}:{local[1]} <-> {peer[0]}:{peer[1]}: {e}") from None
    return True


# A lookup of one TCP socket by its 4-tuple (SOCK_DIAG_BY_FAMILY, no dump), written on a raw netlink
# socket rather than through pyroute2's DiagSocket: the back end asks it per connection from inside its
# event loop, where pyroute2's synchronous socket cannot run (see destroy) and a thread per call would
# cost more than the lookup.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2


class SocketLookup:
    """One netlink socket asking the kernel for the state of the TCP socket local <-> remote."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
        self._sock.settimeout(1.0)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def state(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """The TCP state of the socket bound to `local` and connected to `remote` (the kernel's lookup
        falls back to a listener on `local`), None if there is none."""
        self._seq += 1
        sockid = struct.pack("!HH4s12x4s12x", local[1], remote[1], socket.inet_aton(local[0]),
                             socket.inet_aton(remote[0])) + struct.pack("=I", 0) + b"\xff" * 8
        req = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
        hdr = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, 1, self._seq, 0)
        self._sock.send(hdr + req)
        while True:
            data = self._sock.recv(8192)
            _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
            if seq != self._seq:
                continue
            if kind == _NLMSG_ERROR:
                return None
            return data[17]          # inet_diag_msg.idiag_state, after the 16-byte header and the family
