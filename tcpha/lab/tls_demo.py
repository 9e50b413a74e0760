"""TLS through tcpha in the namespace lab: SNI routing at the front end, TLS terminated by tcpha-be on
be1 and be2, sessions shared through distcache (dc_server on the cache host, dc_client on every back end).

    tls = TlsLab(dep)                 # dep: a tcpha.lab.demo.LabDeployment on an up lab
    tls.start()                       # cert/key (openssl CLI), dc_server, dc_clients, origins, tcpha-be x2, tcpha-fe
    first = tls.s_client("a.example", sess_out=path)                 # -> be1, "New"
    second = tls.s_client("b.example", sess_in=path)                 # -> be2, "Reused"
    run_tls_demo(dep, out)            # prints the openssl s_client table (the README's main command)

The sample configs are conf/lab/tcphafe-tls.conf and conf/lab/tcphabe-be{1,2}-tls.conf; they name the
certificate and key by relative paths (written next to the copied configs at start) and the session
cache as the dc_client on the back end's own loopback (IP:127.0.0.1:9002: every namespace has its own).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcpha.distcache.redis_cluster import RedisTls

from .deploy import LabDeployment
from .netns import LabError, NamespaceLab
from .services import start_dc_client, start_dc_server, start_redis_cluster
from .topology import DEFAULT_TOPOLOGY

TLS_VPORT = 443
CACHE_PORT = 9002            # dc_client on each back end's loopback
SNI_BE1 = "a.example"
SNI_BE2 = "b.example"
CERT_NAMES = ["a.example", "b.example", "*.example", "tcpha.lab"]


KEY_TYPES = {"p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
             "rsa2048": ["-newkey", "rsa:2048"]}


def make_cert(directory: Path, names: list[str] = CERT_NAMES, vip: str | None = None,
              key_type: str = "p256") -> tuple[Path, Path]:
    """A self-signed certificate for `names` (and the VIP) with the openssl CLI: (cert, key).
    key_type: "p256" (ECDSA P-256, the default) or "rsa2048"."""
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
    if shutil.which("openssl") is None:
        raise LabError("the openssl command is not installed (scripts/install-deps installs it)")
    cert, key = directory / "lab-cert.pem", directory / "lab-key.pem"
    san = ",".join([f"DNS:{n}" for n in names] + ([f"IP:{vip}"] if vip else []))
    r = subprocess.run(["openssl", "req", "-x509", *KEY_TYPES[key_type],
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "7", "-subj",
                        f"/CN={names[0]}", "-addext", f"subjectAltName={san}"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise LabError(f"openssl req failed: {r.stderr.strip().splitlines()[-1:]}")
    key.chmod(0o600)
    return cert, key


def sample_tls_configs() -> Path | None:
    d = Path(__file__).resolve().parents[2] / "conf" / "lab"
    return d if (d / "tcphafe-tls.conf").is_file() else None


def tls_rules(lab: Any) -> list[str]:
    """SNI a.* -> be1, b.* -> be2, any other TLS (no SNI, unreadable hello) -> be1; plain HTTP: jpg -> be1, rest be2."""
    be1, be2 = lab.ip("be1"), lab.ip("be2")
    return [f"{be1} sni:^a\\.", f"{be2} sni:^b\\.", f"{be1} sni:.*", f"{be1} jpg$", f"{be2} .*"]


@dataclass
class SClientResult:
    reused: bool | None           # None: no "New"/"Reused" line (handshake failed)
    version: str | None
    backend: str | None           # X-Tcpha-Backend of the HTTP answer
    status: int | None
    output: str
    returncode: int


@dataclass
class TlsLab:
    dep: Any                                       # tcpha.lab.demo.LabDeployment
    cache: bool = True                             # run dc_server + dc_clients and set sessioncache
    cache_backend: str = "memory"                  # dc_server's store: "memory" or "redis-cluster" (3+3 on cache)
    key_type: str = "p256"                         # the certificate's key: "p256" or "rsa2048" (make_cert)
    services: dict[str, Any] = field(default_factory=dict)
    cert: Path | None = None
    key: Path | None = None

    @property
    def lab(self) -> Any:
        return self.dep.lab

    def start_cache(self) -> None:
        args: list[str] = []
        if self.cache_backend == "redis-cluster":
            # The lab's Redis nodes speak TLS on every link (clients, replication, cluster bus), with a
            # certificate for the cache host's address that dc_server checks (docs/redis.md).
            tls_dir = self.dep.dir / "redis-tls"
            tls_dir.mkdir(parents=True, exist_ok=True)
            cert, key = make_cert(tls_dir, names=["cache"], vip=self.lab.ip("cache"))
            self.services["redis"] = start_redis_cluster(self.lab, "cache", tls=RedisTls(ca=cert, cert=cert, key=key))
            # A TLS connect on a busy lab host can take longer than the 0.25 s default.
            args = ["-backend", self.services["redis"].address + "&socket_timeout=1"]
        self.services["dc_server"] = start_dc_server(self.lab, args=args)
        for host in self.dep.backends:
            self.services[host] = start_dc_client(self.lab, host, self.services["dc_server"].address,
                                                  listen=f"IP:127.0.0.1:{CACHE_PORT}")

    def restart_dc_server(self) -> None:
        redis = self.services.get("redis")
        self.services["dc_server"] = start_dc_server(
            self.lab, args=["-backend", redis.address + "&socket_timeout=1"] if redis else None)

    def be_options(self, host: str, **extra: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {"tlscert": str(self.cert), "tlskey": str(self.key), "tlsports": TLS_VPORT}
        if self.cache:
            opts["sessioncache"] = f"IP:127.0.0.1:{CACHE_PORT}"
        opts.update(extra)
        return opts

    def start(self, *, templates: bool = False, fe: dict[str, Any] | None = None,
              be: dict[str, Any] | None = None) -> None:
        """Everything: cert, cache, origins, back ends (TLS), front end on ports 80 and 443.

        templates=True uses the sample configs of conf/lab (the demo); otherwise configs are written
        from options (tests)."""
        dep = self.dep
        self.cert, self.key = make_cert(dep.dir, vip=dep.vip, key_type=self.key_type)
        if self.cache:
            self.start_cache()
        dep.start_origins()
        confs = sample_tls_configs() if templates else None
        for host in dep.backends:
            tpl = confs / f"tcphabe-{host}-tls.conf" if confs else None
            if tpl is not None and tpl.is_file():
                dep.start_backend(host, template=tpl)
            else:
                dep.start_backend(host, **self.be_options(host, **(be or {})))
        if confs is not None:
            dep.start_fe(template=confs / "tcphafe-tls.conf")
        else:
            options = {"port": f"80 {TLS_VPORT}", "rules": tls_rules(self.lab)}
            options.update(fe or {})
            dep.start_fe(**options)

    # -- clients ---------------------------------------------------------------------------------
    def s_client(self, sni: str | None, *, sess_out: Path | None = None, sess_in: Path | None = None,
                 version: str = "1.3", path: str = "/whoami", timeout: float = 15.0) -> SClientResult:
        """`openssl s_client` from the client host to VIP:443 sending one HTTP request."""
        argv = ["openssl", "s_client", "-connect", f"{self.dep.vip}:{TLS_VPORT}", "-ign_eof",
                "-tls1_3" if version == "1.3" else "-tls1_2"]
        argv += ["-servername", sni] if sni else ["-noservername"]
        if self.cert is not None:
            argv += ["-CAfile", str(self.cert)]
        if sess_out is not None:
            argv += ["-sess_out", str(sess_out)]
        if sess_in is not None:
            argv += ["-sess_in", str(sess_in)]
        request = f"GET {path} HTTP/1.1\r\nHost: {sni or self.dep.vip}\r\nConnection: close\r\n\r\n"
        r = self.lab.run("client", argv, input=request, capture_output=True, text=True, timeout=timeout)
        return parse_s_client(r.stdout + r.stderr, r.returncode)


def parse_s_client(out: str, returncode: int) -> SClientResult:
    """What `openssl s_client` said (stdout and stderr together) about one connection carrying one HTTP
    request: New or Reused session, the TLS version, and the answer's status and X-Tcpha-Backend."""
    m = re.search(r"^(New|Reused), (TLSv[\d.]+)", out, re.M)
    be = re.search(r"^X-Tcpha-Backend:\s*(\S+)", out, re.M | re.I)
    st = re.search(r"^HTTP/1\.[01] (\d{3})", out, re.M)
    return SClientResult(reused=(m.group(1) == "Reused") if m else None, version=m.group(2) if m else None,
                         backend=be.group(1) if be else None, status=int(st.group(1)) if st else None,
                         output=out, returncode=returncode)


def run_tls_demo(dep: Any, out=None, *, started: bool = False) -> int:
    """The README's TLS demonstration on a LabDeployment `dep` (its lab up, nothing started unless
    `started`): a session made on be1 (SNI a.example) resumed on be2 (SNI b.example), TLS 1.2 and 1.3,
    with openssl s_client -sess_out then -sess_in. Returns 0 when every second connection says Reused."""
    out = out or sys.stdout
    tls = dep if isinstance(dep, TlsLab) else TlsLab(dep)
    if not started:
        tls.start(templates=sample_tls_configs() is not None)
    lab = tls.lab
    store = ("a 3+3 Redis Cluster on the cache host (TLS on every link)" if tls.cache_backend == "redis-cluster"
             else "its embedded store")
    print(f"\nTLS: tcpha-fe routes by SNI on {tls.dep.vip}:{TLS_VPORT} (a.* -> be1, b.* -> be2); tcpha-be "
          f"terminates TLS; sessions shared by dc_server on cache ({lab.ip('cache')}, {store}) through a "
          f"dc_client on each back end", file=out)
    print(f"{'TLS':<8}{'step':<36}{'SNI':<11}{'back end':<10}{'status':<8}session", file=out)
    ok = True
    for version in ("1.2", "1.3"):
        sess = tls.dep.dir / f"demo-tls{version}.sess"
        first = tls.s_client(SNI_BE1, sess_out=sess, version=version)
        second = tls.s_client(SNI_BE2, sess_in=sess, version=version)
        for step, sni, r in (("openssl s_client -sess_out FILE", SNI_BE1, first),
                             ("openssl s_client -sess_in FILE", SNI_BE2, second)):
            session = {True: "Reused", False: "New", None: "handshake failed"}[r.reused]
            print(f"{'TLSv' + version:<8}{step:<36}{sni:<11}{r.backend or '-':<10}{r.status or '-'!s:<8}{session}",
                  file=out)
        ok = ok and first.backend == "be1" and second.backend == "be2" and second.reused is True
    print("a session made on be1 was resumed on be2" if ok else "RESUMPTION ACROSS BACK ENDS FAILED", file=out)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone: bring up a lab, deploy tcpha with TLS, run the demonstration, tear down."""
    argparse.ArgumentParser(prog="python -m tcpha.lab.tls_demo", description=__doc__.split("\n")[0]).parse_args(argv)
    lab = NamespaceLab(DEFAULT_TOPOLOGY, "s" + secrets.token_hex(2) + str(os.getpid() % 10))
    try:
        lab.up()
        return run_tls_demo(LabDeployment(lab))
    except LabError as e:
        print(f"tls demo: {e}", file=sys.stderr)
        return 1
    finally:
        lab.down()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
