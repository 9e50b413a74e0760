"""TLS through real daemons in the namespace lab: tcpha-fe routing by SNI on port 443, tcpha-be on be1 and
be2 terminating TLS, sessions shared through dc_server (cache host) + dc_client (each back end).

Client helpers drive Python's ssl module from the lab's client host; `MemoryClient` drives a TLS client
through memory BIOs, so a test controls exactly which bytes of the ClientHello go out when.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

import pytest

from tcpha.lab.tls_demo import TLS_VPORT
from tests.support import wait_until

# A client offering ALPN "tcpha-test" -> be2 whatever its SNI; then SNI a.* -> be1, b.* -> be2, no SNI or
# an unreadable ClientHello (SNI "") -> be1; any other SNI matches no rule (handshake_failure alert).
# Plain HTTP on port 80: /whoami etc. -> be2.
TLS_RULES = ["{be2} alpn:^tcpha-test$", "{be1} sni:^a\\.", "{be2} sni:^b\\.", "{be1} sni:^$", "{be1} jpg$", "{be2} .*"]
BACKEND_HEADER = b"x-tcpha-backend"


def lab_rules(lab, rules=TLS_RULES):
    return [r.format(be1=lab.ip("be1"), be2=lab.ip("be2")) for r in rules]


@dataclass
class TlsAnswer:
    backend: str | None
    status: int | None
    reused: bool
    version: str | None
    session: ssl.SSLSession | None
    raw: bytes


def client_context(tls, version: str | None = None, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(str(tls.cert))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def parse_answer(raw: bytes) -> tuple[int | None, str | None]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith(b"HTTP/") else None
    backend = None
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == BACKEND_HEADER:
            backend = v.strip().decode()
    return status, backend


def tls_get(tls, sni: str | None, *, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
            path: str = "/whoami", timeout: float = 10.0) -> TlsAnswer:
    """One HTTP/1.1 request over TLS to VIP:443 from the client host; reads to the server's close."""
    sock = tls.lab.connect("client", tls.dep.vip, TLS_VPORT, timeout=timeout)
    try:
        with ctx.wrap_socket(sock, server_hostname=sni, session=session) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni or 'tcpha.lab'}\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while True:
                try:
                    b = s.recv(65536)
                except ssl.SSLEOFError:
                    break
                if not b:
                    break
                chunks.append(b)
            raw = b"".join(chunks)
            status, backend = parse_answer(raw)
            return TlsAnswer(backend, status, s.session_reused, s.version(), s.session, raw)
    finally:
        sock.close()


class MemoryClient:
    """A TLS client whose records we send ourselves (ssl.SSLObject over memory BIOs)."""

    def __init__(self, ctx: ssl.SSLContext, sni: str | None):
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=sni)

    def client_hello(self) -> bytes:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.out.read()

    def finish(self, sock: socket.socket, request: bytes) -> bytes:
        """Complete the handshake over `sock`, send `request`, return the decrypted answer to EOF."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self.out.read()
                if pending:
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed during the handshake")
                self.inc.write(data)
        self.obj.write(request)
        sock.sendall(self.out.read())
        answer = bytearray()
        while True:
            try:
                chunk = self.obj.read(65536)
                if not chunk:
                    return bytes(answer)
                answer += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return bytes(answer)
            pending = self.out.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                return bytes(answer)
            self.inc.write(data)


@pytest.fixture(scope="module")
def tls_deployment(lab_module):
    """TLS lab shared by one module: cert, dc_server + dc_clients, origins, tcpha-be x2 (TLS), tcpha-fe (80 443)."""
    from tcpha.lab.demo import LabDeployment
    from tcpha.lab.tls_demo import TlsLab

    tls = TlsLab(LabDeployment(lab_module))
    tls.start(fe={"rules": lab_rules(lab_module), "dbglevel": 4, "peektimeout": 1})
    yield tls
