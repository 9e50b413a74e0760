"""tcpha.be.rehandoff.RehandoffRelay on loopback sockets (no root): response bodies whose framing is known
go through the splice pipe unseen, bytes stay exact and in order, and the move still waits for the last
response to be in the client's socket."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

from tcpha.be.rehandoff import COPY_CHUNK, HEAD_CHUNK, LINE_CHUNK, SPLICE_MIN, RehandoffRelay
from tcpha.sniff.http import RequestHead
from tests.support import tcp_pair


pair = tcp_pair


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(1 << 20, n - len(buf)))
        if not data:
            break
        buf += data
    return bytes(buf)


def recv_to_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while data := sock.recv(1 << 20):
        buf += data
    return bytes(buf)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


def run_relay(stays, on_move, client_job, app_job, timeout: float = 30.0) -> RehandoffRelay:
    """Client <-> relay <-> application; the two jobs run in threads with blocking sockets, the relay in
    an event loop here until it ends (on_done) or `timeout`."""
    loop = asyncio.new_event_loop()
    client_outer, client_inner = pair()          # the client's socket, the relay's client side
    app_inner, app_outer = pair()                # the relay's application side, the application's socket
    for s in (client_outer, app_outer):
        s.settimeout(timeout)
    done = loop.create_future()
    errors: list[BaseException] = []

    def guard(job, sock):
        def run():
            try:
                job(sock)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
            finally:
                sock.close()
        return threading.Thread(target=run, daemon=True)

    threads = [guard(client_job, client_outer), guard(app_job, app_outer)]
    relay = RehandoffRelay(loop, client_inner, app_inner, lambda r: done.done() or done.set_result(r),
                           stays=stays, on_move=lambda r: on_move(r, loop))
    try:
        for t in threads:
            t.start()
        relay.start()
        loop.run_until_complete(asyncio.wait_for(done, timeout))
    finally:
        relay.close()
        loop.close()
        for t in threads:
            t.join(timeout)
    assert not errors, errors
    return relay


def test_response_bodies_are_spliced_unseen_and_exact():
    body_a = os.urandom(3 * 1024 * 1024)
    large = [os.urandom(512 * 1024) for _ in range(4)]              # spliced
    small = [os.urandom(8 * 1024) for _ in range(8)] + [os.urandom(5)]  # copied
    chunks = large + small + large
    requests = get("/a") + get("/b") + get("/c", "HEAD") + get("/d")
    responses = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body_a) + body_a
                 + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"".join(b"%x;ext=1\r\n" % len(c) + c + b"\r\n" for c in chunks)
                 + b"0\r\nX-Trailer: t\r\n\r\n"
                 + b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"       # HEAD: no body
                 + b"HTTP/1.1 204 No Content\r\n\r\n")
    got: dict[str, bytes] = {}

    def client(sock: socket.socket) -> None:
        sock.sendall(requests)
        got["client"] = recv_exactly(sock, len(responses))
        sock.shutdown(socket.SHUT_WR)
        got["client_rest"] = recv_to_eof(sock)

    def app(sock: socket.socket) -> None:
        got["app"] = recv_exactly(sock, len(requests))
        sock.sendall(responses)
        got["app_rest"] = recv_to_eof(sock)

    relay = run_relay(lambda head: True, lambda r, loop: None, client, app)
    assert got["app"] == requests and got["app_rest"] == b""
    assert got["client"] == responses and got["client_rest"] == b""
    assert relay.error is None and relay.bytes_down == len(responses) and relay.bytes_up == len(requests)
    # The Content-Length body and the large chunks went through the pipe, but for what the reads that see a
    # head (HEAD_CHUNK) or a size line (LINE_CHUNK) took with them, and rests shorter than SPLICE_MIN (the
    # sender's pieces may arrive in any sizes); the small chunks were copied.
    spliceable = len(body_a) + 2 * sum(map(len, large))
    slack = 4 * HEAD_CHUNK + len(chunks) * (LINE_CHUNK + SPLICE_MIN) + COPY_CHUNK
    assert spliceable - slack <= relay.spliced_down <= spliceable, (relay.spliced_down, spliceable)


def test_the_move_waits_for_a_spliced_response_and_a_refused_move_answers_503():
    """The move is asked only once the spliced response is all in the client's socket. When it cannot happen
    (here: refused), the request held for another back end never reaches this application: the client gets
    503 after the complete first response, then the connection closes."""
    body = os.urandom(2 * 1024 * 1024)
    first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    jpg = get("/b.jpg")
    got: dict[str, object] = {}

    def on_move(relay: RehandoffRelay, loop) -> None:
        got["at_move"] = (relay.bytes_down, relay._move_bytes, relay.spliced_down)
        loop.call_soon(relay.keep, "test: the move is refused")

    def client(sock: socket.socket) -> None:
        sock.sendall(get("/a") + jpg)
        got["client"] = recv_to_eof(sock)                   # the relay closes after its answer

    def app(sock: socket.socket) -> None:
        got["app_first"] = recv_exactly(sock, len(get("/a")))
        sock.sendall(first)
        got["app_rest"] = recv_to_eof(sock)

    def stays(head: RequestHead) -> bool:
        return not head.path.endswith(b".jpg")

    relay = run_relay(stays, on_move, client, app)
    assert got["app_first"] == get("/a") and got["app_rest"] == b""   # the jpg never reached it
    bytes_down, held, spliced = got["at_move"]
    assert bytes_down == len(first) and held == jpg              # asked only once all of it was sent
    assert spliced >= len(body) - HEAD_CHUNK
    client_got = got["client"]
    assert client_got[:len(first)] == first
    assert client_got[len(first):].startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in client_got[len(first):]
    assert relay.refused == 503 and relay.error is None


def test_a_head_the_front_end_would_refuse_is_answered_400_and_never_reaches_the_application():
    """A percent-encoded slash: nginx would decode it into a path the rules never matched. Pipelined after a
    good request, behind a spliced response: that response first, then 400, then the close; the
    application sees the good request only, not the bad one nor the one after it."""
    body = os.urandom(1024 * 1024)
    first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    bad = b"GET /admin%2F..%2Fsecret HTTP/1.1\r\nHost: a\r\n\r\n"
    got: dict[str, bytes] = {}

    def client(sock: socket.socket) -> None:
        sock.sendall(get("/a") + bad + get("/c"))
        got["client"] = recv_to_eof(sock)

    def app(sock: socket.socket) -> None:
        got["app_first"] = recv_exactly(sock, len(get("/a")))
        sock.sendall(first)
        got["app_rest"] = recv_to_eof(sock)

    relay = run_relay(lambda head: True, lambda r, loop: None, client, app)
    assert got["app_first"] == get("/a") and got["app_rest"] == b""
    assert got["client"][:len(first)] == first
    assert got["client"][len(first):].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert relay.refused == 400
