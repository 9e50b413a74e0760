"""The libssl shim and share_sessions inside one process: self-checks and fallback, no internal
cache, removals, a failing cache, bad arguments.  (Two processes: test_share_sessions.py.)"""

from __future__ import annotations

import logging
import os
import ssl
import time

import pytest

from tcpha.tls import openssl, session_cache_stats, share_sessions
from tcpha.tls.openssl import ShimError

from .conftest import CountingCache, client_context, visit, wait_for


def server_context(certs, version: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.cert, certs.key)
    return ctx


def shim_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tcpha.tls" and r.levelno >= logging.WARNING]


def test_libssl_is_the_one_the_ssl_module_uses():
    lib = openssl.libssl()
    with open("/proc/self/maps") as f:
        assert lib.path in f.read()
    assert lib.OpenSSL_version_num() == ssl.OPENSSL_VERSION_NUMBER


@pytest.mark.parametrize("verify", [ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED])
def test_context_pointer_agrees_with_the_ssl_module(certs, verify):
    ctx = server_context(certs)
    ctx.verify_mode = verify
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    lib = openssl.libssl()
    ptr = openssl.context_pointer(ctx, lib)
    assert lib.SSL_CTX_get_options(ptr) == int(ctx.options)
    # Another context has another SSL_CTX.
    assert openssl.context_pointer(server_context(certs), lib) != ptr


def test_pointer_checks_refuse_wrong_pointers(certs):
    ctx = server_context(certs)
    lib = openssl.libssl()
    ptr = openssl.context_pointer(ctx, lib)
    with pytest.raises(ShimError, match="no SSL_CTX"):
        openssl.check_context_pointer(ctx, None, lib)
    with pytest.raises(ShimError, match="not in readable heap memory"):
        openssl.check_context_pointer(ctx, 0x1000, lib)  # never mapped: reading it would crash
    with pytest.raises(ShimError):
        openssl.check_context_pointer(ctx, ptr + 64, lib)  # readable, but not an SSL_CTX's start
    other = server_context(certs)
    ctx.options |= ssl.OP_NO_TICKET
    assert not other.options & ssl.OP_NO_TICKET
    with pytest.raises(ShimError, match="SSL_CTX_get_options"):  # a live SSL_CTX, but not ctx's
        openssl.check_context_pointer(ctx, openssl.context_pointer(other, lib), lib)


def test_fake_context_falls_back_with_one_log_line(caplog):
    class FakeContext:
        options = 0
        protocol = ssl.PROTOCOL_TLS_SERVER

    cache = CountingCache()
    with caplog.at_level(logging.INFO, logger="tcpha.tls"):
        assert share_sessions(FakeContext(), cache) is False
        assert share_sessions(object(), cache) is False
    warnings = shim_warnings(caplog)
    assert len(warnings) == 2  # one per call
    assert all("no shared session cache" in r.getMessage() for r in warnings)
    assert "not an ssl.SSLContext" in warnings[0].getMessage()


def test_failed_self_check_falls_back_and_the_server_still_works(certs, inproc_server, caplog, monkeypatch):
    real = openssl.context_pointer

    def off_by_64(context, lib):  # as if the object layout had changed
        return openssl.check_context_pointer(context, real(context, lib) + 64, lib)

    monkeypatch.setattr(openssl, "context_pointer", off_by_64)
    ctx = server_context(certs)
    options = ctx.options
    cache = CountingCache()
    with caplog.at_level(logging.INFO, logger="tcpha.tls"):
        assert share_sessions(ctx, cache) is False
    warnings = shim_warnings(caplog)
    assert len(warnings) == 1 and "no shared session cache" in warnings[0].getMessage()
    assert ctx.options == options  # the context was not touched
    port = inproc_server(ctx)
    client = client_context(certs, "TLSv1_2")
    first = visit(port, client)
    assert first.line.startswith("inproc reused=0")
    again = visit(port, client, first.session)
    assert again.reused  # OpenSSL's own (internal) cache, as without tcpha
    assert cache.calls == []


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_no_internal_cache_every_resumption_goes_through_the_cache(certs, inproc_server, version):
    ctx = server_context(certs)
    cache = CountingCache()
    assert share_sessions(ctx, cache, session_timeout=120)
    assert ctx.options & ssl.OP_NO_TICKET and ctx.num_tickets == 1
    lib = openssl.libssl()
    ptr = openssl.context_pointer(ctx, lib)
    assert lib.SSL_CTX_get_timeout(ptr) == 120
    mode = lib.SSL_CTX_ctrl(ptr, openssl.CTRL_GET_SESS_CACHE_MODE, 0, None)
    assert mode == openssl.SESS_CACHE_SERVER | openssl.SESS_CACHE_NO_INTERNAL
    port = inproc_server(ctx)
    client = client_context(certs, version)

    first = visit(port, client)
    assert not first.reused and cache.count("add") == 1 and cache.count("get") == 0
    second = visit(port, client, first.session)
    assert second.reused and second.server_reused
    assert cache.count("get") == 1  # the same server asked the cache: no internal lookup
    with cache.lock:
        cache.data.clear()
    third = visit(port, client, second.session)
    assert not third.reused  # nothing in the cache -> nothing resumed, even on the same server
    assert cache.count("get") == 2
    stats = session_cache_stats(ctx)
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["lookups"] == 2


def test_cache_entry_and_lifetime(certs, inproc_server):
    ctx = server_context(certs)
    added = []

    class Recorder(CountingCache):
        def add(self, session_id, data, timeout_ms):
            added.append((session_id, data, timeout_ms))
            return super().add(session_id, data, timeout_ms)

    assert share_sessions(ctx, Recorder(), session_timeout=77)
    first = visit(inproc_server(ctx), client_context(certs, "TLSv1_2"))
    [(sid, data, timeout_ms)] = added
    assert sid == first.session.id and timeout_ms == 77_000
    assert data[0] == 0x30 and 60 < len(data) < 2048  # a DER SEQUENCE: i2d_SSL_SESSION


def test_corrupt_or_mismatched_entries_are_misses(certs, inproc_server):
    ctx = server_context(certs)
    cache = CountingCache()
    assert share_sessions(ctx, cache)
    port = inproc_server(ctx)
    client = client_context(certs, "TLSv1_2")
    a = visit(port, client)
    b = visit(port, client)
    with cache.lock:
        good_a, good_b = cache.data[a.session.id], cache.data[b.session.id]
        cache.data[a.session.id] = b"\x30\x82garbage" * 10
    assert not visit(port, client, a.session).reused
    with cache.lock:
        cache.data[a.session.id] = good_b  # a valid session, but not the one asked for
    assert not visit(port, client, a.session).reused
    with cache.lock:
        cache.data[a.session.id] = good_a
    assert visit(port, client, a.session).reused  # and the error queue was left clean
    assert session_cache_stats(ctx)["misses"] == 2


def test_unclean_close_keeps_the_session_and_fatal_alert_removes_it(certs, inproc_server):
    ctx = server_context(certs)
    cache = CountingCache()
    assert share_sessions(ctx, cache)
    port = inproc_server(ctx)
    client = client_context(certs, "TLSv1_2")
    first = visit(port, client)  # the client closes without close_notify
    second = visit(port, client, first.session)
    assert second.reused and cache.count("remove") == 0

    # Now a record that fails authentication: the server sends a fatal bad_record_mac alert,
    # and a session so ended must not be resumed (RFC 5246 7.2.2).
    import socket
    raw = socket.create_connection(("127.0.0.1", port))
    tls = client.wrap_socket(raw, server_hostname="localhost", session=second.session)
    assert tls.recv(100).startswith(b"inproc reused=1")
    os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
    wait_for(lambda: cache.count("remove") == 1, 10, "the session's removal")
    tls.close()
    assert ("remove", first.session.id) in cache.calls
    assert first.session.id not in cache.data
    assert not visit(port, client, first.session).reused


def test_honour_removals_forwards_every_removal(certs, inproc_server):
    ctx = server_context(certs)
    cache = CountingCache()
    assert share_sessions(ctx, cache, honour_removals=True)
    first = visit(inproc_server(ctx), client_context(certs, "TLSv1_2"))  # closed without close_notify
    wait_for(lambda: cache.count("remove") == 1, 10, "OpenSSL's removal request")
    assert first.session.id not in cache.data


class FlakyCache(CountingCache):
    def __init__(self):
        super().__init__()
        self.broken = False

    def add(self, *a):
        if self.broken:
            raise ConnectionRefusedError("cache down")
        return super().add(*a)

    def get(self, *a):
        if self.broken:
            raise ConnectionRefusedError("cache down")
        return super().get(*a)


def test_failing_cache_means_full_handshakes_and_one_log_line_per_outage(certs, inproc_server, caplog):
    ctx = server_context(certs)
    cache = FlakyCache()
    with caplog.at_level(logging.INFO, logger="tcpha.tls"):
        assert share_sessions(ctx, cache, retry_interval=0.3)
        port = inproc_server(ctx)
        client = client_context(certs, "TLSv1_3")
        session = visit(port, client).session
        cache.broken = True
        for _ in range(10):
            v = visit(port, client, session)  # never fails
            assert not v.reused
            session = v.session
        stats = session_cache_stats(ctx)
        assert stats["outages"] == 1 and stats["skipped"] > 0
        assert len([r for r in shim_warnings(caplog) if "failed" in r.getMessage()]) == 1
        cache.broken = False
        t0 = time.monotonic()

        def resumes_again():
            return visit(port, client, visit(port, client).session).reused

        wait_for(resumes_again, 10, "resumption after the cache came back")
        assert time.monotonic() - t0 < 5
    assert len([r for r in shim_warnings(caplog) if "answers again" in r.getMessage()]) == 1


def test_bad_arguments_raise(certs):
    ctx = server_context(certs)
    with pytest.raises(ValueError, match="id_context"):
        share_sessions(ctx, CountingCache(), id_context=b"")
    with pytest.raises(ValueError, match="id_context"):
        share_sessions(ctx, CountingCache(), id_context=b"x" * 33)
    with pytest.raises(ValueError, match="timeout"):
        share_sessions(ctx, CountingCache(), timeout=0)
    with pytest.raises(TypeError):
        share_sessions(ctx, object())
    with pytest.raises(ValueError):
        share_sessions(ctx, "TCP:nowhere")
    with pytest.raises(ValueError, match="server context"):
        share_sessions(ssl.create_default_context(), CountingCache())
    assert session_cache_stats(ctx) is None  # nothing was installed


def test_slow_cache_object_is_used_once_then_skipped(certs, inproc_server, caplog):
    class SlowCache(CountingCache):
        def get(self, session_id):
            time.sleep(0.3)
            return super().get(session_id)

    ctx = server_context(certs)
    cache = SlowCache()
    with caplog.at_level(logging.INFO, logger="tcpha.tls"):
        assert share_sessions(ctx, cache, timeout=0.1, retry_interval=60)
        port = inproc_server(ctx)
        client = client_context(certs, "TLSv1_2")
        first = visit(port, client)
        assert visit(port, client, first.session).reused   # a late answer is still an answer...
        assert not visit(port, client, first.session).reused  # ...but the cache is now skipped:
    assert cache.count("get") == 1                            # the second lookup never reached it
    [warning] = [r for r in shim_warnings(caplog) if "failed" in r.getMessage()]
    assert "over the 100 ms timeout" in warning.getMessage()


def test_libssl_replaced_on_disk_while_loaded_is_still_found(tmp_path):
    """A libssl upgrade under a running daemon leaves its mapping as "PATH (deleted)": the shim still
    finds the loaded library (seen when apt upgraded libssl3 while a test run was going on)."""
    import subprocess
    import sys
    libdir = tmp_path / "lib"
    libdir.mkdir()
    real = openssl.libssl().path
    for name in ("libssl.so.3", "libcrypto.so.3"):
        src = os.path.join(os.path.dirname(os.path.realpath(real)), name)
        (libdir / name).write_bytes(open(src, "rb").read())
    script = f"""
import os, ssl, _ssl
os.unlink({str(libdir / "libssl.so.3")!r})           # the file goes; the mapping stays
assert " (deleted)" in open("/proc/self/maps").read()
from tcpha.tls import openssl
lib = openssl.libssl()
assert lib.OpenSSL_version_num() == ssl.OPENSSL_VERSION_NUMBER
print(lib.path)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LD_LIBRARY_PATH": str(libdir)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(libdir / "libssl.so.3")
