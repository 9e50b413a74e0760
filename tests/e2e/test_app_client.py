"""The application sees the client: nginx's own access log on the back end shows the
client's address and port, for plain HTTP and for TLS terminated by tcpha-be, on a handed-off connection
and on a same-host (fd passing) one, in each way tcpha-be can say it:

- transparent (appsource = transparent): the connection to nginx comes from the client's address and
  port (remote_addr/remote_port are the TCP peer's, no PROXY header);
- v1 / v2 (appproxy, appsource = local): a PROXY header first; nginx (`listen ... proxy_protocol`,
  `real_ip_header proxy_protocol`) logs the header's address as remote_addr, while the TCP peer
  ($realip_remote_addr) is the back end itself.

`local` (the behaviour before) is the control: nginx logs the back end as the client.
"""

from __future__ import annotations

import secrets
import ssl

import pytest

from tcpha.lab.demo import APP_PORT, DEMO_FILES, LabDeployment
from tcpha.lab.http import start_http
from tcpha.lab.tls_demo import TLS_VPORT, TlsLab, make_cert, tls_rules
from tests.support import wait_until

pytestmark = pytest.mark.netns

MODES = {
    "transparent": {"appsource": "transparent", "appproxy": "off"},
    "v1": {"appsource": "local", "appproxy": "v1"},
    "v2": {"appsource": "local", "appproxy": "v2"},
    "local": {"appsource": "local", "appproxy": "off"},
}


def _origin(lab, host: str, mode: str):
    return start_http(lab, host, port=APP_PORT, files=DEMO_FILES, access_log=True,
                      proxy_protocol=MODES[mode]["appproxy"] != "off")


def _get(lab, vip: str, port: int, path: str, ctx: ssl.SSLContext | None = None,
         sni: str | None = None) -> tuple[bytes, int]:
    """One request from the client host to vip:port (over TLS with ctx); (answer, the client's port)."""
    sock = lab.connect("client", vip, port, timeout=15)
    cport = sock.getsockname()[1]
    try:
        conn = ctx.wrap_socket(sock, server_hostname=sni) if ctx is not None else sock
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni or 'tcpha.lab'}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            try:
                b = conn.recv(65536)
            except ssl.SSLEOFError:
                break
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks), cport
    finally:
        sock.close()


def _logged(origin, tag: str) -> dict:
    """nginx's access log entry of the request whose query string is `tag`."""
    def entry():
        return next(e for e in origin.access_entries() if e["args"] == tag)
    return wait_until(entry, timeout=15, what=f"the request ?{tag} in {origin.host}'s nginx access log")


def _check(entry: dict, mode: str, client_ip: str, cport: int, backend_ip: str) -> None:
    seen = (entry["remote_addr"], entry["remote_port"])
    if mode == "local":
        assert entry["remote_addr"] in ("127.0.0.1", backend_ip) and seen != (client_ip, str(cport)), entry
        return
    assert seen == (client_ip, str(cport)), entry
    if mode == "transparent":       # the TCP peer itself is the client; no header
        assert (entry["realip_remote_addr"], entry["proxy_protocol_addr"]) == (client_ip, ""), entry
    else:                           # the header said it; the TCP peer is the back end
        assert (entry["proxy_protocol_addr"], entry["proxy_protocol_port"]) == (client_ip, str(cport)), entry
        assert entry["realip_remote_addr"] == "127.0.0.1", entry


def _client_context(cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cert))
    return ctx


@pytest.mark.parametrize("mode", list(MODES))
def test_nginx_logs_the_client_of_a_handed_off_connection(lab, mode):
    dep = LabDeployment(lab)
    tls = TlsLab(dep, cache=False)
    tls.cert, tls.key = make_cert(dep.dir, vip=dep.vip)
    for host in dep.backends:
        dep.origins[host] = _origin(lab, host, mode)
        dep.start_backend(host, **tls.be_options(host, **MODES[mode]))
    dep.start_fe(port=f"80 {TLS_VPORT}", rules=tls_rules(lab))
    client_ip = lab.ip("client")

    # Plain HTTP: everything but *.jpg goes to be2.
    tag = "plain-" + secrets.token_hex(4)
    raw, cport = _get(lab, dep.vip, 80, f"/index.html?{tag}")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    _check(_logged(dep.origins["be2"], tag), mode, client_ip, cport, lab.ip("be2"))

    # TLS terminated on be1 (SNI a.*), plaintext to nginx.
    tag = "tls-" + secrets.token_hex(4)
    raw, cport = _get(lab, dep.vip, TLS_VPORT, f"/index.html?{tag}", _client_context(tls.cert), "a.example")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    _check(_logged(dep.origins["be1"], tag), mode, client_ip, cport, lab.ip("be1"))


@pytest.mark.parametrize("mode", list(MODES))
def test_nginx_logs_the_client_of_a_passed_socket(lab, mode):
    """Same host: tcpha-fe passes the accepted socket to a tcpha-be beside it (fd passing)."""
    dep = LabDeployment(lab)
    tls = TlsLab(dep, cache=False)
    tls.cert, tls.key = make_cert(dep.dir, vip=dep.vip)
    path = str(dep.dir / "be.sock")
    origin = _origin(lab, "fe", mode)
    dep.start_backend("fe", unixpath=path, **tls.be_options("fe", **MODES[mode]))
    dep.start_fe(port=f"80 {TLS_VPORT}", servers=[f"unix:{path}"], rules=[f"unix:{path} sni:.*", f"unix:{path} ^/"])
    client_ip = lab.ip("client")

    tag = "plain-" + secrets.token_hex(4)
    raw, cport = _get(lab, dep.vip, 80, f"/index.html?{tag}")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    _check(_logged(origin, tag), mode, client_ip, cport, lab.ip("fe"))

    tag = "tls-" + secrets.token_hex(4)
    raw, cport = _get(lab, dep.vip, TLS_VPORT, f"/index.html?{tag}", _client_context(tls.cert), "a.example")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    _check(_logged(origin, tag), mode, client_ip, cport, lab.ip("fe"))
