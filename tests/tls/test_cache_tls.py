"""The back end's session cache over TLS: sessioncachecafile/-cert/-key/-checkhost (docs/distcache.md)."""

from __future__ import annotations

import socket
import ssl
import threading
from types import SimpleNamespace

import pytest

from tcpha.be.tls import TlsSetupError, TlsTermination
from tcpha.distcache.client import DistcacheClient, DistcacheError
from tcpha.distcache.tls import ClientTls, TlsOptions

from .conftest import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(certs, cache: str, **cache_tls) -> SimpleNamespace:
    settings = {f"sessioncache{k}": None for k in ("cafile", "cert", "key", "checkhost")}
    settings.update({f"sessioncache{k}": v for k, v in cache_tls.items()})
    return SimpleNamespace(tlscert=certs.cert, tlskey=certs.key, tlsports=[443], sessioncache=cache,
                           sessiontimeout=300, sessionkeys=None, **settings)


def _tls12_session_id(context: ssl.SSLContext) -> bytes:
    """A full TLS 1.2 handshake against ``context``; the session id the client got."""
    a, b = socket.socketpair()
    errors: list = []

    def serve():
        try:
            with context.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)
    t = threading.Thread(target=serve)
    t.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with client.wrap_socket(b) as c:
        sid = c.session.id
        c.sendall(b"x")
    t.join(10)
    assert not errors, errors
    return sid


def test_be_sessions_go_to_a_tls_cache(dc_server, certs):
    address, _ = dc_server(f"IP:127.0.0.1:{_free_port()}", ("-tls-cert", certs.cert, "-tls-key", certs.key))
    term = TlsTermination.from_config(_config(certs, address, cafile=certs.cert))
    assert term is not None and term.shared
    sid = _tls12_session_id(term.context)
    check = DistcacheClient(address, 0, timeout=5, tls=ClientTls(TlsOptions(cafile=certs.cert)))
    wait_for(lambda: check.has(sid), 10, "the session in the TLS cache")


def test_a_cache_certificate_that_does_not_check_out_is_a_cache_that_is_down(dc_server, certs, tmp_path):
    from tcpha.lab.tls_demo import make_cert
    other, _ = make_cert(tmp_path, names=["localhost"], vip="127.0.0.1")
    address, _ = dc_server(f"IP:127.0.0.1:{_free_port()}", ("-tls-cert", certs.cert, "-tls-key", certs.key))
    term = TlsTermination.from_config(_config(certs, address, cafile=str(other)))
    sid = _tls12_session_id(term.context)       # the handshake works: a full one, never a failure
    check = DistcacheClient(address, 0, timeout=5, tls=ClientTls(TlsOptions(cafile=certs.cert)))
    assert not check.has(sid)
    with pytest.raises(DistcacheError):
        DistcacheClient(address, 0, timeout=5).has(sid)     # and nothing in plaintext


@pytest.mark.parametrize("cache_tls,message", [
    ({"cafile": "/nonexistent/ca.pem"},
     "sessioncachecafile given an invalid argument ('/nonexistent/ca.pem': No such file or directory)"),
    ({"cert": "CERT"}, "sessioncachecert, sessioncachekey and sessioncachecheckhost need sessioncachecafile"),
])
def test_unusable_cache_tls_settings_are_one_line(certs, cache_tls, message):
    cache_tls = {k: (certs.cert if v == "CERT" else v) for k, v in cache_tls.items()}
    with pytest.raises(TlsSetupError) as err:
        TlsTermination.from_config(_config(certs, "UNIX:/nonexistent/scache", **cache_tls))
    assert str(err.value).startswith(message)
