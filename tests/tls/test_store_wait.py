"""The back end holds a handshake's last flight until the session cache has stored the new session
(tcpha.be.tls.SessionStoreWait): a client never holds a session that another back end cannot find yet.

A proxy between the back end and dc_server holds the back end's requests (the posted ADD) until the
test lets them through; the client's first answer must not come before that, whatever the timing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from types import SimpleNamespace

import pytest

from tcpha.be import tls as be_tls
from tcpha.be.tls import TlsTermination
from tcpha.metrics import backend_exposition, parse_exposition

from tests.support import tcp_pair

from .conftest import wait_for


class HoldingProxy:
    """UNIX listener -> dc_server; what the back end sends waits until release(); answers pass."""

    def __init__(self, path: str, upstream: str):
        self.path, self.upstream = path, upstream
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        self.seen = threading.Event()           # some request reached the proxy (and is held)
        self.released = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.upstream)
            self.socks += [down, up]
            threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, hold: bool) -> None:
        try:
            while data := src.recv(65536):
                if hold:
                    self.seen.set()
                    self.released.wait()
                dst.sendall(data)
        except OSError:
            pass

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        for s in [self.listener, *self.socks]:
            s.close()


@pytest.fixture
def proxied_cache(dc_server, tmp_path):
    address, _ = dc_server()
    proxy = HoldingProxy(f"{tmp_path}/held", address[len("UNIX:"):])
    yield f"UNIX:{proxy.path}", address, proxy
    proxy.close()


@pytest.fixture
def loop_thread():
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def _termination(certs, cache: str) -> TlsTermination:
    cfg = SimpleNamespace(tlscert=certs.cert, tlskey=certs.key, tlsports=[443], sessioncache=cache,
                          sessiontimeout=300, sessionkeys=None, sessioncachecafile=None, sessioncachecert=None,
                          sessioncachekey=None, sessioncachecheckhost=None)
    term = TlsTermination.from_config(cfg)
    assert term is not None and term.shared and term.store_wait is not None
    return term


class Exchange:
    """A TLS client on a socketpair to a TlsRelay; the application answers b"pong" to b"ping"."""

    def __init__(self, term: TlsTermination, loop: asyncio.AbstractEventLoop, version: str,
                 session: ssl.SSLSession | None = None, ctx: ssl.SSLContext | None = None):
        client, server = tcp_pair()
        self.app, app_peer = socket.socketpair()
        relay = term.relay(loop, server, app_peer, None)
        loop.call_soon_threadsafe(relay.start)
        if ctx is None:                        # a session is offered with the context that got it
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
        self.ctx, self.client, self.offered = ctx, client, session
        self.answer = threading.Event()
        self.session: ssl.SSLSession | None = None
        self.reused = False
        self.errors: list[BaseException] = []
        threading.Thread(target=self._application, daemon=True).start()
        threading.Thread(target=self._client, daemon=True).start()

    def _application(self) -> None:
        try:
            if self.app.recv(4) == b"ping":
                self.app.sendall(b"pong")
        except OSError as e:
            self.errors.append(e)

    def _client(self) -> None:
        try:
            with self.ctx.wrap_socket(self.client, session=self.offered) as c:
                c.sendall(b"ping")
                if c.recv(4) == b"pong":
                    self.session = c.session         # TLS 1.3: the ticket came before the answer
                    self.reused = c.session_reused
                    self.answer.set()
        except (OSError, ssl.SSLError) as e:
            self.errors.append(e)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_the_client_gets_its_session_only_once_the_cache_has_it(certs, proxied_cache, loop_thread, monkeypatch,
                                                                  version):
    monkeypatch.setattr(be_tls, "STORE_WAIT", 60.0)
    held_address, direct_address, proxy = proxied_cache
    term = _termination(certs, held_address)
    ex = Exchange(term, loop_thread, version)
    assert proxy.seen.wait(10), "the back end never posted the new session"
    # Held: the flight that gives the client its session (and the answer after it) waits for the cache.
    # Without the hold the answer comes at once; with it, it cannot come at all until the release.
    assert not ex.answer.wait(0.5), "the client got its session while the cache did not have it yet"
    proxy.release()
    assert ex.answer.wait(10), ex.errors
    assert ex.session is not None and not ex.errors
    assert (term.stats.store_waits, term.stats.store_unconfirmed) == (1, 0)
    exposed = parse_exposition(backend_exposition(handoffs=0, refused=0, fdpassed=0, control_errors=0, relayed=0,
                                                  front_ends=0, registered=None, tls=term.stats))
    assert exposed[("tcpha_be_tls_session_store_waits_total", ())] == 1
    assert exposed[("tcpha_be_tls_session_store_unconfirmed_total", ())] == 0
    # Another back end, asked at once (no waiting), finds it: the client resumes there.
    other = Exchange(_termination(certs, direct_address), loop_thread, version, session=ex.session, ctx=ex.ctx)
    assert other.answer.wait(10), other.errors
    assert other.reused


def test_a_cache_that_does_not_answer_delays_the_flight_by_store_wait_only(certs, proxied_cache, loop_thread,
                                                                         monkeypatch):
    monkeypatch.setattr(be_tls, "STORE_WAIT", 0.3)
    held_address, _, proxy = proxied_cache
    term = _termination(certs, held_address)
    ex = Exchange(term, loop_thread, "TLSv1_2")
    assert proxy.seen.wait(10)
    assert ex.answer.wait(10), ex.errors                  # never released: sent after STORE_WAIT
    wait_for(lambda: term.stats.store_unconfirmed == 1, 5, "the overdue ADD counted")
    assert term.stats.store_waits == 1
