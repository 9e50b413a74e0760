"""Worker processes (point 6), reload and seamless upgrade under load (point 8), service integration (point 9)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from tests.deployment import Load, fe_workers
from tests.support import running, wait_until

pytestmark = pytest.mark.netns


def _resets_sent(prod, host: str) -> int:
    """Resets a host's namespace sent because a socket was closed with data unread (TcpExtTCPAbortOnClose)
    or data arrived after it was closed (TcpExtTCPAbortOnData)."""
    lines = prod.lab.run(host, ["cat", "/proc/net/netstat"], capture_output=True, text=True).stdout.splitlines()
    head, values = next((a.split(), b.split()) for a, b in zip(lines, lines[1:]) if a.startswith("TcpExt:")
                        and b.startswith("TcpExt:"))
    return sum(int(values[head.index(name)]) for name in ("TCPAbortOnClose", "TCPAbortOnData"))


def test_killed_worker_is_replaced_and_logged(prod):
    prod.start(fe={"startservers": 3, "minspareservers": 1, "maxspareservers": 5})
    before = fe_workers(prod)
    assert len(before) == 3
    load = Load(prod, "/index.html", threads=3).start()
    try:
        assert wait_until(lambda: load.ok > 30, 10)
        victim = before[1]
        os.kill(victim, signal.SIGKILL)
        # replaced (the spare-worker policy may also have started one more under this load)
        assert wait_until(lambda: victim not in fe_workers(prod) and len(fe_workers(prod)) >= 3
                          and set(fe_workers(prod)) - set(before), 10)
        n = load.ok
        assert wait_until(lambda: load.ok > n + 50, 10)
    finally:
        load.stop()
    assert f"(pid {victim}) exited (signal SIGKILL); starting a new one" in prod.fe_log()
    # every worker is linked to the control plane again
    assert wait_until(lambda: sorted(prod.ctl_json("status")["workers"]) == fe_workers(prod), 5)
    print(f"\nworker kill -9 under load: {len(load.failures)} failed of {load.count()} requests")


def test_surplus_idle_workers_are_stopped(prod):
    prod.start(fe={"startservers": 4, "minspareservers": 1, "maxspareservers": 2})
    assert wait_until(lambda: len(fe_workers(prod)) == 2, 10), fe_workers(prod)
    assert "surplus idle worker" in prod.fe_log()
    assert "> maxspareservers 2" in prod.fe_log()
    assert prod.dep.request("/index.html").status == 200


def _reload_under_load(prod, startservers: int):
    rules_before = prod.rules("{be1} jpg$", "{be2} .*")
    prod.start(fe={"startservers": startservers, "rules": rules_before})
    load = Load(prod, "/index.html", threads=4).start()
    try:
        assert wait_until(lambda: load.backends.get("be2", 0) > 30, 10)
        # the new file sends /index.html to be1 (a new first rule) and changes a timeout
        prod.dep.write_fe_config(rundir=prod.fe_rundir, dbglevel=3, startservers=startservers, peektimeout=3,
                                 rules=prod.rules("{be1} ^/index", "{be1} jpg$", "{be2} .*"))
        os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
        n = load.backends.get("be1", 0)
        assert wait_until(lambda: load.backends.get("be1", 0) > n + 30, 10), prod.fe_log()[-2000:]
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert wait_until(lambda: "reloaded" in prod.fe_log(), 5), prod.fe_log()
    assert prod.dep.fe_proc.poll() is None
    # a broken file is refused and the running configuration stays
    (prod.dep.dir / "tcphafe.conf").write_text((prod.dep.dir / "tcphafe.conf").read_text() + "bogus = 1\n")
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in prod.fe_log(), 5)
    assert prod.dep.request("/index.html").backend == "be1"
    return load


@pytest.mark.parametrize("startservers", [1, 3])
def test_sighup_reload_under_load_drops_nothing(prod, startservers):
    load = _reload_under_load(prod, startservers)
    print(f"\nreload (startservers={startservers}): {load.ok} requests, {len(load.failures)} failed")


@pytest.mark.parametrize("startservers", [1, 3])
def test_seamless_upgrade_under_load(prod, startservers):
    prod.start(fe={"grace": 5, "startservers": startservers})
    old = prod.dep.fe_proc
    resets = _resets_sent(prod, "fe")
    expected = prod.dep.origins["be2"].expected("video/clip.mp4")
    got: dict = {}

    def download() -> None:                      # a flow handed off by the old process
        try:
            s = prod.dep.connect(timeout=30)
            s.sendall(b"GET /video/clip.mp4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            s.settimeout(30)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                time.sleep(0.003)
            got["body"] = b"".join(chunks)
        except Exception as e:
            got["error"] = e

    t = threading.Thread(target=download)
    t.start()
    load = Load(prod, "/index.html", threads=4).start()
    try:
        assert wait_until(lambda: load.ok > 30, 10)
        conf = prod.dep.dir / "tcphafe.conf"
        new = prod.lab.spawn("fe", prod.dep.python("tcpha.fe", "-c", str(conf)), name="tcpha-fe-new", timeout=15)
        assert old.wait(20) == 0
        n = load.ok
        assert wait_until(lambda: load.ok > n + 50, 15)
        assert wait_until(lambda: prod.ctl_json("status")["pid"] == new.pid, 10)
    finally:
        load.stop()
        t.join(60)
    assert load.failures == [], load.failures[:5]
    assert "error" not in got, got
    assert got["body"].split(b"\r\n\r\n", 1)[1] == expected
    # The old workers stop at once while FlowClosed reports still stream in: each half-closes its control
    # connections and reads on until the back end closes too (ControlLink.close). Closing with reports
    # unread would make the kernel reset the connection, and the reset can destroy a last Steered. The
    # old arbiter's health probes close the same way (a Pong or a FlowClosed on its way is read).
    assert _resets_sent(prod, "fe") == resets
    be_logs = "".join(prod.lab.log_path(h, "tcpha-be").read_text() for h in prod.dep.backends)
    # A back end drops a restored connection "before Steered" only for a handoff the front end gave up
    # on (handofftimeout on a loaded machine: it kept the client and said so); any other is a handoff
    # the closing worker cut short.
    unsteered = re.findall(r"handoff (\d+) from \S+: control connection \w+ before Steered", be_logs)
    fe_log = prod.fe_log()
    cut = [x for x in unsteered if f"timed-out handoff {x}" not in fe_log]
    assert cut == [], f"handoffs dropped before Steered that the front end did not give up on: {cut}"
    log_new = prod.lab.log_path("fe", "tcpha-fe-new").read_text()
    assert "took over the listening sockets" in log_new
    assert "handed over to a new tcpha-fe" in prod.fe_log()
    # after the handover the old arbiter never replaces a worker: one would accept on the sockets the
    # successor owns now, and wait for the successor's flows before exiting
    assert "starting a new one" not in prod.fe_log().split("handed to a new tcpha-fe", 1)[1]
    vip = prod.lab.topology.vip
    assert any(a.startswith(vip + "/") for a in prod.lab.addresses("fe"))   # the old one left the VIP in place
    print(f"\nupgrade under load (startservers={startservers}): {load.ok} requests, {len(load.failures)} failed")
    prod.lab.stop(new, grace=15)


@pytest.mark.parametrize("startservers", [1, 3])
def test_upgrade_serves_at_once_while_the_predecessor_finishes(prod, startservers):
    """The successor accepts as soon as it holds the listening sockets, not once the predecessor has
    left: here the predecessor keeps dispatching a connection whose request has not come yet."""
    prod.start(fe={"grace": 20, "peektimeout": 20, "startservers": startservers})
    old = prod.dep.fe_proc
    slow = prod.dep.connect(timeout=30)           # the old front end reads it, waiting for the rest
    try:
        # Half a request head: accepted at once (a connection that has sent nothing is accepted only
        # after TCP_DEFER_ACCEPT's SYN-ACK retransmissions, about 3 s).
        slow.sendall(b"GET /index.html HTTP/1.1\r\n")
        assert wait_until(lambda: any(r["state"] == "reading" for r in prod.ctl_json("conn")), 15)
        conf = prod.dep.dir / "tcphafe.conf"
        new = prod.lab.spawn("fe", prod.dep.python("tcpha.fe", "-c", str(conf)), name="tcpha-fe-new", timeout=15)
        log_new = prod.lab.log_path("fe", "tcpha-fe-new")
        assert wait_until(lambda: "took over the listening sockets" in log_new.read_text(), 15)
        t0 = time.monotonic()
        r = prod.dep.request("/index.html", timeout=10)
        served_in = time.monotonic() - t0
        assert r.status == 200
        assert old.poll() is None, "the predecessor left early: this test proves nothing"
        assert served_in < 5, f"first request after the takeover took {served_in:.1f} s"
        # the predecessor's last connection is still served, then it leaves and the successor takes
        # over the control directory
        slow.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        slow.settimeout(10)
        data = b""
        while chunk := slow.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert old.wait(30) == 0
        assert wait_until(lambda: prod.ctl_json("status")["pid"] == new.pid, 15)
        assert "control directory" in log_new.read_text()
    finally:
        slow.close()
    prod.lab.stop(new, grace=15)


def test_daemon_pidfile_and_check_config(prod):
    prod.dep.start_origins()
    for h in prod.dep.backends:
        prod.start_backend(h)
    conf = prod.dep.write_fe_config(rundir=prod.fe_rundir)
    r = prod.lab.run("fe", prod.dep.python("tcpha.fe", "-c", str(conf), "--check-config"), capture_output=True,
                     text=True)
    assert r.returncode == 0 and "valid" in r.stdout
    pidfile = prod.lab.workdir / "fe.pid"
    r = prod.lab.run("fe", prod.dep.python("tcpha.fe", "-c", str(conf), "-d", "--pidfile", str(pidfile)),
                     capture_output=True, text=True, timeout=20)
    assert r.returncode == 0
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10))
    try:
        prod.dep.wait_fe_ready()
        assert prod.ctl_json("status")["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not running([pid]), 20)
    assert wait_until(lambda: not pidfile.exists(), 5)


def test_sd_notify_ready_reloading_stopping(prod, tmp_path):
    import socket
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(20)
    prod.dep.start_origins()
    for h in prod.dep.backends:
        prod.start_backend(h)
    conf = prod.dep.write_fe_config(rundir=prod.fe_rundir)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    p = prod.lab.spawn("fe", prod.dep.python("tcpha.fe", "-c", str(conf)), name="tcpha-fe", env=env, timeout=15)
    prod.dep.fe_proc = p
    try:
        states = []
        while "READY=1" not in states:
            states.append(s.recv(4096).decode())
        os.kill(p.pid, signal.SIGHUP)
        assert s.recv(4096).decode() == "RELOADING=1"
        assert s.recv(4096).decode() == "READY=1"
        os.kill(p.pid, signal.SIGTERM)
        assert s.recv(4096).decode() == "STOPPING=1"
        assert p.wait(20) == 0
    finally:
        s.close()


def test_clients_still_sending_their_head_do_not_count_against_maxclients(prod):
    """docs/operations.md, "Workers and limits": maxclients caps the handoffs in progress; connections
    still waiting for their request head do not count (else idle or slow clients would keep every new
    connection in the accept queue), so more than maxclients of them are read at once."""
    prod.start(fe={"maxclients": 2, "peektimeout": 5, "startservers": 1})
    socks = [prod.dep.connect(timeout=10) for _ in range(5)]
    try:
        for s in socks:
            s.sendall(b"GET /index.html HTTP/1.1\r\n")           # half a head: accepted (TCP_DEFER_ACCEPT)
        reading = lambda: [r for r in prod.ctl_json("conn") if r["state"] == "reading"]  # noqa: E731
        assert wait_until(lambda: len(reading()) == 5, 10)          # all five, though maxclients is 2
        for s in socks:
            s.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        for s in socks:
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in socks:
            s.settimeout(10)
            data = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
            assert data.startswith(b"HTTP/1.1 200"), data[:80]
    finally:
        for s in socks:
            s.close()


def test_silent_registered_back_end_is_removed(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.dep.start_origins()
    prod.start_backend("be1")
    prod.start_fe(ready="/img/logo.jpg", servers=[f"{prod.lab.ip('be1')} 666"], rules=prod.rules("{be1} jpg$"),
                  registerport=7000, dtcinterval=1)
    p = prod.start_backend("be2", dregister=1, feaddr=prod.lab.ip("fe"), feport=7000, rule="^/dyn/",
                           registerretry=0.5)
    present = lambda: [b for b in prod.ctl_json("status")["backends"] if b["name"] == be2]  # noqa: E731
    assert wait_until(present, 10)
    os.kill(p.pid, signal.SIGSTOP)                  # alive but silent: no Pong, no FIN
    try:
        t0 = time.monotonic()
        assert wait_until(lambda: not present(), 10)
        assert time.monotonic() - t0 <= 3 * 1 + 2.5
    finally:
        os.kill(p.pid, signal.SIGCONT)
    assert "silent for" in prod.fe_log()
    # it notices the loss and registers again
    assert wait_until(present, 15)


def test_spare_workers_are_started_when_workers_get_busy(prod):
    prod.start(fe={"startservers": 2, "minspareservers": 2, "maxspareservers": 4, "peektimeout": 6})
    assert len(fe_workers(prod)) == 2, prod.fe_log()[-3000:]
    # connections that send half a request head keep the worker that accepted them busy (reading)
    held = []
    try:
        for _ in range(6):
            s = prod.dep.connect(timeout=10)
            s.sendall(b"GET /index.html HTTP/1.1\r\n")
            held.append(s)
        assert wait_until(lambda: len(fe_workers(prod)) >= 3, 8), prod.fe_log()[-1500:]
        assert "(< minspareservers 2): starting worker" in prod.fe_log()
    finally:
        for s in held:
            s.close()
    assert prod.dep.request("/index.html").status == 200


def test_unload_waits_for_handed_off_flows_within_grace(prod):
    prod.start(fe={"grace": 20})
    expected = prod.dep.origins["be2"].expected("video/clip.mp4")
    s = prod.dep.connect(timeout=30)
    s.sendall(b"GET /video/clip.mp4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s.settimeout(30)
    data = s.recv(65536)
    assert prod.fe_echo("sys/unload", "1").returncode == 0
    t0 = time.monotonic()
    time.sleep(1.0)
    assert prod.dep.fe_proc.poll() is None              # still there: a handed-off flow is running
    while True:                                          # the download goes on to its end
        b = s.recv(65536)
        if not b:
            break
        data += b
        time.sleep(0.002)
    s.close()
    assert data.split(b"\r\n\r\n", 1)[1] == expected
    assert prod.wait_fe_exit(20) == 0
    assert time.monotonic() - t0 < 20                     # it left once the flow was gone, not at grace

