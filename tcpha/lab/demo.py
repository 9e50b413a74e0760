"""`tcpha-lab demo`: bring up a lab, deploy tcpha with the sample configs (tcpha/lab/deploy.py), send
requests, and print a table of URIs, the back end that answered, the bytes the client received and the
bytes the front end's LAN interface transmitted; then the TLS demonstration (tcpha/lab/tls_demo.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tcpha.config import ConfigError, load_fe_config

from .deploy import (APP_PORT, CONTROL_PORT, DEMO_FILES, VPORT, LabDeployment, Response, be_config_text,
                     fe_config_text, write_key)
from .forward import expose
from .netns import LabError, NamespaceLab
from .tls_demo import TlsLab, run_tls_demo, sample_tls_configs
from .topology import DEFAULT_TOPOLOGY

# What tests and tools import from here (the deployment lives in tcpha/lab/deploy.py).
__all__ = ["APP_PORT", "CONTROL_PORT", "DEMO_FILES", "VPORT", "LabDeployment", "Response", "be_config_text",
           "fe_config_text", "write_key", "DEMO_URIS", "sample_configs", "run_demo", "main"]


# -- tcpha-lab demo ------------------------------------------------------------------------------

DEMO_URIS = ["/index.html", "/img/logo.jpg", "/img/photo.jpg", "/api/status.json", "/1m.bin",
             "/video/clip.mp4", "/whoami"]


def sample_configs() -> Path | None:
    """conf/lab of the source tree (the demo's configs), if this is a checkout."""
    d = Path(__file__).resolve().parents[2] / "conf" / "lab"
    return d if (d / "tcphafe.conf").is_file() else None


def _start_with_tls(dep: LabDeployment, out, cache_backend: str = "memory") -> Any:
    """Deploy with TLS on port 443 as well (tcpha.lab.tls_demo: certificate, dc_server on the cache
    host, TLS-terminating back ends); None, with one line said, when that part cannot run here."""
    try:
        tls = TlsLab(dep, cache_backend=cache_backend)
        tls.start(templates=sample_tls_configs() is not None)
        return tls
    except (ImportError, LabError, OSError) as e:
        print(f"(TLS part skipped: {e})", file=out)
        for proc in [dep.fe_proc, *dep.be_procs.values()]:
            if proc is not None:
                dep.lab.stop(proc)
        dep.fe_proc = None
        dep.be_procs.clear()
        return None


def _expose_status_page(dep: LabDeployment) -> str | None:
    """The front end's status page (its `metrics` address) made reachable from the root namespace by a
    forwarder living in the lab (tcpha.lab.forward; tcpha-lab down stops it). None when it is off."""
    try:
        addr = load_fe_config(str(dep.dir / "tcphafe.conf")).metrics
    except (ConfigError, OSError):
        return None
    if addr is None:
        return None
    host = "127.0.0.1" if addr[0] in ("0.0.0.0", "") else addr[0]
    _, port = expose(dep.lab, "fe", host, addr[1])
    return f"http://127.0.0.1:{port}/"


def run_demo(prefix: str | None = None, out=None, keep: bool = False, with_tls: bool = True,
             cache_backend: str = "memory") -> int:
    """Bring up a lab, deploy tcpha with the sample configs, send requests, print the table (and the
    TLS demonstration: a session made on be1 resumed on be2)."""
    out = out or sys.stdout
    prefix = prefix or ("d" + secrets.token_hex(2) + str(os.getpid() % 10))
    lab = NamespaceLab(DEFAULT_TOPOLOGY, prefix)
    confs = sample_configs()
    try:
        lab.up()
        dep = LabDeployment(lab)
        print(f"lab {prefix}: client {lab.ip('client')}, front end {lab.ip('fe')}, back ends "
              f"{', '.join(lab.ip(b) for b in dep.backends)}, VIP {dep.vip}", file=out)
        tls = _start_with_tls(dep, out, cache_backend) if with_tls else None
        fe_conf = "tcphafe-tls.conf" if tls is not None else "tcphafe.conf"
        if tls is None:
            dep.start_origins()
            for host in dep.backends:
                tpl = confs / f"tcphabe-{host}.conf" if confs else None
                dep.start_backend(host, template=tpl if tpl and tpl.is_file() else None)
            if confs:
                dep.start_fe(template=confs / fe_conf)
            else:
                dep.start_fe()
        if confs:
            rules = [line.split("=", 1)[1].strip() for line in (confs / fe_conf).read_text().splitlines()
                     if line.strip().startswith("rule")]
            print(f"configs: {confs}/{fe_conf}, {fe_conf.replace('fe', 'be-be*', 1)}", file=out)
        else:
            rules = ["10.77.0.11 jpg$", "10.77.0.12 .*"]
        names = {lab.ip(h): h for h in dep.backends}
        print("rules (first match wins): " + "; ".join(
            f"{r.split(None, 1)[1]} -> {names.get(r.split()[0], r.split()[0])}" for r in rules) + "\n", file=out)
        rows = []
        for uri in DEMO_URIS:
            before = lab.counters("fe").tx_bytes
            rx_before = lab.counters("client").rx_bytes
            r = dep.request(uri, timeout=60)
            time.sleep(0.1)      # the last ACKs and FINs pass before the counters are read
            fe_tx = lab.counters("fe").tx_bytes - before
            client_rx = lab.counters("client").rx_bytes - rx_before
            rows.append((uri, r.status, r.backend or "-", len(r.body), client_rx, fe_tx))
        w = max(len(u) for u in DEMO_URIS)
        print(f"{'URI':<{w}}  status  back end  body bytes  client received  FE transmitted", file=out)
        for uri, status, be, body, rx, tx in rows:
            print(f"{uri:<{w}}  {status:>6}  {be:<8}  {body:>10,}  {rx:>15,}  {tx:>14,}", file=out)
        total_rx = sum(r[4] for r in rows)
        total_tx = sum(r[5] for r in rows)
        print(f"\nthe client received {total_rx:,} bytes; the front end's LAN interface transmitted "
              f"{total_tx:,} ({100 * total_tx / max(total_rx, 1):.2f}%): responses went from the back "
              f"ends straight to the client", file=out)
        status = 0
        if tls is not None:
            status = run_tls_demo(tls, out, started=True)
        if keep:
            url = _expose_status_page(dep)
            if url:
                print(f"status page: {url} (from this host; Prometheus text at {url}metrics)", file=out)
            print(f"lab kept: tcpha-lab exec --name ... / remove with: tcpha-lab down (prefix {prefix})", file=out)
        return status
    except LabError as e:
        print(f"tcpha-lab demo: {e}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            lab.down()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcpha-lab demo",
                                description="Namespace lab with tcpha-fe, two tcpha-be and nginx; real requests; "
                                            "a table of who answered and what the front end transmitted.")
    p.parse_args(argv)
    return run_demo()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
