"""Origin HTTP servers on lab hosts: one per back end, serving files of given sizes and saying who answered.

    web = start_http(lab, "be1", port=8080, files={"1k.bin": 1024, "img/a.jpg": 50_000})
    web.url("1k.bin")  -> "http://10.77.0.11:8080/1k.bin"   (when listening on 0.0.0.0)
    web.expected("1k.bin") -> the exact bytes a client must receive

nginx (Debian's nginx-light) is the default ("auto"): a real server, as the product is meant to sit in
front of; a missing nginx is an error, never a silent swap. kind="python" (tcpha.lab.httpapp), asked for
by name, is the one to use for uploads, since it
answers POST/PUT with the body's sha256. Both add `X-Tcpha-Backend: HOST` to every response and answer
GET /whoami with the host name. File contents are a deterministic function of the file name (SHAKE-256
stream), the same on every back end, so a test can check a download byte for byte without keeping a copy.
The server process is owned by the lab: lab.down() (or web.stop()) kills it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .netns import LabError, NamespaceLab

BACKEND_HEADER = "X-Tcpha-Backend"
DEFAULT_FILES: dict[str, int] = {"index.html": 512, "1k.bin": 1024, "100k.bin": 100 * 1024,
                                 "1m.bin": 1 << 20}


BLOCK = 1 << 20


def _block(name: str, i: int) -> bytes:
    return hashlib.shake_256(b"tcpha-lab:%d:" % i + name.encode()).digest(BLOCK)


def iter_file_content(name: str, size: int):
    """The bytes of lab file `name` of `size` bytes, in 1 MiB pieces (the same everywhere)."""
    for i in range(0, (size + BLOCK - 1) // BLOCK):
        yield _block(name, i)[: min(BLOCK, size - i * BLOCK)]


def file_content(name: str, size: int) -> bytes:
    """The bytes of lab file `name` of `size` bytes (the same everywhere, for byte-exact checks)."""
    return b"".join(iter_file_content(name, size))


def file_sha256(name: str, size: int) -> str:
    h = hashlib.sha256()
    for piece in iter_file_content(name, size):
        h.update(piece)
    return h.hexdigest()


def _materialise(cache_dir: Path, name: str, size: int) -> Path:
    # One copy per lab of each (name, size); back-end roots hard-link to it.
    path = cache_dir / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}-{size}"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for piece in iter_file_content(name, size):
                f.write(piece)
        os.replace(tmp, path)
    return path


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


@dataclass
class LabHttpServer:
    lab: NamespaceLab
    host: str
    addr: str
    port: int
    kind: str
    root: Path
    files: dict[str, int]
    proc: subprocess.Popen
    confdir: Path
    extra: dict = field(default_factory=dict)

    @property
    def reach_addr(self) -> str:
        """The address other hosts use to reach this server."""
        return self.lab.ip(self.host) if self.addr in ("0.0.0.0", "") else self.addr

    def url(self, path: str = "/") -> str:
        return f"http://{self.reach_addr}:{self.port}/{path.lstrip('/')}"

    def expected(self, name: str) -> bytes:
        return file_content(name.lstrip("/"), self.files[name.lstrip("/")])

    def sha256(self, name: str) -> str:
        return file_sha256(name.lstrip("/"), self.files[name.lstrip("/")])

    @property
    def access_log(self) -> Path:
        """nginx's access log when started with access_log=True: one JSON object per request with the
        host and path nginx resolved (``$host``, ``$uri``), the target as sent and the status."""
        return self.confdir / "access.log"

    def access_entries(self) -> list[dict]:
        """The access log's entries; strings hold the logged bytes as latin-1 (nginx logs them raw)."""
        try:
            data = self.access_log.read_bytes()
        except FileNotFoundError:
            return []
        return [json.loads(line.decode("latin-1")) for line in data.splitlines() if line.strip()]

    def stop(self) -> None:
        self.lab.stop(self.proc)
        if "uploads" in self.extra:
            self.lab.stop(self.extra["uploads"])

    def running(self) -> bool:
        return self.proc.poll() is None and all(p.poll() is None for p in self.extra.values())


def start_http(lab: NamespaceLab, host: str, *, port: int = 8080, addr: str = "0.0.0.0",
               files: dict[str, int] | None = None, kind: str = "auto", name: str | None = None,
               timeout: float = 10.0, access_log: bool = False, uploads_port: int | None = None,
               proxy_protocol: bool = False) -> LabHttpServer:
    """Start an origin server in `host`'s namespace, serving `files` (path -> size), and wait until it
    accepts connections. kind: "nginx" ("auto": always nginx) or "python". access_log (nginx only): log
    every request to LabHttpServer.access_log.

    uploads_port (nginx only): nginx also answers POST/PUT under /upload/, passing them (streamed, any
    size) to the python server started on 127.0.0.1:uploads_port, which answers with the body's sha256;
    so one origin serves both downloads (nginx's sendfile) and byte-checkable uploads.

    proxy_protocol (nginx only): the listener expects a PROXY protocol header first (`listen ...
    proxy_protocol`; tcpha-be's appproxy) and takes the client's address from it (`set_real_ip_from` the
    loopback and this host's address, `real_ip_header proxy_protocol`): the access log's remote_addr is
    then the client's, proxy_protocol_addr what the header said."""
    if kind == "auto":      # a real server, always: a missing nginx is an install fault, not a reason to swap
        kind = "nginx"
    if kind not in ("nginx", "python"):
        raise ValueError(f"kind must be nginx, python or auto, not {kind!r}")
    if kind == "nginx" and not nginx_available():
        raise LabError("nginx is not installed (scripts/install-deps installs nginx-light); use kind='python'")
    files = dict(DEFAULT_FILES if files is None else files)
    label = name or f"http{port}"
    base = lab.workdir / "http" / f"{host}-{label}"
    if base.exists():
        raise LabError(f"{host}: an HTTP server named {label} is already running")
    root = base / "root"
    root.mkdir(parents=True)
    cache = lab.workdir / "http" / "files"
    cache.mkdir(exist_ok=True)
    for rel, size in files.items():
        rel = rel.lstrip("/")
        if ".." in Path(rel).parts:
            raise ValueError(f"file path {rel!r} leaves the document root")
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(_materialise(cache, rel, size), dest)
    files = {k.lstrip("/"): v for k, v in files.items()}
    probe = lab.ip(host) if addr in ("0.0.0.0", "") else addr
    extra: dict = {}
    if uploads_port is not None:
        if kind != "nginx":
            raise ValueError("uploads_port is for kind='nginx' (the python server answers uploads itself)")
        extra["uploads"] = lab.spawn(host, [sys.executable, "-m", "tcpha.lab.httpapp", "--name", host, "--root",
                                            str(root), "--listen", f"127.0.0.1:{uploads_port}"],
                                     name=f"python-{label}-uploads", ready_tcp=("127.0.0.1", uploads_port),
                                     timeout=timeout)
    if proxy_protocol and kind != "nginx":
        raise ValueError("proxy_protocol is for kind='nginx'")
    if kind == "nginx":
        conf = base / "nginx.conf"
        conf.write_text(_nginx_conf(base, root, host, addr, port, access_log, uploads_port,
                                    real_ip_from=[probe, "127.0.0.0/8"] if proxy_protocol else None))
        argv = ["nginx", "-p", str(base), "-e", str(base / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    else:
        argv = [sys.executable, "-m", "tcpha.lab.httpapp", "--name", host, "--root", str(root),
                "--listen", f"{addr}:{port}"]
    proc = lab.spawn(host, argv, name=f"{kind}-{label}", ready_tcp=(probe, port), timeout=timeout)
    return LabHttpServer(lab=lab, host=host, addr=addr, port=port, kind=kind, root=root, files=files,
                         proc=proc, confdir=base, extra=extra)


def _nginx_conf(base: Path, root: Path, host: str, addr: str, port: int, access_log: bool = False,
                uploads_port: int | None = None, real_ip_from: list[str] | None = None) -> str:
    tmp = base / "tmp"
    tmp.mkdir(exist_ok=True)
    listen = f"{addr}:{port}" if addr not in ("", "0.0.0.0") else str(port)
    log = "access_log off;"
    if access_log:
        # Who nginx saw as the client: remote_addr/remote_port (the peer, or what realip took from a
        # PROXY header), proxy_protocol_addr/proxy_protocol_port (the header as received; empty without).
        log = ("log_format tcpha_lab escape=json '{\"host\":\"$host\",\"uri\":\"$uri\",\"args\":\"$args\",'\n"
               "        '\"request_uri\":\"$request_uri\",\"status\":$status,'\n"
               "        '\"remote_addr\":\"$remote_addr\",\"remote_port\":\"$remote_port\",'\n"
               "        '\"realip_remote_addr\":\"$realip_remote_addr\",'\n"
               "        '\"proxy_protocol_addr\":\"$proxy_protocol_addr\",'\n"
               "        '\"proxy_protocol_port\":\"$proxy_protocol_port\"}';\n"
               f"    access_log {base}/access.log tcpha_lab;")
    if real_ip_from:
        listen += " proxy_protocol"
        log += "".join(f"\n    set_real_ip_from {a};" for a in real_ip_from) + "\n    real_ip_header proxy_protocol;"
    uploads = "" if uploads_port is None else f"""
        location /upload/ {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://127.0.0.1:{uploads_port};
        }}"""
    return f"""# generated by tcpha.lab.http for lab host {host}
user root;  # the lab scratch directory is private to root
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 65;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {listen} backlog=4096 default_server;
        server_name _;
        root {root};
        add_header {BACKEND_HEADER} {host} always;
        location = /whoami {{
            default_type text/plain;
            return 200 "{host}\\n";
        }}{uploads}
    }}
}}
"""


def start_backends_http(lab: NamespaceLab, *, port: int = 8080, addr: str = "0.0.0.0",
                        files: dict[str, int] | None = None, kind: str = "auto") -> dict[str, LabHttpServer]:
    """One origin server per back-end host of the lab's topology; {host: server}."""
    servers = {}
    for h in lab.topology.backends:
        servers[h.name] = start_http(lab, h.name, port=port, addr=addr, files=files, kind=kind)
    return servers
