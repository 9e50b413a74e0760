#!/usr/bin/env python3
"""CPU per MB of the back end's relay on the response path of a keep-alive connection: RehandoffRelay
(rehandoff = on) against SpliceRelay (the plain relay), for large downloads.

Run by hand (no root, not in CI):
    python3 bench/rehandoff_relay.py [--mb 20] [--requests 5] [--framing length|chunked] [--runs 3]
                                     [--relay rehandoff|splice] [--tree PATH]

Loopback TCP: client <-> relay <-> application, as on a back end. A child process plays the client (one
keep-alive connection: --requests GETs one after the other, each response read to its end) and the
application (a --mb MB body per request, with Content-Length, or chunked in --chunk KiB chunks); this
process runs only the relay, in an asyncio loop, and its user+system CPU time is the relay's cost.
--tree imports tcpha from another checkout (e.g. `git archive <rev> | tar -x -C /tmp/before` for the
relay as it was before a change). Prints one markdown table row per run and the median.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

BLOCK = 256 * 1024


def pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    outer = socket.create_connection(lsock.getsockname())
    inner, _ = lsock.accept()
    lsock.close()
    return outer, inner


def head_of(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed before a head")
        buf += data
    return buf


def endpoints(client: socket.socket, app: socket.socket, relay_side: list[socket.socket], args) -> None:
    """Child: the client and the application, one thread each, blocking sockets."""
    for s in relay_side:
        s.close()
    size = args.mb * 1000 * 1000
    payload = memoryview(os.urandom(BLOCK))

    def serve() -> None:
        chunk = args.chunk * 1024
        for _ in range(args.requests):
            head_of(app)
            if args.framing == "length":
                app.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                left = size
                while left:
                    left -= app.send(payload[:min(left, BLOCK)])
            else:
                app.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                left = size
                while left:
                    n = min(left, chunk)
                    app.sendall(b"%x\r\n" % n)
                    k = n
                    while k:
                        k -= app.send(payload[:min(k, BLOCK)])
                    app.sendall(b"\r\n")
                    left -= n
                app.sendall(b"0\r\n\r\n")
        while app.recv(65536):
            pass
        app.close()

    def fetch() -> None:
        buf = bytearray(1 << 20)
        for _ in range(args.requests):
            client.sendall(b"GET /20m.jpg HTTP/1.1\r\nHost: a\r\n\r\n")
            got = 0
            tail = b""
            while True:                       # to the end of the body: length, or the last chunk's CRLFs
                n = client.recv_into(buf)
                if not n:
                    raise ConnectionError("closed in a response")
                got += n
                if args.framing == "length":
                    if got >= size + len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size):
                        break
                else:
                    tail = (tail + bytes(buf[max(0, n - 8):n]))[-8:]
                    if tail.endswith(b"\r\n0\r\n\r\n"):
                        break
        client.shutdown(socket.SHUT_WR)
        while client.recv(65536):
            pass
        client.close()

    threads = [threading.Thread(target=f) for f in (serve, fetch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def one_run(args) -> tuple[float, float, int, int]:
    from tcpha.relay import SpliceRelay
    from tcpha.be.rehandoff import RehandoffRelay
    client_outer, client_inner = pair()
    app_inner, app_outer = pair()
    child = mp.get_context("fork").Process(target=endpoints, args=(client_outer, app_outer,
                                                                   [client_inner, app_inner], args))
    child.start()
    client_outer.close()
    app_outer.close()
    loop = asyncio.new_event_loop()
    done = loop.create_future()

    def ended(relay) -> None:
        if not done.done():
            done.set_result(relay)

    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if args.relay == "splice":
        relay = SpliceRelay(loop, client_inner, app_inner, ended)
    else:
        relay = RehandoffRelay(loop, client_inner, app_inner, ended, stays=lambda head: True,
                               on_move=lambda r: r.keep("bench"))
    relay.start()
    loop.run_until_complete(asyncio.wait_for(done, 600))
    c1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loop.close()
    child.join(60)
    if child.exitcode != 0:
        raise SystemExit(f"endpoints failed: exit {child.exitcode}")
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return cpu, t1 - t0, relay.bytes_down, getattr(relay, "spliced_down", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=20, help="MB (10^6 bytes) per response")
    ap.add_argument("--requests", type=int, default=5, help="responses on the keep-alive connection")
    ap.add_argument("--framing", choices=("length", "chunked"), default="length")
    ap.add_argument("--chunk", type=int, default=64, help="KiB per chunk (chunked)")
    ap.add_argument("--relay", choices=("rehandoff", "splice"), default="rehandoff")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]), help="tcpha checkout to import")
    args = ap.parse_args()
    sys.path.insert(0, args.tree)
    import tcpha
    print(f"# tcpha from {Path(tcpha.__file__).parent}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = []
    for _ in range(args.runs):
        cpu, wall, down, spliced = one_run(args)
        mb = down / 1e6
        rows.append((cpu / mb * 1000, mb / wall, spliced / down if down else 0.0))
        print(f"| {args.relay} | {args.framing} | {args.requests} x {args.mb} MB | {cpu / mb * 1000:.2f} ms/MB "
              f"| {mb / wall:.0f} MB/s | {100 * spliced / down:.2f}% spliced |")
    print(f"median: {statistics.median(r[0] for r in rows):.2f} ms CPU per MB, "
          f"{statistics.median(r[1] for r in rows):.0f} MB/s")


if __name__ == "__main__":
    main()
