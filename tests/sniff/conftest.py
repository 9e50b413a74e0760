"""Real bytes for the sniffer tests: ClientHellos from Python's ssl module and from `openssl s_client`, request
heads from curl and wrk (captured on loopback), and a ClientHello builder for the malformed corpus."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
from dataclasses import dataclass, field

import pytest
from tests.support import require_tool

CAPTURE_TIMEOUT = 10.0


# -- ClientHellos from Python's ssl module -----------------------------------------------------------------------

def python_hello(server_hostname: str | None = "www.example.com", alpn: list[str] | None = None,
                 maximum_version: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of a real OpenSSL client (ssl.SSLObject over memory BIOs): one ClientHello record."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- capture on loopback ------------------------------------------------------------------------------------------

def _hello_complete(data: bytes) -> bool:
    """Independent of the parser under test: enough handshake records for the ClientHello's declared length."""
    pos, hs = 0, b""
    while pos + 5 <= len(data):
        length = struct.unpack(">H", data[pos + 3:pos + 5])[0]
        hs += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            return pos <= len(data)
    return False


def capture_first_bytes(argv_for_port, complete, reply: bytes = b"") -> bytes:
    """Listen on 127.0.0.1, run the client given by ``argv_for_port(port)``, return the bytes it sends on its
    first connection once ``complete(data)`` holds; then answer ``reply``, close, and stop the client."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(CAPTURE_TIMEOUT)
        port = lsock.getsockname()[1]
        proc = subprocess.Popen(argv_for_port(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            data = b""
            while not data:  # wrk opens (and closes) a connection to check the address before its real ones
                conn, _ = lsock.accept()
                with conn:
                    conn.settimeout(CAPTURE_TIMEOUT)
                    while not complete(data):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if reply and data:
                        conn.sendall(reply)
        finally:
            proc.kill()
            proc.wait(timeout=CAPTURE_TIMEOUT)
    assert complete(data), f"client {argv_for_port(port)[0]} sent an incomplete first flight: {data[:80]!r}"
    return data


def openssl_hello(*args: str) -> bytes:
    require_tool("openssl")
    return capture_first_bytes(lambda port: ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                               _hello_complete)


def _head_complete(data: bytes) -> bool:
    return b"\r\n\r\n" in data


def http_head(tool: str, *args: str) -> bytes:
    """The first request head (and any body bytes that came with it) curl or wrk sends."""
    require_tool(tool)
    if tool == "curl":
        argv = lambda port: ["curl", "-s", "-o", "/dev/null", "--max-time", "5", *args,  # noqa: E731
                             f"http://127.0.0.1:{port}/"]
    else:
        argv = lambda port: ["wrk", "-t1", "-c1", "-d5s", *args, f"http://127.0.0.1:{port}/index.html"]  # noqa: E731
    return capture_first_bytes(argv, _head_complete, reply=b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")


# -- a ClientHello builder, for shapes OpenSSL will not produce ---------------------------------------------------

def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec8(b: bytes) -> bytes:
    return u8(len(b)) + b


def vec16(b: bytes) -> bytes:
    return u16(len(b)) + b


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec16(b"".join(u8(name_type) + vec16(n) for n in names)))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(16, vec16(b"".join(vec8(p) for p in protocols)))


def versions_ext(*versions: int) -> bytes:
    return ext(43, vec8(b"".join(u16(v) for v in versions)))


@dataclass
class HelloSpec:
    legacy_version: int = 0x0303
    session_id: bytes = bytes(32)
    suites: bytes = b"\x13\x01\x13\x02\xc0\x2f"
    compression: bytes = b"\x00"
    extensions: list[bytes] | None = field(default_factory=list)   # None: no extensions block at all

    def body(self) -> bytes:
        out = u16(self.legacy_version) + bytes(range(32)) + vec8(self.session_id) + vec16(self.suites)
        out += vec8(self.compression)
        if self.extensions is not None:
            out += vec16(b"".join(self.extensions))
        return out

    def handshake(self) -> bytes:
        body = self.body()
        return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, sizes: list[int] | int | None = None, record_version: int = 0x0301) -> bytes:
    """Wrap handshake bytes in handshake records (content type 22) of the given fragment sizes."""
    if sizes is None:
        sizes = [len(handshake)]
    elif isinstance(sizes, int):
        sizes = [sizes] * ((len(handshake) + sizes - 1) // sizes)
    out, pos = b"", 0
    for size in sizes:
        frag = handshake[pos:pos + size]
        if not frag:
            break
        out += b"\x16" + u16(record_version) + vec16(frag)
        pos += len(frag)
    assert pos == len(handshake), "sizes do not cover the handshake"
    return out


def unwrap(hello_records: bytes) -> bytes:
    """Handshake bytes of a single-record ClientHello as OpenSSL sends it."""
    assert hello_records[0] == 22
    length = struct.unpack(">H", hello_records[3:5])[0]
    return hello_records[5:5 + length]


class Builders:
    """The helpers above, reachable from tests through one fixture (tests here are not a package)."""
    python_hello = staticmethod(python_hello)
    openssl_hello = staticmethod(openssl_hello)
    http_head = staticmethod(http_head)
    HelloSpec = HelloSpec
    records = staticmethod(records)
    unwrap = staticmethod(unwrap)
    ext = staticmethod(ext)
    sni_ext = staticmethod(sni_ext)
    alpn_ext = staticmethod(alpn_ext)
    versions_ext = staticmethod(versions_ext)
    u8 = staticmethod(u8)
    u16 = staticmethod(u16)
    vec8 = staticmethod(vec8)
    vec16 = staticmethod(vec16)


@pytest.fixture(scope="session")
def b() -> type[Builders]:
    return Builders


@pytest.fixture(scope="session")
def real_hellos() -> dict[str, bytes]:
    """A small corpus of real first flights, each made once per session."""
    hellos = {
        "py-sni-alpn": python_hello("www.example.com", ["h2", "http/1.1"]),
        "py-nosni": python_hello(None),
        "py-tls12": python_hello("shop.example.org", ["http/1.1"], ssl.TLSVersion.TLSv1_2),
        "py-idn": python_hello("bücher.example"),
    }
    if require_tool("openssl"):
        hellos["openssl-sni-alpn"] = openssl_hello("-servername", "Api.Example.NET", "-alpn", "h2,http/1.1")
        hellos["openssl-tls12"] = openssl_hello("-servername", "legacy.example.com", "-tls1_2")
        hellos["openssl-noservername"] = openssl_hello("-noservername")
    return hellos



# -- resumption hellos: a real in-memory handshake, then a client offering the session ----------------------------

def _pump(client: ssl.SSLObject, c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO,
          server: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO) -> None:
    """Drive both ends of a handshake over memory BIOs until neither has anything left to say."""
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        moved = c_out.pending or s_out.pending
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()) and not moved:
            break
    assert all(done.values()), "in-memory handshake did not complete"
    # TLS 1.3 tickets arrive after the handshake: let the client read them.
    try:
        client.read(1)
    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
        pass


def resumption_hello(tmp_dir, version: ssl.TLSVersion, sni: str = "resume.example") -> bytes:
    """The ClientHello of a client resuming a session (TLS 1.3: pre_shared_key, last; TLS 1.2: session ticket)."""
    key, cert = f"{tmp_dir}/key.pem", f"{tmp_dir}/cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-subj", f"/CN={sni}", "-days", "1"],
                   check=True, capture_output=True, timeout=CAPTURE_TIMEOUT)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ctx.maximum_version = version
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=sni)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    _pump(client, bios[0], bios[1], server, bios[2], bios[3])
    session = client.session
    assert session is not None and session.has_ticket
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    again = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni, session=session)
    with pytest.raises(ssl.SSLWantReadError):
        again.do_handshake()
    return c_out.read()


@pytest.fixture(scope="session")
def resumption_hellos(tmp_path_factory) -> dict[str, bytes]:
    require_tool("openssl")
    tmp_dir = tmp_path_factory.mktemp("resume")
    return {"tls13": resumption_hello(tmp_dir, ssl.TLSVersion.TLSv1_3),
            "tls12": resumption_hello(tmp_dir, ssl.TLSVersion.TLSv1_2)}
