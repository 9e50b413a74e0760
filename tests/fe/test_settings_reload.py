"""Settings that do what they say: the back end's `grace` and `metrics`,
a front-end `authkey` change reaching every control connection it makes, and each option's declared reload
mode being what a reload does."""

from __future__ import annotations

import os
import signal

import pytest

from tcpha.lab.demo import DEMO_FILES, write_key
from tcpha.lab.http import file_content
from tcpha.metrics import parse_exposition
from tests.support import wait_until
from tests.fe.test_health import backend_status

pytestmark = pytest.mark.netns

BE_METRICS_PORT = 9119
BIG = "video/clip.mp4"               # 20 MiB, served by be2 (rule '.*')


def _log(prod, host: str, name: str) -> str:
    return prod.lab.log_path(host, name).read_text(errors="replace")


def _read_until_eof(sock) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


# -- back end: grace ------------------------------------------------------------------------------

def test_be_sigterm_lets_a_relayed_download_finish_within_grace(prod):
    prod.start(be={"grace": 60})
    be2 = prod.dep.be_procs["be2"]
    sock = prod.dep.connect(timeout=30)
    try:
        sock.sendall(f"GET /{BIG} HTTP/1.1\r\nHost: tcpha\r\nConnection: close\r\n\r\n".encode())
        first = sock.recv(1 << 16)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        be2.send_signal(signal.SIGTERM)        # the download is in flight: most of 20 MiB still to come
        assert wait_until(lambda: "waiting up to 60 s for 1 relayed connections" in _log(prod, "be2", "tcpha-be"),
                          15)
        assert be2.poll() is None
        rest = _read_until_eof(sock)
    finally:
        sock.close()
    response = first + rest
    head, _, body = response.partition(b"\r\n\r\n")
    assert body == file_content(BIG, DEMO_FILES[BIG]), (len(body), DEMO_FILES[BIG])
    assert wait_until(lambda: be2.poll() is not None, 30)
    assert "every relayed connection has ended" in _log(prod, "be2", "tcpha-be")


def test_be_grace_bounds_the_wait_for_a_connection_that_does_not_end(prod):
    prod.start(be={"grace": 1})
    be2 = prod.dep.be_procs["be2"]
    sock = prod.dep.connect(timeout=30)
    try:
        sock.sendall(b"GET /index.html HTTP/1.1\r\nHost: tcpha\r\n\r\n")      # keep-alive: stays open
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
        be2.send_signal(signal.SIGTERM)
        assert wait_until(lambda: be2.poll() is not None, 30)
    finally:
        sock.close()
    text = _log(prod, "be2", "tcpha-be")
    assert "waiting up to 1 s for 1 relayed connections" in text
    assert "1 relayed connections still open after grace (1 s); closed" in text


# -- back end: metrics ----------------------------------------------------------------------------

def test_be_metrics_endpoint_counts_handoffs(prod):
    prod.start(be={"metrics": str(BE_METRICS_PORT)})
    for _ in range(3):
        assert prod.dep.request("/index.html").backend == "be2"

    def scrape() -> dict:
        r = prod.lab.run("be2", ["curl", "-sf", f"http://127.0.0.1:{BE_METRICS_PORT}/metrics"],
                         capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        return {name: v for (name, labels), v in parse_exposition(r.stdout).items()}

    m = scrape()
    assert m["tcpha_be_handoffs_total"] >= 3
    assert m["tcpha_be_handoffs_refused_total"] == 0
    assert m["tcpha_be_control_connections"] >= 1
    assert "tcpha_be_relayed_connections" in m and "tcpha_be_registered" not in m


# -- usefuse (read by both daemons, now declared) -----------------------------------------------------

def test_usefuse_0_serves_plain_control_files(prod):
    from tcpha.runtime.fusefs import fuse_available
    prod.start(fe={"usefuse": 0}, be={"usefuse": 0})
    for pid, rundir, log in ((prod.dep.fe_proc.pid, prod.fe_rundir, prod.fe_log()),
                             (prod.dep.be_procs["be2"].pid, prod.be_rundirs["be2"], _log(prod, "be2", "tcpha-be"))):
        assert f"control directory {rundir}: FUSE off (usefuse = 0); plain files" in log
        assert prod.sh(pid, f"mountpoint -q {rundir}").returncode != 0         # not a FUSE mount
        assert prod.sh(pid, f"cat {rundir}/sys/dbglevel").stdout.strip() == "3"
    assert prod.ctl_json("sys/dbglevel") == 3
    # The back end's files made from its event loop's objects (conn, settings) are there from the first
    # refresh, which runs inside that loop: it must not wait for the loop from the loop (that blocked
    # the back end for 5 s per file and left both files out until the next refresh).
    be2 = prod.dep.be_procs["be2"].pid
    assert wait_until(lambda: "(mirror), control socket" in _log(prod, "be2", "tcpha-be"), 30)
    assert "read failed" not in _log(prod, "be2", "tcpha-be")
    settings = prod.sh(be2, f"cat {prod.be_rundirs['be2']}/settings").stdout
    assert "usefuse" in settings, settings
    assert prod.sh(be2, f"test -f {prod.be_rundirs['be2']}/conn").returncode == 0
    if fuse_available() is None:     # and the default, where FUSE works, is a mount: the option is what differs
        prod.lab.stop(prod.dep.be_procs.pop("be1"), grace=10)
        be1 = prod.start_backend("be1")
        assert wait_until(lambda: prod.sh(be1.pid, f"mountpoint -q {prod.be_rundirs['be1']}").returncode == 0, 10)


# -- front end: authkey on SIGHUP -----------------------------------------------------------------

def test_fe_authkey_change_reaches_the_workers_links_and_the_health_prober(prod):
    """The key file rewritten, SIGHUP to the front end, then be2 restarted with the new key: the workers'
    control links and the health prober reconnect to it with the new key (be1, not restarted, keeps its
    established, already authenticated connections)."""
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"dtcinterval": 0.5, "healthtimeout": 0.4})
    assert prod.dep.request("/index.html").backend == "be2"
    write_key(prod.dep.key)                                     # same path, new key
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: any("reloaded" in line and "authkey" in line
                                  for line in prod.fe_log().splitlines()), 10), prod.fe_log()[-2000:]
    prod.lab.stop(prod.dep.be_procs.pop("be2"), grace=10)
    assert wait_until(lambda: backend_status(prod, be2) == "down", 15)
    prod.start_backend("be2")                                   # reads the new key
    assert wait_until(lambda: backend_status(prod, be2) == "up", 30)          # the prober's new connection
    assert wait_until(lambda: prod.dep.request("/index.html").backend == "be2", 30)   # the workers' links
    for _ in range(5):
        assert prod.dep.request("/index.html").backend == "be2"
    assert prod.dep.request("/img/logo.jpg").backend == "be1"
    assert "bad MAC" not in _log(prod, "be2", "tcpha-be")


# -- every option: the declared reload mode is what a reload does ----------------------------------

def _spare_ip(prod) -> str:
    """An address of the lab's LAN that no host holds (a server line that stays down)."""
    return prod.lab.ip("be2").rsplit(".", 1)[0] + ".250"


def _other_key(prod):
    return write_key(prod.dep.dir / "other-authkey")


def _lines_with(text: str, marker: str) -> list[str]:
    return [line for line in text.splitlines() if marker in line]


def _named(line: str, after: str, before: str | None = None) -> set[str]:
    part = line.split(after, 1)[1]
    if before is not None:
        part = part.split(before, 1)[0]
    return {name.strip() for name in part.split(",")}


def _check_in_force(component, table, in_force: dict, old, new, skip=()) -> list[str]:
    """The names whose value in force is not the one the declaration says (LIVE: new, RESTART: old)."""
    from tcpha.config.settings import LIVE, in_force_form
    wrong = []
    for s in table:
        if s.name in skip or s.name not in in_force:
            continue
        expected = in_force_form(s, getattr(new if s.reload == LIVE else old, s.attr))
        if in_force[s.name] != expected:
            wrong.append(f"{s.name}: in force {in_force[s.name]!r}, declared {s.reload}: {expected!r}")
    return wrong


def _settle(wrong) -> None:
    """Wait until ``wrong()`` (the options whose value in force is not the declared one) is empty;
    fail naming them."""
    seen: list[str] = []

    def settled() -> bool:
        seen[:] = wrong()
        return not seen
    try:
        wait_until(settled, 10, what="every option in force as declared")
    except AssertionError as e:
        raise AssertionError(f"{e}: {seen}") from None


def test_fe_reload_applies_each_live_option_and_reports_each_restart_option(prod):
    from tcpha.config import FE_SETTINGS, load_fe_config
    from tcpha.config.settings import LIVE, RESTART
    from tcpha.lab.demo import APP_PORT, CONTROL_PORT, VPORT, fe_config_text
    from tcpha.lab.deploy import lab_datapath
    prod.start()
    conf = prod.dep.dir / "tcphafe.conf"
    old = load_fe_config(str(conf))
    be1, be2, spare = prod.lab.ip("be1"), prod.lab.ip("be2"), _spare_ip(prod)
    changed = {   # every option of tcphafe.conf, to a value other than the running one
        "raddr": spare, "vaddr": prod.lab.ip("be2").rsplit(".", 1)[0] + ".251", "port": f"{VPORT} 8443",
        "startservers": 2, "maxspareservers": 6, "minspareservers": 1, "maxclients": 100, "connperbe": 3,
        "redirectaddr": prod.lab.ip("fe"), "redirectport": 8081, "registerport": 81, "interface": "eth9",
        "peekmax": "8k", "peektimeout": 5, "handofftimeout": 1.5, "flowtimeout": 60, "dtcinterval": 3,
        "healthcheck": "http", "healthpath": "/index.html", "healthport": APP_PORT, "healthtimeout": 0.5,
        "rise": 3, "fall": 2, "authkey": str(_other_key(prod)), "rundir": str(prod.lab.workdir / "run-fe-2"),
        "usefuse": 0, "logfile": str(prod.lab.workdir / "fe-2.log"), "dbglevel": 4, "metrics": 9121, "grace": 5,
        "statsadmin": "on", "rehandoff": "on", "tunnel": "vxlan",
        # another steering than the running one (the lab's, else auto)
        "steering": "bpf" if lab_datapath(prod.lab).steering == "nft" else "nft",
    }
    conf.write_text(fe_config_text(prod.lab, str(prod.dep.key),
                                   servers=[f"{be1} {CONTROL_PORT}", f"{be2} {CONTROL_PORT}", f"{spare} {CONTROL_PORT}"],
                                   rules=[f"{be1} \\.jpg$", f"{be2} ^/", f"{spare} ^/never"], **changed))
    new = load_fe_config(str(conf))
    assert {s.name for s in FE_SETTINGS} == set(changed) | {"server", "rule"}
    assert all(getattr(old, s.attr) != getattr(new, s.attr) for s in FE_SETTINGS), "an option did not change"
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: _lines_with(prod.fe_log(), "reloaded "), 15), prod.fe_log()[-2000:]
    text = prod.fe_log()
    restart_line = _lines_with(text, "applied at the next restart")[-1]
    assert _named(restart_line, "reload: ", " changed;") == {s.name for s in FE_SETTINGS if s.reload == RESTART}
    live_line = _lines_with(text, "reloaded ")[-1]
    assert _named(live_line, f"reloaded {conf}: ") == {s.name for s in FE_SETTINGS if s.reload == LIVE}

    def wrong() -> list[str]:
        data = prod.ctl_json("settings")
        assert data["workers"], "no worker answered"
        out = [f"arbiter {w}" for w in _check_in_force("fe", FE_SETTINGS, data["arbiter"], old, new)]
        for worker in data["workers"]:
            out += [f"worker {worker['pid']} {w}" for w in
                    _check_in_force("fe", FE_SETTINGS, worker["settings"], old, new)]
        return out

    _settle(wrong)
    data = prod.ctl_json("settings")
    # each option is reported by the arbiter; the worker reports the ones it applies itself
    assert set(data["arbiter"]) == {s.name for s in FE_SETTINGS}
    assert {"peekmax", "peektimeout", "handofftimeout", "maxclients", "grace", "authkey", "server", "rule",
            "dbglevel", "redirectaddr", "redirectport"} <= set(data["workers"][0]["settings"])
    text = prod.ctl("get", "settings")
    assert text.returncode == 0 and "\npeekmax = 8192\n" in text.stdout and "\nflowtimeout = 3600.0\n" in text.stdout
    # and a live one does what it says: peekmax 8k refuses a longer request head at once
    r = prod.dep.request("/index.html", headers={"X-Pad": "a" * 9000})
    assert r.status in (400, 431), r.status
    assert prod.dep.request("/index.html").backend == "be2"


def test_be_reload_applies_each_live_option_and_reports_each_restart_option(prod):
    from tcpha.config import BE_SETTINGS, load_be_config
    from tcpha.config.settings import LIVE, RESTART
    from tcpha.lab.demo import be_config_text
    prod.start()
    be2 = prod.dep.be_procs["be2"]
    conf = prod.dep.dir / "tcphabe-be2.conf"
    log_path = prod.lab.log_path("be2", "tcpha-be")
    old = load_be_config(str(conf))
    subnet = prod.lab.ip("be2").rsplit(".", 1)[0]
    changed = {   # every option of tcphabe.conf but the TLS files (tests/be/test_reload.py)
        "raddr": f"{subnet}.240", "uaddr": f"{subnet}.241", "vaddr": f"{subnet}.242", "port": 667,
        "maxclients": 10, "redirectaddr": "127.0.0.2", "redirectport": 8081, "appsource": "local", "appproxy": "v1",
        "relay": "auto", "dregister": 1,
        "feaddr": prod.lab.ip("fe"), "feport": 81, "rule": "jpg$", "registerretry": 1, "interface": "eth9",
        "unixpath": str(prod.lab.workdir / "be2.sock"), "authkey": str(_other_key(prod)),
        "tlsports": "443 8443", "sessiontimeout": 60, "rundir": str(prod.lab.workdir / "run-be2-2"),
        "usefuse": 0, "logfile": str(prod.lab.workdir / "be2-2.log"), "dbglevel": 4, "metrics": 9122, "grace": 5,
        "relay": "auto" if old.relay != "auto" else "splice", "tunnel": "vxlan",
    }
    conf.write_text(be_config_text(prod.lab, "be2", str(prod.dep.key), **changed))
    new = load_be_config(str(conf))
    # the TLS files and the session cache's (TLS) settings: tests/be/test_reload.py, tests/tls
    skip = {"tlscert", "tlskey", "sessioncache", "sessionkeys", "sessioncachecafile", "sessioncachecert",
            "sessioncachekey", "sessioncachecheckhost"}
    assert {s.name for s in BE_SETTINGS} - skip == set(changed)
    assert all(getattr(old, s.attr) != getattr(new, s.attr) for s in BE_SETTINGS if s.name not in skip)
    os.kill(be2.pid, signal.SIGHUP)
    # the new logfile is live: the reload's own line is written there
    new_log = prod.lab.workdir / "be2-2.log"
    assert wait_until(lambda: "reloaded " in new_log.read_text(errors="replace"), 15), \
        log_path.read_text(errors="replace")[-2000:]
    text = log_path.read_text(errors="replace") + new_log.read_text(errors="replace")
    restart_line = _lines_with(text, "needs a restart; the running value")[-1]
    assert _named(restart_line, "reload: ", " changed:") == {s.name for s in BE_SETTINGS if s.reload == RESTART}
    live_line = _lines_with(text, "reloaded ")[-1]
    assert _named(live_line, f"reloaded {conf}: ") == \
        {s.attr for s in BE_SETTINGS if s.reload == LIVE and s.name not in skip}

    def wrong() -> list[str]:
        in_force = prod.ctl_json("settings", rundir=prod.be_rundirs["be2"])
        assert set(in_force) == {s.name for s in BE_SETTINGS}
        return _check_in_force("be", BE_SETTINGS, in_force, old, new, skip=skip)

    _settle(wrong)
    text = prod.ctl("get", "settings", rundir=prod.be_rundirs["be2"])
    assert text.returncode == 0 and "\nmaxclients = 10\n" in text.stdout and "\nport = 666\n" in text.stdout
    assert be2.poll() is None
