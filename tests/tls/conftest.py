"""Fixtures for the TLS session-sharing tests: certificates, dc_server and TLS server processes,
Python and openssl CLI clients.  Loopback only."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.support import wait_until as wait_for

DC_SERVER = [sys.executable, "-c", "import sys; from tcpha.cli.dc_server import main; sys.exit(main())"]
RESUME_SERVER = [sys.executable, "-m", "tcpha.tls.resume_server"]
VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Certs:
    cert: str
    key: str


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    """A self-signed P-256 certificate for localhost / 127.0.0.1: made with the cryptography
    package when it is installed (it is not a project dependency), else with the openssl CLI."""
    d = tmp_path_factory.mktemp("tlscerts")
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        _certs_with_cryptography(cert, key)
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return Certs(str(cert), str(key))


def _certs_with_cryptography(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _connectable(address: str) -> bool:
    kind, _, rest = address.partition(":")
    try:
        if kind == "UNIX":
            s = socket.socket(socket.AF_UNIX)
            s.connect(rest)
        else:
            host, _, port = rest.rpartition(":")
            s = socket.create_connection((host, int(port)), timeout=1)
        s.close()
        return True
    except OSError:
        return False


class Processes:
    """Processes a test starts; all stopped at teardown, even when the test fails."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in (proc.stdout, proc.stderr, proc.stdin):
            if f is not None:
                f.close()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


@pytest.fixture
def procs():
    p = Processes()
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def dc_server(procs, tmp_path):
    """start(address=None) -> (address, Popen) of a dc_server answering at address."""

    def start(address: str | None = None, extra: tuple[str, ...] = ()):
        address = address or f"UNIX:{tmp_path}/scache"
        if address.startswith("UNIX:") and os.path.exists(address[5:]):
            os.unlink(address[5:])
        proc = procs.add(subprocess.Popen(DC_SERVER + ["-listen", address, *extra],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        wait_for(lambda: proc.poll() is not None or _connectable(address), 10, f"dc_server on {address}")
        assert proc.poll() is None, proc.stderr.read().decode()
        return address, proc

    return start


@dataclass
class ServerProc:
    name: str
    port: int
    proc: subprocess.Popen
    stderr_path: Path

    def log(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def tls_server(procs, certs, tmp_path):
    """start(name, cache=None, *extra_args) -> ServerProc: a tcpha.tls.resume_server process."""

    def start(name: str, cache: str | None = None, *extra: str) -> ServerProc:
        err = tmp_path / f"{name}.log"
        argv = RESUME_SERVER + ["--cert", certs.cert, "--key", certs.key, "--name", name, *extra]
        if cache:
            argv += ["--cache", cache]
        proc = procs.add(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(err, "wb"), text=True))
        line = proc.stdout.readline()
        m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, f"{name} did not start: {line!r} {err.read_text()}"
        return ServerProc(name, int(m.group(1)), proc, err)

    return start


def client_context(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.cert)
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


@dataclass
class Visit:
    line: str                 # the server's line: "<name> reused=<0|1> <version>"
    reused: bool              # the client's view (SSLSocket.session_reused)
    session: ssl.SSLSession | None
    seconds: float            # connect + handshake + first line

    @property
    def server_reused(self) -> bool:
        return " reused=1 " in self.line


def visit(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
          send: bytes = b"") -> Visit:
    """One connection: handshake (offering `session`), read the server's line (which also makes
    sure a TLS 1.3 ticket sent before it has been read), optionally send `send`, close cleanly."""
    t0 = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = tls.recv(256)
            if not chunk:
                break
            buf += chunk
        seconds = time.monotonic() - t0
        if send:
            tls.sendall(send)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                buf += chunk
        return Visit(buf.decode().strip(), tls.session_reused, tls.session, seconds)


def s_client(port: int, version: str, cafile: str, *, sess_out: str | None = None,
             sess_in: str | None = None) -> str:
    """Run `openssl s_client` against 127.0.0.1:port; returns its output.

    stdin is a pipe kept open until the server's line has been printed (so a TLS 1.3 ticket that
    came before it has been read and -sess_out written), then closed: s_client then ends.
    """
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-CAfile", cafile, "-tls1_3" if version == "TLSv1_3" else "-tls1_2"]
    if sess_out:
        argv += ["-sess_out", sess_out]
    if sess_in:
        argv += ["-sess_in", sess_in]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(20, proc.kill)
    watchdog.start()
    try:
        out = []
        for line in proc.stdout:
            out.append(line.decode(errors="replace"))
            if re.match(r"\S+ reused=[01] ", out[-1]):
                break
        proc.stdin.close()
        out.append(proc.stdout.read().decode(errors="replace"))
        proc.wait(10)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return "".join(out)


class CountingCache:
    """An in-process cache object (the add/get/remove protocol share_sessions accepts), counting calls."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.calls: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> bool:
        with self.lock:
            self.calls.append(("add", session_id))
            if session_id in self.data:
                return False
            self.data[session_id] = data
            return True

    def get(self, session_id: bytes) -> bytes | None:
        with self.lock:
            self.calls.append(("get", session_id))
            return self.data.get(session_id)

    def remove(self, session_id: bytes) -> bool:
        with self.lock:
            self.calls.append(("remove", session_id))
            return self.data.pop(session_id, None) is not None

    def count(self, op: str) -> int:
        with self.lock:
            return sum(1 for o, _ in self.calls if o == op)


@pytest.fixture
def inproc_server():
    """start(ctx) -> port: serves `ctx` with resume_server.handle in a thread of this process."""
    from tcpha.tls.resume_server import handle

    socks = []

    def start(ctx: ssl.SSLContext, name: str = "inproc") -> int:
        lsock = socket.create_server(("127.0.0.1", 0))
        socks.append(lsock)

        def loop():
            while True:
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(ctx, conn, name), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return lsock.getsockname()[1]

    try:
        yield start
    finally:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            s.close()
