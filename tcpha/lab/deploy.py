"""tcpha deployed in the namespace lab: configs, key, daemons, origins, and a small HTTP client.

    dep = LabDeployment(lab)                 # lab: an up NamespaceLab
    dep.start()                              # origins on the back ends, tcpha-be on each, tcpha-fe
    r = dep.request("/img/a.jpg")            # from the client host, through the VIP
    r.status, r.backend, len(r.body)

`tcpha-lab demo` (tcpha/lab/demo.py) and the TLS demonstration (tcpha/lab/tls_demo.py) deploy with it;
the end-to-end tests too.

Configs are written from conf/lab/*.conf (the samples an operator reads) with the lab's addresses
and a fresh key; tests override options with keyword dicts.
"""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcpha.steering import make_flow_steering

from .http import BACKEND_HEADER, LabHttpServer, start_http
from .netns import LabError, NamespaceLab

APP_PORT = 8080
CONTROL_PORT = 666
VPORT = 80
DEMO_FILES: dict[str, int] = {
    "index.html": 512,
    "1k.bin": 1024,
    "100k.bin": 100 * 1024,
    "1m.bin": 1 << 20,
    "img/logo.jpg": 30_000,
    "img/photo.jpg": 2 * 1024 * 1024,
    "video/clip.mp4": 20 * 1024 * 1024,
    "api/status.json": 200,
}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def backend(self) -> str | None:
        return self.headers.get(BACKEND_HEADER.lower())


@dataclass(frozen=True)
class DataPath:
    """The data path tcpha's daemons in a lab use: the back ends' `relay` and the front end's `steering`
    (None: the daemon's own default). The e2e suite runs over each one (tests/e2e/conftest.py, option
    --datapaths); elsewhere the lab takes it from TCPHA_LAB_RELAY / TCPHA_LAB_STEERING."""
    relay: str | None = None        # auto | bpf | splice
    steering: str | None = None     # auto | bpf | nft

    @classmethod
    def parse(cls, text: str) -> "DataPath":
        """'RELAY+STEERING' (splice+bpf); ValueError with one line when it is not."""
        relay, plus, steering = text.strip().partition("+")
        if not plus or relay not in ("auto", "bpf", "splice") or steering not in ("auto", "bpf", "nft"):
            raise ValueError(f"data path {text!r}: write RELAY+STEERING, RELAY auto|bpf|splice, "
                             f"STEERING auto|bpf|nft (e.g. splice+bpf)")
        return cls(relay, steering)

    @classmethod
    def parse_list(cls, text: str) -> "list[DataPath]":
        """'splice+bpf,bpf+nft' -> [DataPath, ...]; ValueError when empty or an item is wrong."""
        paths = [cls.parse(item) for item in text.split(",") if item.strip()]
        if not paths:
            raise ValueError("no data path given: write RELAY+STEERING[,RELAY+STEERING...]")
        return paths

    @classmethod
    def from_env(cls) -> "DataPath":
        return cls(os.environ.get("TCPHA_LAB_RELAY") or None, os.environ.get("TCPHA_LAB_STEERING") or None)

    @property
    def id(self) -> str:
        """A name for test ids and logs: relay-splice+steering-bpf."""
        return f"relay-{self.relay or 'default'}+steering-{self.steering or 'default'}"


def lab_datapath(lab: NamespaceLab) -> DataPath:
    """The data path of this lab's daemons: the one set on the lab (NamespaceLab.datapath, by the tests'
    fixtures), else the environment's."""
    return lab.datapath if isinstance(lab.datapath, DataPath) else DataPath.from_env()


def fe_config_text(lab: NamespaceLab, key_path: str, *, servers: list[str] | None = None,
                   rules: list[str] | None = None, **options: Any) -> str:
    """tcphafe.conf for the lab: every back end as a server; default rules jpg -> be1, rest -> be2."""
    bes = [h for h in lab.topology.hosts if h.role == "be"]
    if servers is None:
        servers = [f"{h.lan_ip} {CONTROL_PORT}" for h in bes]
    if rules is None:
        rules = [f"{bes[0].lan_ip} jpg$", f"{bes[-1].lan_ip} .*"]
    values: dict[str, Any] = {
        "raddr": lab.ip("fe"), "vaddr": lab.topology.vip, "port": VPORT, "startservers": 1,
        "connperbe": 2, "authkey": key_path, "peektimeout": 2, "dbglevel": 3, "grace": 2,
        # control files and sockets of this lab's daemons stay in its scratch directory: labs run
        # side by side share the file system, not /run/tcpha
        "rundir": str(lab.workdir / "tcpha" / "run-fe"),
        "steering": lab_datapath(lab).steering,
    }
    values.update(options)
    lines = ["# written by tcpha.lab.demo"]
    lines += [f"{k} = {v}" for k, v in values.items() if v is not None]
    lines += [f"server = {s}" for s in servers]
    lines += [f"rule = {r}" for r in rules]
    return "\n".join(lines) + "\n"


def be_config_text(lab: NamespaceLab, host: str, key_path: str, **options: Any) -> str:
    ip = lab.ip(host)
    values: dict[str, Any] = {
        "raddr": ip, "uaddr": ip, "vaddr": lab.topology.vip, "port": CONTROL_PORT,
        "redirectaddr": "0.0.0.0", "redirectport": APP_PORT, "authkey": key_path, "dbglevel": 3,
        "grace": 1, "rundir": str(lab.workdir / "tcpha" / f"run-be-{host}"),
        "relay": lab_datapath(lab).relay,
    }
    values.update(options)
    lines = ["# written by tcpha.lab.demo"] + [f"{k} = {v}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def fe_steering(lab: NamespaceLab, vip: str, method: str, *args: Any, tunnel: str = "none") -> Any:
    """Call `method` on a handle of the lab FE's steering table (the daemon's: table tcpha_fe), of the
    kind its daemon chose (the lab's data path, else auto: the same choice on the same kernel; with a
    tunnel, bpf, the only kind that does tunnels)."""
    mode = "auto" if tunnel != "none" else lab_datapath(lab).steering or "auto"

    def run() -> Any:
        steering = make_flow_steering(mode, table="tcpha_fe", ifname=lab.ifname("fe"), vip=vip, ports=[VPORT],
                                      tunnel=tunnel)
        try:
            return getattr(steering, method)(*args)
        finally:
            steering.close()
    return lab.call("fe", run)


def write_key(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


@dataclass
class LabDeployment:
    lab: NamespaceLab
    files: dict[str, int] = field(default_factory=lambda: dict(DEMO_FILES))
    origin_kind: str = "auto"
    origin_access_log: bool = False     # nginx origins log each request (LabHttpServer.access_entries)
    origins: dict[str, LabHttpServer] = field(default_factory=dict)
    fe_proc: Any = None
    be_procs: dict[str, Any] = field(default_factory=dict)
    dir: Path = field(init=False)
    key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = self.lab.workdir / "tcpha"
        self.dir.mkdir(exist_ok=True)
        self.key = write_key(self.dir / "authkey")

    @property
    def vip(self) -> str:
        return self.lab.topology.vip

    @property
    def backends(self) -> list[str]:
        return [h.name for h in self.lab.topology.hosts if h.role == "be"]

    # -- processes -------------------------------------------------------------------------------
    def python(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def start_origins(self, **kw: Any) -> None:
        for name in self.backends:
            if name not in self.origins:
                self.origins[name] = start_http(self.lab, name, port=APP_PORT, files=self.files,
                                                kind=kw.get("kind", self.origin_kind),
                                                access_log=self.origin_access_log)

    def copy_config(self, template: Path, name: str) -> Path:
        """A sample config copied next to this deployment's key (its 'authkey = authkey' is relative),
        with its control files in the lab's scratch directory."""
        conf = self.dir / name
        text = template.read_text()
        if not any(line.strip().startswith("rundir") for line in text.splitlines()):
            text += f"\n# added by tcpha-lab demo\nrundir = {self.dir / ('run-' + Path(name).stem)}\n"
        conf.write_text(text)
        return conf

    def start_backend(self, host: str, template: Path | None = None, **options: Any) -> Any:
        conf = self.dir / f"tcphabe-{host}.conf"
        if template is not None:
            self.copy_config(template, conf.name)
        else:
            conf.write_text(be_config_text(self.lab, host, str(self.key), **options))
        proc = self.lab.spawn(host, self.python("tcpha.be", "-c", str(conf)), name="tcpha-be",
                              ready_tcp=(self.lab.ip(host), int(options.get("port", CONTROL_PORT))),
                              timeout=15)
        self.be_procs[host] = proc
        return proc

    def write_fe_config(self, **options: Any) -> Path:
        conf = self.dir / "tcphafe.conf"
        conf.write_text(fe_config_text(self.lab, str(self.key), **options))
        return conf

    def start_fe(self, wait: bool = True, template: Path | None = None, **options: Any) -> Any:
        conf = (self.copy_config(template, "tcphafe.conf") if template is not None
                else self.write_fe_config(**options))
        self.fe_proc = self.lab.spawn("fe", self.python("tcpha.fe", "-c", str(conf)), name="tcpha-fe",
                                      timeout=15)
        if wait:
            self.wait_fe_ready()
        return self.fe_proc

    def wait_fe_ready(self, timeout: float = 15.0, path: str = "/whoami") -> None:
        deadline = time.monotonic() + timeout
        last: Exception | str = "no answer"
        while time.monotonic() < deadline:
            if self.fe_proc is not None and self.fe_proc.poll() is not None:
                raise LabError(f"tcpha-fe exited with status {self.fe_proc.returncode}: "
                               f"{self.lab.log_tail('fe', 'tcpha-fe')}")
            try:
                r = self.request(path, timeout=2)
                if r.status == 200:
                    return
                last = f"status {r.status}"
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise LabError(f"tcpha-fe not answering through {self.vip}:{VPORT} within {timeout:g}s ({last}): "
                       f"{self.lab.log_tail('fe', 'tcpha-fe')}")

    def stop_fe(self) -> int | None:
        if self.fe_proc is None:
            return None
        rc = self.lab.stop(self.fe_proc, grace=15)
        self.fe_proc = None
        return rc

    def start(self, fe: dict[str, Any] | None = None, be: dict[str, Any] | None = None) -> None:
        self.start_origins()
        for host in self.backends:
            self.start_backend(host, **(be or {}))
        self.start_fe(**(fe or {}))

    # -- client ----------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> socket.socket:
        return self.lab.connect("client", self.vip, VPORT, timeout=timeout)

    def request(self, path: str, *, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> Response:
        """One request on a new connection from the client host through the VIP."""
        conn = http.client.HTTPConnection(self.vip, VPORT, timeout=timeout)
        conn.sock = self.connect(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()
