"""dc_client (the local agent) as a real process: uid mapping, pipelining, down/[2] answers,
reconnection, failover, -idle, -pidfile, -sock*, -user, -killable, -daemon, option errors."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import sys
import time

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dctools_support import (agent_has_upstream, fake_servers, procs, read_responses,  # noqa: E402,F401
                             request, sockdir, unix_connect, wait_until)

from tcpha.distcache.client import PERSISTENT, DistcacheClient, DistcacheError  # noqa: E402
from tcpha.distcache.codec import Op  # noqa: E402


def test_uids_are_mapped_for_several_clients(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    procs.agent(f"UNIX:{sockdir}/agent", up.address)
    a = unix_connect(sockdir / "agent")
    b = unix_connect(sockdir / "agent")
    # Both clients use the same uids; each must get its own answers back with its own uids.
    a.sendall(request(7, Op.ADD, b"\x00\x00\x27\x10\x00\x00\x00\x05aaaaaDATA-A"))
    b.sendall(request(7, Op.ADD, b"\x00\x00\x27\x10\x00\x00\x00\x05bbbbbDATA-B"))
    assert [(m.uid, m.op, m.payload) for m in read_responses(a, 1)] == [(7, Op.ADD, b"\x00")]
    assert [(m.uid, m.op, m.payload) for m in read_responses(b, 1)] == [(7, Op.ADD, b"\x00")]
    a.sendall(request(9, Op.GET, b"bbbbb") + request(10, Op.GET, b"aaaaa"))
    b.sendall(request(9, Op.GET, b"aaaaa"))
    assert [(m.uid, m.payload) for m in read_responses(a, 2)] == [(9, b"DATA-B"), (10, b"DATA-A")]
    assert [(m.uid, m.payload) for m in read_responses(b, 1)] == [(9, b"DATA-A")]
    # The server saw the agent's own uid space: five distinct uids for five requests.
    uids = [m.uid for m in up.requests if m.payload != b"agent-probe"]
    assert len(uids) == 5 and len(set(uids)) == 5
    assert up.connections == 1              # one upstream connection for everyone


def test_many_requests_in_flight_answered_in_order(procs, sockdir):
    procs.server(f"UNIX:{sockdir}/srv", "-sessions", "1000")
    procs.agent(f"UNIX:{sockdir}/agent", f"UNIX:{sockdir}/srv")
    s = unix_connect(sockdir / "agent")
    n = 300
    batch = b"".join(request(1000 + i, Op.ADD, (60000).to_bytes(4, "big") + (8).to_bytes(4, "big")
                             + b"sess%04d" % i + b"data-%d" % i) for i in range(n))
    batch += b"".join(request(5000 + i, Op.GET, b"sess%04d" % i) for i in range(n))
    s.sendall(batch)
    got = read_responses(s, 2 * n)
    assert [m.uid for m in got] == [1000 + i for i in range(n)] + [5000 + i for i in range(n)]
    assert all(m.payload == b"\x00" for m in got[:n])
    assert [m.payload for m in got[n:]] == [b"data-%d" % i for i in range(n)]


def test_empty_answer_at_once_while_server_unreachable(procs, sockdir):
    procs.agent(f"UNIX:{sockdir}/agent", f"UNIX:{sockdir}/nothing", args=("-retry", "600000"), upstream=False)
    s = unix_connect(sockdir / "agent")
    s.sendall(request(42, Op.GET, b"abcdef"))
    (m,) = read_responses(s, 1)        # an answer at all: the retry period (600 s) was not waited for
    assert (m.uid, m.op, m.payload) == (42, Op.GET, b"")
    # The C client counts it as a failed transaction; ours raises.
    with pytest.raises(DistcacheError, match="empty reply"):
        DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=2).has(b"abcdef")


def _probe_only(conn_index, msg):
    """Answers only the readiness probe (procs.agent's), stays silent for everything else."""
    return b"\x01" if msg.payload == b"agent-probe" else None


def test_outstanding_requests_get_2_when_the_server_dies(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up", policy=_probe_only)     # never answers real requests
    procs.agent(f"UNIX:{sockdir}/agent", up.address, args=("-retry", "600000"))
    s = unix_connect(sockdir / "agent")
    s.sendall(request(1, Op.GET, b"abcdef") + request(2, Op.HAVE, b"abcdef"))
    wait_until(lambda: len([m for m in up.requests if m.payload != b"agent-probe"]) == 2, 5,
               "the requests to reach the server")
    up.close()
    got = read_responses(s, 2)
    assert [(m.uid, m.op, m.payload) for m in got] == [(1, Op.GET, b"\x02"), (2, Op.HAVE, b"\x02")]
    # And now the server is gone: an immediate empty answer.
    s.sendall(request(3, Op.GET, b"abcdef"))
    assert read_responses(s, 1)[0].payload == b""


def test_silent_upstream_is_dropped_after_upstream_timeout(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up", policy=lambda i, m: None)     # accepts, never answers
    procs.agent(f"UNIX:{sockdir}/agent", up.address, args=("-upstream-timeout", "300", "-retry", "60000"),
                upstream=False)
    wait_until(lambda: up.connections == 1, 10, "the agent's upstream connection")
    s = unix_connect(sockdir / "agent")
    took = []

    def attempt():
        # An empty answer means the agent's side of the connection is not up yet: ask again.
        t0 = time.monotonic()
        s.sendall(request(3, Op.GET, b"abcdef"))
        (m,) = read_responses(s, 1, timeout=5)
        took.append(time.monotonic() - t0)
        return m if m.payload else None
    m = wait_until(attempt, 10, "a non-empty answer")
    assert (m.uid, m.payload) == (3, b"\x02")
    assert took[-1] > 0.25             # not before -upstream-timeout (300 ms); read_responses bounds it above


def test_reconnects_every_retry_period(procs, sockdir):
    agent = f"UNIX:{sockdir}/agent"
    procs.agent(agent, f"UNIX:{sockdir}/srv", args=("-retry", "100"), upstream=False)
    c = DistcacheClient(agent, 0, timeout=2)
    with pytest.raises(DistcacheError):
        c.has(b"abcdef")
    procs.server(f"UNIX:{sockdir}/srv")

    def works():
        try:
            return c.add(b"abcdef", b"data!", 10000)
        except DistcacheError:
            return False
    wait_until(works, 5, "the agent to reconnect")
    assert c.get(b"abcdef") == b"data!"


def test_server_restart_is_survived(procs, sockdir):
    agent = f"UNIX:{sockdir}/agent"
    srv = procs.server(f"UNIX:{sockdir}/srv")
    procs.agent(agent, f"UNIX:{sockdir}/srv", args=("-retry", "50"))
    c = DistcacheClient(agent, PERSISTENT, timeout=2)
    assert c.add(b"abcdef", b"data!", 10000)
    srv.stop()
    procs.server(f"UNIX:{sockdir}/srv")

    def works():
        try:
            return c.add(b"ghijkl", b"data!", 10000)
        except DistcacheError:
            return False
    wait_until(works, 5, "the agent to reconnect")


def test_failover_between_servers(procs, sockdir):
    agent = f"UNIX:{sockdir}/agent"
    s2 = procs.server(f"UNIX:{sockdir}/s2")
    # The first server is not there: the agent goes to the second at once.
    procs.agent(agent, f"UNIX:{sockdir}/s1", f"UNIX:{sockdir}/s2", args=("-retry", "60000"))
    c = DistcacheClient(agent, 0, timeout=2)

    def add(sid):
        try:
            return c.add(sid, b"data!", 10000)
        except DistcacheError:
            return False
    wait_until(lambda: add(b"on-second"), 5, "the agent to use the second server")
    direct2 = DistcacheClient(f"UNIX:{sockdir}/s2", 0, timeout=2)
    assert direct2.get(b"on-second") == b"data!"
    # Now the second dies and the first appears: failover back without waiting -retry (60 s).
    procs.server(f"UNIX:{sockdir}/s1")
    s2.stop()
    wait_until(lambda: add(b"on-first"), 5, "the agent to fail over to the first server")
    assert DistcacheClient(f"UNIX:{sockdir}/s1", 0, timeout=2).get(b"on-first") == b"data!"


def test_answers_for_departed_clients_are_dropped(procs, fake_servers, sockdir):
    held = []

    def slow(i, m):
        if m.payload == b"slowslow":
            held.append(m)
            return None
        return b"\x01"
    up = fake_servers(sockdir / "up", policy=slow)
    procs.agent(f"UNIX:{sockdir}/agent", up.address)
    a = unix_connect(sockdir / "agent")
    a.sendall(request(5, Op.GET, b"slowslow"))
    wait_until(lambda: held, 5, "the slow request at the server")
    a.close()
    time.sleep(0.05)
    # The server now answers the departed client's request; the agent must drop it.
    from tcpha.distcache.codec import Message, encode_message
    up.conns[0].sendall(encode_message(Message(True, held[0].uid, Op.GET, b"late answer")))
    b = unix_connect(sockdir / "agent")
    b.sendall(request(5, Op.HAVE, b"abcdef"))
    (m,) = read_responses(b, 1)
    assert (m.uid, m.op, m.payload) == (5, Op.HAVE, b"\x01")


def test_corrupt_client_is_closed_others_served(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    procs.agent(f"UNIX:{sockdir}/agent", up.address)
    bad = unix_connect(sockdir / "agent")
    bad.sendall(b"\x00\x12\x00\x00" + b"\x00" * 20)       # wrong version
    bad.settimeout(5)
    assert bad.recv(100) == b""
    good = DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=2)
    assert good.has(b"abcdef") is False


def test_idle_clients_are_dropped(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    procs.agent(f"UNIX:{sockdir}/agent", up.address, args=("-idle", "200"))
    s = unix_connect(sockdir / "agent")
    s.sendall(request(1, Op.HAVE, b"abcdef"))
    read_responses(s, 1)
    t0 = time.monotonic()
    s.settimeout(5)
    assert s.recv(100) == b""              # closed by the agent
    assert time.monotonic() - t0 > 0.15    # not before -idle (200 ms); the socket timeout bounds it above


def test_without_idle_connections_stay(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    procs.agent(f"UNIX:{sockdir}/agent", up.address)
    s = unix_connect(sockdir / "agent")
    s.settimeout(0.6)
    with pytest.raises(TimeoutError):
        s.recv(100)
    s.sendall(request(1, Op.HAVE, b"abcdef"))
    assert read_responses(s, 1)[0].payload == b"\x01"


def test_pidfile_sockperms_sockgroup(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1)  # a group other than root's
    p = procs.agent(f"UNIX:{sockdir}/agent", up.address,
                    args=("-pidfile", str(sockdir / "pid"), "-sockperms", "640", "-sockgroup", group.gr_name))
    assert (sockdir / "pid").read_text() == str(p.pid)       # no newline
    st = os.stat(sockdir / "agent")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == group.gr_gid


def test_bad_sockowner_only_warns(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    p = procs.agent(f"UNIX:{sockdir}/agent", up.address, args=("-sockowner", "no-such-user-xyz"))
    assert "Warning" in p.stderr()
    assert DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=2).has(b"abcdef") is False


@pytest.mark.root
def test_user_switch_after_listening(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    os.chmod(sockdir, 0o755)
    os.chmod(sockdir / "up", 0o777)
    p = procs.agent(f"UNIX:{sockdir}/agent", up.address, args=("-user", "nobody"))
    nobody = pwd.getpwnam("nobody")
    wait_until(lambda: psutil.Process(p.pid).uids().real == nobody.pw_uid, 5, "the switch to nobody")
    assert os.stat(sockdir / "agent").st_uid == 0        # made by root, before the switch
    assert DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=2).has(b"abcdef") is False


def test_killable_exits_cleanly_on_sigusr1(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    p = procs.agent(f"UNIX:{sockdir}/agent", up.address, args=("-killable",))
    p.p.send_signal(signal.SIGUSR1)
    assert p.wait(10) == 0
    assert not (sockdir / "agent").exists()


def test_sigusr1_without_killable_is_ignored(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    p = procs.agent(f"UNIX:{sockdir}/agent", up.address)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
        p.p.send_signal(sig)
    assert DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=5).has(b"abcdef") is False
    assert p.p.poll() is None and (sockdir / "agent").exists()


def test_waits_for_a_slow_server_by_default():
    """As the original: no -upstream-timeout unless asked for (the extension stays available)."""
    from tcpha.cli.dc_client import parse_args
    assert parse_args(["-server", "UNIX:/x"]).upstream_timeout == 0
    assert parse_args(["-server", "UNIX:/x", "-upstream-timeout", "300"]).upstream_timeout == 300


def test_daemon_detaches(procs, fake_servers, sockdir):
    up = fake_servers(sockdir / "up")
    r = procs.run("tcpha.cli.dc_client", "-daemon", "-listen", f"UNIX:{sockdir}/agent", "-server", up.address,
                  "-pidfile", str(sockdir / "pid"), timeout=20)
    assert r.returncode == 0
    pid = int(wait_until(lambda: (sockdir / "pid").exists() and (sockdir / "pid").read_text(), 10, "pidfile"))
    procs.extra_pids.append(pid)
    proc = psutil.Process(pid)
    assert proc.cwd() == "/"
    assert os.getsid(pid) != os.getsid(0)          # its own session, no controlling terminal
    assert proc.ppid() != os.getpid()
    wait_until(lambda: agent_has_upstream(f"UNIX:{sockdir}/agent"), 10, "the daemon to serve")
    assert DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=2).has(b"abcdef") is False
    os.kill(pid, signal.SIGTERM)
    proc.wait(10)


@pytest.mark.parametrize("args, message", [
    (["-listen", "UNIX:/tmp/x"], "Error, no server specified!"),
    (["-server", "UNIX:/tmp/x", "-retry", "0"], "Error, -retry given an invalid argument"),
    (["-server", "UNIX:/tmp/x", "-retry", "3600001"], "Error, -retry given an invalid argument"),
    (["-server", "UNIX:/tmp/x", "-retry", "12x"], "Error, -retry given an invalid argument"),
    (["-server", "UNIX:/tmp/x", "-idle", "3600001"], "Error, -idle given an invalid argument"),
    (["-server"], "Error, -server requires an argument"),
    (["-connect"], "Error, -connect requires an argument"),
    (["-bogus"], 'Error, "-bogus" not recognised'),
    (["-server", "UNIX:/tmp/x", "-listen", "NOPE:1"], "Error, bad listen address"),
    (["-server", "NOPE:1", "-listen", "NOPE:1"], "Error, bad listen address"),     # checked first
    (["-server", "IP:nonexistent.invalid:1", "-listen", "UNIX:/tmp/x-dc-client-test"],
     "Error, internal initialisation problems"),
])
def test_option_errors(procs, args, message):
    r = procs.run("tcpha.cli.dc_client", *args)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == message
    assert "Traceback" not in r.stderr


def test_help(procs):
    r = procs.run("tcpha.cli.dc_client", "-h")
    assert r.returncode == 0
    assert "Usage: dc_client [options]" in r.stderr


def test_two_thousand_clients_at_once(procs, sockdir):
    import resource
    import socket as socketmod
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4200 and os.geteuid() == 0:
        hard = 4200                                  # root may raise its own hard limit
    assert hard >= 4200, "this test needs a descriptor limit of 4200 (run as root, as CI does)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4200), hard))
    procs.server(f"UNIX:{sockdir}/srv", "-sessions", "4000")
    procs.agent(f"UNIX:{sockdir}/agent", f"UNIX:{sockdir}/srv")
    socks = []
    try:
        for i in range(2000):
            s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
            s.connect(str(sockdir / "agent"))      # blocking: waits while the backlog is full
            s.settimeout(10)
            socks.append(s)
        for i, s in enumerate(socks):
            s.sendall(request(i, Op.ADD, (60000).to_bytes(4, "big") + (8).to_bytes(4, "big") + b"c%07d" % i + b"data-data"))
        for i, s in enumerate(socks):
            (m,) = read_responses(s, 1, timeout=10)
            assert (m.uid, m.payload) == (i, b"\x00")
    finally:
        for s in socks:
            s.close()
    c = DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=5)
    assert c.get(b"c0001999") == b"data-data"


def test_client_that_never_reads_is_bounded(procs, sockdir):
    """A client pipelining GETs of a 30 kB session without reading its answers: the agent stops
    reading from it (its memory stays bounded) and keeps serving everyone else."""
    procs.server(f"UNIX:{sockdir}/srv")
    agent = procs.agent(f"UNIX:{sockdir}/agent", f"UNIX:{sockdir}/srv")
    c = DistcacheClient(f"UNIX:{sockdir}/agent", 0, timeout=5)
    assert c.add(b"big-session", b"B" * 30000, 60000)
    hog = unix_connect(sockdir / "agent")
    hog.setblocking(False)
    req = request(1, Op.GET, b"big-session") * 100
    sent = 0
    for _ in range(3000):                  # up to 300,000 requests = 9 GB of answers
        try:
            sent += hog.send(req)
        except BlockingIOError:
            break
    assert sent < len(req) * 3000           # the agent stopped reading: our sends block
    rss = psutil.Process(agent.pid).memory_info().rss
    assert rss < 300 * 1024 * 1024, rss
    assert c.get(b"big-session") == b"B" * 30000
    hog.close()
