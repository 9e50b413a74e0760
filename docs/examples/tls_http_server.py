"""http.server (ThreadingHTTPServer) over TLS, with its sessions shared through distcache.

Run two of them on different ports with the same --cache: a client that made its session with
one resumes it on the other.  (See docs/tls.md.)

    dc_server -listen UNIX:/tmp/scache &
    python tls_http_server.py --cert cert.pem --key key.pem --cache UNIX:/tmp/scache --port 8443 &
    python tls_http_server.py --cert cert.pem --key key.pem --cache UNIX:/tmp/scache --port 8444 &
"""

import argparse
import http.server
import logging
import ssl

import tcpha.tls


class Handler(http.server.BaseHTTPRequestHandler):
    disable_nagle_algorithm = True   # TCP_NODELAY: a TLS handshake is several small writes

    def do_GET(self) -> None:
        reused = self.request.session_reused
        body = f"hello from port {self.server.server_address[1]}, session reused: {reused}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--cache", default="UNIX:/run/tcpha/scache", help="distcache address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    # Before the first connection.  False (and one log line) means: works, but unshared.
    tcpha.tls.share_sessions(context, args.cache, timeout=0.2)

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    # do_handshake_on_connect=False: the handshake happens in the handler's thread, on its first
    # read, not in the accept loop (where one slow client would stall every other one).
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    host, port = server.server_address[:2]
    print(f"serving on https://{host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
