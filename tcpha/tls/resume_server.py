"""A TLS server that tells each client whether its session was resumed: a check for a shared
session cache set-up, used by the tests and bench/tls.

    python -m tcpha.tls.resume_server --cert cert.pem --key key.pem --cache UNIX:/run/tcpha/scache \\
        --listen 127.0.0.1:8443 --name be1

After the handshake it writes one line, ``<name> reused=<0|1> <TLS version>``.  If the client then
sends ``stats``, it answers with the context's cache counters as JSON; anything else (or EOF)
ends the connection.  Prints ``listening on HOST:PORT`` on stdout once ready.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import ssl
import sys
import threading

from .sealing import SessionKeyError, SessionSealer
from .sharing import session_cache_stats, share_sessions


def build_context(args: argparse.Namespace) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    if args.max_version:
        ctx.maximum_version = ssl.TLSVersion[args.max_version]
    return ctx


def handle(ctx: ssl.SSLContext, conn: socket.socket, name: str) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(10)
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(f"{name} reused={int(tls.session_reused)} {tls.version()}\n".encode())
            line = tls.recv(64)
            if line.strip() == b"stats":
                tls.sendall(json.dumps(session_cache_stats(ctx)).encode() + b"\n")
    except (OSError, ssl.SSLError) as exc:
        logging.getLogger("tcpha.tls.resume_server").debug("connection: %s", exc)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tcpha.tls.resume_server", description=__doc__.split("\n")[0])
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--cache", help="distcache address; without it sessions are not shared")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--name", default="server")
    p.add_argument("--timeout", type=float, default=0.2, help="cache lookup timeout, seconds")
    p.add_argument("--retry-interval", type=float, default=1.0)
    p.add_argument("--session-timeout", type=int, default=300)
    p.add_argument("--max-version", choices=["TLSv1_2", "TLSv1_3"])
    p.add_argument("--session-keys", help="seal sessions with the keys of this file (AES-256-GCM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{args.name}: %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    try:
        ctx = build_context(args)
        if args.cache:
            sealer = SessionSealer.from_file(args.session_keys) if args.session_keys else None
            share_sessions(ctx, args.cache, timeout=args.timeout, retry_interval=args.retry_interval,
                           session_timeout=args.session_timeout, sealer=sealer)
        lsock = socket.create_server((host or "127.0.0.1", int(port)), backlog=512)
    except (OSError, ValueError, ssl.SSLError, SessionKeyError) as exc:
        print(f"resume_server: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("listening on %s:%d" % lsock.getsockname()[:2], flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(ctx, conn, args.name), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
