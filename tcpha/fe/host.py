"""What a Dispatch (tcpha.fe.dispatch) and the back ends with their control links (tcpha.fe.backends)
need from their worker, and the worker's head sniffer.

DispatchHost and BackendHost are the whole of it: they touch nothing else of the worker
(tcpha.fe.worker.Worker provides both), and neither module imports the worker. Keeping it this small keeps the handoff path readable: the steps of a connection are in
dispatch.py, its states in tcpha.control.handoff, and the worker only accepts, counts and batches.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any, Protocol

from tcpha.fe.rules import RequestFacts
from tcpha.sniff import http as sniff_http
from tcpha.sniff import tls as sniff_tls
from tcpha.sniff.incomplete import NeedMore

if TYPE_CHECKING:  # pragma: no cover
    from tcpha.control.handoff import FeEvent, FrontEndHandoffs
    from tcpha.fe.ledger import ConnectionLedger
    from tcpha.fe.rules import RuleTable


class HeadSniffer:
    """Reads request facts from peeked bytes: an HTTP request head or a TLS ClientHello, up to `peekmax`."""

    errors: tuple[type[BaseException], ...] = (sniff_http.HeadError, sniff_tls.TlsHelloError)

    def __init__(self, peekmax: int):
        self.peekmax = peekmax

    @staticmethod
    def is_tls(buf: bytes) -> bool:
        return sniff_tls.looks_like_tls(buf)

    def facts_of(self, buf: bytes, tls: bool | None = None) -> RequestFacts | None:
        """RequestFacts for the peeked bytes, None while more is needed; raises a head error (HTTP).

        A ClientHello that cannot be read (malformed, longer than peekmax) is routed like one
        without SNI and ALPN (tcpha.fe.rules): TLS clients get no HTTP error page. `tls`: is_tls(buf),
        when the caller already knows it.
        """
        if tls if tls is not None else sniff_tls.looks_like_tls(buf):
            try:
                hello = sniff_tls.parse_client_hello(buf, self.peekmax)
            except self.errors:
                return RequestFacts.from_client_hello(None)
            if hello is NeedMore:
                if len(buf) >= self.peekmax:
                    return RequestFacts.from_client_hello(None)
                return None
            return RequestFacts.from_client_hello(hello)
        head = sniff_http.parse_request_head(buf, self.peekmax)
        if head is NeedMore:
            return None
        return RequestFacts.from_request_head(head)

    def is_tls_socket(self, sock: socket.socket) -> bool:
        """The connection's first bytes (peeked) start a TLS record."""
        try:
            return sniff_tls.looks_like_tls(sock.recv(8, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False


class DispatchHost(Protocol):
    """The worker as a Dispatch sees it."""

    loop: asyncio.AbstractEventLoop
    config: Any                              # read by the local node (tcpha.fe.localnode): local_node
    sniffer: HeadSniffer
    peektimeout: float
    handofftimeout: float
    rules: "RuleTable"
    backends: dict[str, Any]                 # name or host -> RemoteBackend / LocalBackend
    ledger: "ConnectionLedger"
    stats: Any                               # WorkerStats
    batch: Any                               # SteeringBatch: freeze, forward, thaw
    handoffs: "FrontEndHandoffs[Any, Any]"   # xids and their states (tcpha.control.handoff)
    lingering: dict[int, Any]                # fd -> Dispatch draining after an answer

    def flow_key(self, peer: tuple[str, int], lport: int) -> Any: ...

    def fail_handoff(self, xid: int, reason: str, event: "FeEvent") -> None: ...

    def handoff_deadline(self, xid: int) -> None: ...

    def head_wait(self, d: Any) -> None: ...

    def head_done(self, d: Any) -> None: ...

    def dispatch_done(self, d: Any) -> None: ...


class BackendHost(Protocol):
    """The worker as its back ends and control links see it."""

    loop: asyncio.AbstractEventLoop
    config: Any                              # raddr: the source address of control connections; tunnel
    authkey: bytes
    name: str
    vip: str
    ifname: str                              # where back ends' MAC addresses are looked up
    handofftimeout: float
    rehandoff: bool                          # back ends get the rules (Rules) when a link comes up
    stats: Any
    ledger: "ConnectionLedger"
    handoffs: "FrontEndHandoffs[Any, Any]"   # which handoffs are open on a link, which fail with it

    def on_control_message(self, link: Any, msg: Any) -> None: ...

    def rules_message(self, backend: Any) -> Any: ...     # rehandoff: the Rules a back end gets

    def queue_flush(self, link: Any) -> None: ...
