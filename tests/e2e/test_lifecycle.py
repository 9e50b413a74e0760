"""Front-end life cycle and fallbacks: kill -9 mid-download, restart adopting the kernel state, clean stop,
refusal and back-end loss falling through to the next back end, the same-host SCM_RIGHTS path."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

import pytest

from tcpha.lab.demo import be_config_text
from tcpha.lab.deploy import fe_steering
from tcpha.lab.http import start_http
from tests.support import child_pids, running, wait_until

pytestmark = pytest.mark.netns

BIG = "video/clip.mp4"


def steering_installed(dep) -> bool:
    """The FE's steering table (nft table tcpha_fe, or the tc program: the kind the daemon chose) is there."""
    return bool(fe_steering(dep.lab, dep.vip, "installed"))


def fe_has_vip(dep) -> bool:
    return any(a.startswith(dep.vip + "/") for a in dep.lab.addresses("fe"))


def start_download(dep, path: str):
    s = dep.connect(timeout=30)
    s.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 256 * 1024)
    s.sendall(f"GET /{path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(65536)
        assert chunk, "connection closed before the response head"
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return s, hashlib.sha256(rest), len(rest)


def read_some(s, digest, got: int, n: int) -> int:
    target = got + n
    while got < target:
        b = s.recv(65536)
        assert b, "download ended early"
        digest.update(b)
        got += len(b)
    return got


def read_rest(s, digest, got: int) -> int:
    while True:
        b = s.recv(1 << 20)
        if not b:
            return got
        digest.update(b)
        got += len(b)


def test_kill9_mid_download_restart_adopts_and_stop_cleans_up(fresh):
    dep = fresh
    lab = dep.lab
    dep.start()
    assert fe_has_vip(dep) and steering_installed(dep)

    s, digest, got = start_download(dep, BIG)
    try:
        got = read_some(s, digest, got, 2 << 20)
        os.kill(dep.fe_proc.pid, signal.SIGKILL)           # the whole front end, no clean-up
        dep.fe_proc.wait(10)
        # the kernel state outlives the process: the flow is steered in the kernel
        assert fe_has_vip(dep) and steering_installed(dep)
        got = read_some(s, digest, got, 4 << 20)

        # a new front end adopts the table instead of replacing it: the download still runs
        dep.start_fe()
        assert "adopted" in lab.log_path("fe", "tcpha-fe").read_text()
        assert dep.request("/img/logo.jpg").backend == "be1"
        got = read_rest(s, digest, got)
    finally:
        s.close()
    assert got == dep.files[BIG]
    assert digest.hexdigest() == dep.origins["be2"].sha256(BIG)

    # a clean stop removes the VIP and the nft table
    rc = dep.stop_fe()
    assert rc == 0
    assert not fe_has_vip(dep)
    assert not steering_installed(dep)
    # no tc qdisc or filter left behind either (steering = bpf attaches a clsact qdisc)
    assert "clsact" not in dep.lab.run("fe", ["tc", "qdisc", "show"], capture_output=True, text=True).stdout


def test_refusal_and_lost_back_end_fall_through_to_the_next(fresh):
    dep = fresh
    lab = dep.lab
    be1, be2 = lab.ip("be1"), lab.ip("be2")
    dep.start(fe={"rules": [f"{be1} jpg$", f"{be2} jpg$", f"{be1} ^/only-be1", f"{be2} ^/(?!only-be1)"]})
    assert dep.request("/img/logo.jpg").backend == "be1"

    # be1's application is down: tcpha-be on be1 refuses (it cannot relay), the FE takes the
    # connection back and hands it to be2
    dep.origins["be1"].stop()
    r = dep.request("/img/logo.jpg")
    assert (r.status, r.backend) == (200, "be2")
    assert r.body == dep.origins["be2"].expected("img/logo.jpg")
    assert "refused" in lab.log_path("be1", "tcpha-be").read_text()

    # tcpha-be on be1 is gone altogether: its control connections drop, be2 takes over
    lab.stop(dep.be_procs.pop("be1"))
    r = dep.request("/img/logo.jpg")
    assert (r.status, r.backend) == (200, "be2")
    # a URI only be1 may take, with be1 gone: 503 from the front end
    r = dep.request("/only-be1")
    assert r.status == 503 and r.headers.get("server") == "tcpha-fe"

    # be1 comes back (application and daemon): the front end reconnects by itself and uses it again
    dep.origins["be1"] = start_http(lab, "be1", port=8080, files=dep.files, name="http8080b")
    dep.start_backend("be1")
    deadline = time.monotonic() + 15
    while dep.request("/img/logo.jpg").backend != "be1":
        assert time.monotonic() < deadline, "the front end did not reconnect to be1"
        time.sleep(0.1)


def test_same_host_back_end_gets_the_socket_over_scm_rights(fresh):
    dep = fresh
    lab = dep.lab
    path = str(dep.dir / "be.sock")
    origin = start_http(lab, "fe", port=8080, files={"a.bin": 70_000})
    dep.start_backend("fe", unixpath=path)
    dep.start_fe(servers=[f"unix:{path}"], rules=[f"unix:{path} ^/"], dbglevel=4)
    r = dep.request("/a.bin")
    assert (r.status, r.backend) == (200, "fe")
    assert r.body == origin.expected("a.bin")
    # keep-alive on the passed socket, then more connections
    for _ in range(20):
        assert dep.request("/whoami").body == b"fe\n"
    log = lab.log_path("fe", "tcpha-fe").read_text()
    assert f"-> unix:{path}" in log
    assert steering_installed(dep)
    # no flow was steered: the passed sockets never left this host
    assert fe_steering(lab, dep.vip, "entries") == 0


def test_arbiter_workers_share_the_listener_and_a_killed_worker_is_replaced(fresh):
    dep = fresh
    dep.start(fe={"startservers": 3, "maxspareservers": 3})

    def workers() -> set[int]:
        return set(child_pids(dep.fe_proc.pid))

    wait_until(lambda: len(workers()) >= 3, 10, "three workers", interval=0.05)
    before = workers()
    assert len(before) == 3
    for _ in range(30):
        r = dep.request("/img/logo.jpg")
        assert (r.status, r.backend) == (200, "be1")
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in workers() and len(workers()) >= 3, 10,
               "the killed worker replaced", interval=0.05)
    after = workers()
    assert victim not in after and len(after) == 3
    assert "exited (signal SIGKILL); starting a new one" in dep.lab.log_path("fe", "tcpha-fe").read_text()
    # every worker still hands off (and the replacement's control connections are up)
    for _ in range(60):
        r = dep.request("/index.html")
        assert (r.status, r.backend) == (200, "be2")
    assert dep.stop_fe() == 0
    assert not fe_has_vip(dep)


def test_local_node_serves_what_no_back_end_takes(fresh):
    dep = fresh
    lab = dep.lab
    fe_ip = lab.ip("fe")
    origin = start_http(lab, "fe", port=8080, files={"api/status.json": 300})
    dep.start(fe={"redirectaddr": fe_ip, "redirectport": 8080,
                  "rules": [f"{lab.ip('be1')} jpg$", f"local ^/api/"]})
    assert dep.request("/img/logo.jpg").backend == "be1"
    r = dep.request("/api/status.json")                 # a rule naming the local node
    assert (r.status, r.backend) == (200, "fe") and r.body == origin.expected("api/status.json")
    r = dep.request("/whoami")                          # no rule matches: the local node, not 503
    assert (r.status, r.body) == (200, b"fe\n")
    # the local node down: a request only it could take gets 503
    origin.stop()
    assert dep.request("/whoami").status == 503


def _start_be1_daemon(dep, pidfile) -> None:
    """tcpha-be on be1 in daemon mode (-d) with a pidfile; the launcher returns at once."""
    conf = dep.dir / "tcphabe-be1.conf"
    conf.write_text(be_config_text(dep.lab, "be1", str(dep.key)))
    r = dep.lab.run("be1", [sys.executable, "-m", "tcpha.be", "-c", str(conf), "-d", "--pidfile", str(pidfile)],
                    capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_daemon_mode_writes_the_pidfile_and_stops_on_sigterm(fresh):
    dep = fresh
    lab = dep.lab
    pidfile = dep.dir / "be1.pid"
    _start_be1_daemon(dep, pidfile)
    wait_until(pidfile.exists, 10, "the pidfile", interval=0.05)
    pid = int(pidfile.read_text())
    try:
        lab.wait_tcp("client", lab.ip("be1"), 666, timeout=10)   # the detached daemon serves
        assert any(a.startswith(dep.vip + "/") for a in lab.addresses("be1"))
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists(), 10, "the pidfile removed", interval=0.05)
    assert not pidfile.exists()
    assert not any(a.startswith(dep.vip + "/") for a in lab.addresses("be1"))


def test_sigterm_during_start_up_is_a_clean_stop(fresh):
    """systemd may stop a service it has just started: a SIGTERM as soon as the pidfile is there (before
    the VIP, the ARP filter and the event loop) still ends in a clean stop, not in the default action's
    death with the pidfile and kernel state left behind."""
    dep = fresh
    pidfile = dep.dir / "be1-early.pid"
    _start_be1_daemon(dep, pidfile)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the pidfile", interval=0.001)
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not running([pid]), 30, "the daemon gone")
    assert not pidfile.exists(), "the daemon died without removing its pidfile (killed by the signal)"
    assert not any(a.startswith(dep.vip + "/") for a in dep.lab.addresses("be1")), "the VIP was left on be1"


@pytest.mark.parametrize("when,workers", [("pidfile", 1), ("vip", 1), ("vip", 3)])
def test_front_end_sigterm_during_start_up_is_a_clean_stop(fresh, when, workers):
    """The same for tcpha-fe: a SIGTERM as soon as its pidfile is there, or as soon as its VIP is (before
    the steering table, the control plane and the workers), ends in a clean stop (exit 0) with the
    pidfile, the VIP and the steering table removed: with one worker in the process, and with an arbiter."""
    dep = fresh
    dep.start_origins()
    for host in dep.backends:
        dep.start_backend(host)
    conf = dep.write_fe_config(startservers=workers)
    pidfile = dep.dir / "fe-early.pid"
    proc = dep.lab.spawn("fe", dep.python("tcpha.fe", "-c", str(conf), "--pidfile", str(pidfile)), name="tcpha-fe",
                         ready_path=pidfile if when == "pidfile" else None, timeout=15)
    if when == "vip":
        wait_until(lambda: fe_has_vip(dep), 15, "the VIP on the front end", interval=0.001)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, dep.lab.log_tail("fe", "tcpha-fe")
    assert not pidfile.exists(), "the front end died without removing its pidfile (killed by the signal)"
    assert not fe_has_vip(dep), "the VIP was left on the front end"
    assert not steering_installed(dep), "the steering table was left on the front end"


def test_sigterm_waits_for_handed_off_flows_before_removing_kernel_state(fresh):
    dep = fresh
    lab = dep.lab
    dep.start(fe={"grace": 30})
    s, digest, got = start_download(dep, BIG)
    try:
        got = read_some(s, digest, got, 1 << 20)
        dep.fe_proc.send_signal(signal.SIGTERM)
        # no longer accepting, but the handed-off download keeps its steering entry and the VIP
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                dep.request("/whoami", timeout=1)
            except OSError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the front end still accepts after SIGTERM")
        assert dep.fe_proc.poll() is None
        assert fe_has_vip(dep) and steering_installed(dep)
        got = read_rest(s, digest, got)
    finally:
        s.close()
    assert got == dep.files[BIG] and digest.hexdigest() == dep.origins["be2"].sha256(BIG)
    # the flow is over: the back end reports it, the front end removes its state and exits well
    # before the 30 s grace period
    t0 = time.monotonic()
    assert dep.fe_proc.wait(15) == 0
    assert time.monotonic() - t0 < 15
    assert not fe_has_vip(dep) and not steering_installed(dep)
