"""A small HTTP/1.1 origin server for the lab (the fallback when nginx is not installed, and the server
for uploads, which nginx's static module refuses).

  python -m tcpha.lab.httpapp --name be1 --root DIR [--listen ADDR:PORT]

GET/HEAD serve files under DIR (sendfile); GET /whoami answers the server's name; POST/PUT to any path
read the whole body (Content-Length or chunked) and answer JSON {"backend", "bytes", "sha256"}. Every
response carries `X-Tcpha-Backend: NAME`, so a client can tell which back end answered. Keep-alive works.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BACKEND_HEADER = "X-Tcpha-Backend"


class LabRequestHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tcpha-lab-httpapp"
    backend_name = "?"

    def log_message(self, format: str, *args: object) -> None:  # quiet: the lab's logs stay small
        pass

    def end_headers(self) -> None:
        self.send_header(BACKEND_HEADER, self.backend_name)
        super().end_headers()

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/whoami":
            body = (self.backend_name + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        # Large responses go out with sendfile(2): the lab measures byte counts, not Python's speed.
        outputfile.flush()
        try:
            self.connection.sendfile(source)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _read_body(self, sink) -> int:
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise ConnectionError("body truncated")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return total
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 16))
                    if not chunk:
                        raise ConnectionError("body truncated")
                    sink(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
                self.rfile.readline(16)
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                raise ConnectionError("body truncated")
            sink(chunk)
            remaining -= len(chunk)
            total += len(chunk)
        return total

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        try:
            n = self._read_body(digest.update)
        except (ConnectionError, ValueError):
            self.close_connection = True
            self.send_error(400, "bad request body")
            return
        body = json.dumps({"backend": self.backend_name, "bytes": n, "sha256": digest.hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST


def serve(name: str, root: str, host: str, port: int) -> None:
    handler = type("Handler", (LabRequestHandler,), {"backend_name": name})

    def make_handler(*args, **kwargs):
        return handler(*args, directory=root, **kwargs)

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer((host, port), make_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tcpha.lab.httpapp", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="name reported in X-Tcpha-Backend and /whoami")
    p.add_argument("--root", required=True, help="document root")
    p.add_argument("--listen", default="0.0.0.0:80", metavar="ADDR:PORT")
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    if not port.isdigit() or not Path(a.root).is_dir():
        print(f"httpapp: bad --listen {a.listen!r} or --root {a.root!r}", file=sys.stderr)
        return 2
    try:
        serve(a.name, os.path.abspath(a.root), host or "0.0.0.0", int(port))
    except OSError as e:
        print(f"httpapp: cannot listen on {a.listen}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
