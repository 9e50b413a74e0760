"""tcpha-be SIGHUP: the file is re-read, what can change live is applied to
new connections with nothing dropped, what cannot is reported and kept, a broken file is refused."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tcpha.lab.demo import DEMO_FILES, be_config_text
from tcpha.lab.http import start_http
from tests.deployment import Load
from tests.support import wait_until

pytestmark = pytest.mark.netns

SECOND_PORT = 8081
SECOND_SIZE = 777          # /index.html on the second origin: its length tells which origin answered


def _index_size(prod) -> int:
    r = prod.dep.request("/index.html")
    assert r.status == 200 and r.backend == "be2"
    return len(r.body)


def test_be_sighup_moves_new_connections_to_a_second_origin_without_failures(prod):
    prod.start()
    start_http(prod.lab, "be2", port=SECOND_PORT, files=dict(DEMO_FILES, **{"index.html": SECOND_SIZE}),
               name="second")
    assert _index_size(prod) == DEMO_FILES["index.html"]
    be2 = prod.dep.be_procs["be2"]
    conf = prod.dep.dir / "tcphabe-be2.conf"
    log_path = prod.lab.log_path("be2", "tcpha-be")

    def log() -> str:
        return log_path.read_text(errors="replace")

    load = Load(prod, "/index.html", threads=4).start()
    try:
        assert wait_until(lambda: load.ok > 30, 10)
        # redirectport to the second origin, dbglevel 4 (one line per handoff), port 667 (needs a restart)
        conf.write_text(be_config_text(prod.lab, "be2", str(prod.dep.key), rundir=prod.be_rundirs["be2"],
                                       redirectport=SECOND_PORT, dbglevel=4, port=667))
        os.kill(be2.pid, signal.SIGHUP)
        assert wait_until(lambda: "reloaded " in log(), 10), log()[-2000:]
        assert wait_until(lambda: _index_size(prod) == SECOND_SIZE, 5)
        n = load.ok
        assert wait_until(lambda: load.ok > n + 50, 10)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    print(f"\nbe reload under load: {load.ok} requests, {len(load.failures)} failed")
    text = log()
    assert "reloaded" in text and "redirectport" in text and "dbglevel" in text
    assert "port changed: needs a restart; the running value is kept" in text
    assert wait_until(lambda: " restored from " in log(), 5)      # dbglevel 4 is in force
    # the control port stayed 666: the front end's links and health checks still work there
    with socket.create_connection((prod.lab.ip("be2"), 666), timeout=5):
        pass
    status = {b["name"]: b for b in prod.ctl_json("status")["backends"]}
    assert status[f"{prod.lab.ip('be2')}:666"]["status"] == "up"
    # a broken file is refused in one line; the running configuration (the second origin) stays
    conf.write_text(conf.read_text() + "bogus = 1\n")
    os.kill(be2.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload refused, configuration unchanged" in log(), 10)
    line = [l for l in log().splitlines() if "reload refused" in l][-1]
    assert "bogus" in line and "Traceback" not in log()
    assert be2.poll() is None
    assert _index_size(prod) == SECOND_SIZE


def test_be_sighup_refuses_a_certificate_that_does_not_load_and_notifies(prod, tmp_path):
    """A TLS setting that cannot be used refuses the whole reload; sd_notify RELOADING=1 / READY=1."""
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(20)
    try:
        prod.dep.start_origins()
        conf = prod.dep.dir / "tcphabe-be1.conf"
        conf.write_text(be_config_text(prod.lab, "be1", str(prod.dep.key), rundir=prod.be_rundirs["be1"]))
        p = prod.lab.spawn("be1", prod.dep.python("tcpha.be", "-c", str(conf)), name="tcpha-be",
                           env=dict(os.environ, NOTIFY_SOCKET=sock_path), ready_tcp=(prod.lab.ip("be1"), 666),
                           timeout=15)
        assert s.recv(4096).decode() == "READY=1"
        bad = tmp_path / "bad.pem"
        bad.write_text("not a certificate\n")
        conf.write_text(conf.read_text() + f"tlscert = {bad}\n")
        os.kill(p.pid, signal.SIGHUP)
        assert s.recv(4096).decode() == "RELOADING=1"
        assert s.recv(4096).decode() == "READY=1"
        text = prod.lab.log_path("be1", "tcpha-be").read_text(errors="replace")
        line = [l for l in text.splitlines() if "reload refused, configuration unchanged: " in l]
        assert len(line) == 1 and "tlscert" in line[0] and "Traceback" not in text
        assert p.poll() is None
    finally:
        s.close()


def test_be_sighup_sends_changed_rules_on_its_registration(prod):
    """dregister: a reload with other rules re-registers on the live registration; the front end routes by
    the new rules at once and never removed the back end in between."""
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.dep.files["dyn/a.html"] = 700
    prod.dep.files["new/b.html"] = 800
    prod.dep.start_origins()
    prod.start_backend("be1")
    prod.start_fe(ready="/img/logo.jpg", servers=[f"{prod.lab.ip('be1')} 666"], rules=prod.rules("{be1} jpg$"),
                  registerport=7000, dtcinterval=1)
    options = {"rundir": prod.be_rundirs["be2"], "dregister": 1, "feaddr": prod.lab.ip("fe"), "feport": 7000,
               "registerretry": 0.5}
    prod.start_backend("be2", rule="^/dyn/", **options)

    def routed(path: str) -> bool:
        r = prod.dep.request(path)
        return r.status == 200 and r.backend == "be2"

    assert wait_until(lambda: routed("/dyn/a.html"), 10), prod.fe_log()[-2000:]
    assert prod.dep.request("/new/b.html").status == 503
    conf = prod.dep.dir / "tcphabe-be2.conf"
    conf.write_text(be_config_text(prod.lab, "be2", str(prod.dep.key), rule="^/new/", **options))
    os.kill(prod.dep.be_procs["be2"].pid, signal.SIGHUP)
    assert wait_until(lambda: routed("/new/b.html"), 10), prod.fe_log()[-2000:]
    assert prod.dep.request("/dyn/a.html").status == 503
    assert "registration with" in prod.lab.log_path("be2", "tcpha-be").read_text()
    assert f"back end {be2} removed" not in prod.fe_log()


def test_be_sighup_reloads_the_tls_certificate_for_new_connections(prod, tmp_path):
    """A renewed certificate (another file, or the same path rewritten) is served to new TLS connections."""
    from tcpha.lab.tls_demo import SNI_BE1, TlsLab, make_cert
    tls = TlsLab(prod.dep, cache=False)
    tls.start()
    first = tls.s_client(SNI_BE1)
    assert first.status == 200 and first.backend == "be1", first.output[-1500:]
    assert "renewed.example" not in first.output
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    cert, key = make_cert(renewed, names=["renewed.example", SNI_BE1])
    conf = prod.dep.dir / "tcphabe-be1.conf"
    conf.write_text(be_config_text(prod.lab, "be1", str(prod.dep.key),
                                   **tls.be_options("be1", tlscert=str(cert), tlskey=str(key))))
    log_path = prod.lab.log_path("be1", "tcpha-be")
    os.kill(prod.dep.be_procs["be1"].pid, signal.SIGHUP)
    assert wait_until(lambda: "reloaded " in log_path.read_text(errors="replace"), 10)
    tls.cert = cert                                   # the client now trusts the new one
    second = tls.s_client(SNI_BE1)
    assert second.status == 200 and second.backend == "be1", second.output[-1500:]
    assert "renewed.example" in second.output
