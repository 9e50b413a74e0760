"""Control files of the running daemons: reads show the value in force, writes take
effect, invalid writes are refused to the writer; tcpha-ctl does the same over the control socket."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support import wait_until

pytestmark = pytest.mark.netns


def test_fe_sys_files_dbglevel_dtcinterval_and_refusals(prod):
    prod.start(fe={"dtcinterval": 2, "dbglevel": 3})
    assert prod.fe_cat("sys/dtcinterval") == "2\n"
    assert prod.fe_cat("sys/dbglevel") == "3\n"
    # a valid write is in force at once, and visible through the socket too
    r = prod.fe_echo("sys/dtcinterval", "5")
    assert r.returncode == 0, r.stderr
    assert prod.fe_cat("sys/dtcinterval") == "5\n"
    assert prod.ctl_json("sys/dtcinterval") == 5
    # invalid writes: the writer sees the error (EINVAL), the value stays
    for bad in ("-1", "abc", "99999"):
        r = prod.fe_echo("sys/dtcinterval", bad)
        assert r.returncode != 0 and "Invalid argument" in r.stderr, (bad, r)
    assert prod.fe_cat("sys/dtcinterval") == "5\n"
    r = prod.fe_echo("sys/dbglevel", "7")
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    # read-only files refuse writes
    r = prod.fe_echo("conn", "x")
    assert r.returncode != 0
    # dbglevel 3: no per-handoff line; dbglevel 4 (written at run time): one line per handoff with the rule
    assert prod.dep.request("/img/logo.jpg").status == 200
    assert " rule " not in prod.fe_log()
    assert prod.fe_echo("sys/dbglevel", "4").returncode == 0
    assert prod.fe_cat("sys/dbglevel") == "4\n"
    r = prod.dep.request("/img/logo.jpg")
    assert r.status == 200
    line = wait_until(lambda: [l for l in prod.fe_log().splitlines() if " rule uri:jpg$ handed off in " in l], 5)
    assert line and f"-> {prod.lab.ip('be1')}:666 rule uri:jpg$" in line[-1]


def test_tcpha_ctl_plain_and_json(prod):
    prod.start()
    r = prod.ctl("ls")
    assert r.returncode == 0
    for path in ("sys/unload", "sys/dbglevel", "sys/dtcinterval", "conn", "status"):
        assert path in r.stdout
    r = prod.ctl("set", "sys/dbglevel", "5")
    assert r.returncode == 0, r.stderr
    assert prod.ctl("get", "sys/dbglevel").stdout == "5\n"
    r = prod.ctl("set", "sys/dbglevel", "9")
    assert r.returncode == 1 and "out of range" in r.stderr
    assert prod.ctl_json("sys/dbglevel") == 5
    status = prod.ctl_json("status")
    assert status["pid"] == prod.dep.fe_proc.pid
    names = {b["name"]: b for b in status["backends"]}
    assert names[f"{prod.lab.ip('be1')}:666"]["status"] == "up"
    r = prod.ctl("--json", "get", "nosuchfile")
    assert r.returncode == 1


def test_drain_keeps_long_downloads_and_conn_shows_them_leaving(prod):
    be2 = f"{prod.lab.ip('be2')}:666"
    prod.start(fe={"rules": prod.rules("{be1} jpg$", "{be2} .*", "{be1} .*"), "grace": 5})
    assert prod.dep.request("/index.html").backend == "be2"
    # long downloads through be2, read slowly
    results: dict[int, bytes | Exception] = {}
    expected = prod.dep.origins["be2"].expected("video/clip.mp4")

    def slow_download(i: int) -> None:
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
                time.sleep(0.004)           # ~16 MB/s at most: the download lasts a few seconds
            s.close()
            results[i] = b"".join(chunks)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=slow_download, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    rows = wait_until(lambda: [r for r in prod.ctl_json("conn") if r["backend"] == be2], 5)
    assert len(rows) >= 3
    # drain be2: no new handoffs (the fallback rule sends new requests to be1) ...
    assert prod.fe_echo(f"backends/{be2}/drain", "1").returncode == 0
    assert prod.fe_cat(f"backends/{be2}/status").startswith("drain")
    for _ in range(5):
        assert prod.dep.request("/index.html").backend == "be1"
    # ... the running downloads are shown draining and leave the table as they end
    states = {r["state"] for r in prod.ctl_json("conn") if r["backend"] == be2}
    assert states == {"draining"}, states
    for t in threads:
        t.join(60)
    for i in range(3):
        body = results[i]
        assert not isinstance(body, Exception), body
        assert body.split(b"\r\n\r\n", 1)[1] == expected
    assert wait_until(lambda: not [r for r in prod.ctl_json("conn") if r["backend"] == be2], 10)
    # weight 0 is the same as drain; weight back and undrain: be2 takes new connections again
    assert prod.fe_echo(f"backends/{be2}/drain", "0").returncode == 0
    assert prod.fe_echo(f"backends/{be2}/weight", "0").returncode == 0
    assert prod.dep.request("/index.html").backend == "be1"
    assert prod.fe_echo(f"backends/{be2}/weight", "3").returncode == 0
    assert prod.fe_cat(f"backends/{be2}/weight") == "3\n"
    assert wait_until(lambda: prod.dep.request("/index.html").backend == "be2", 5)


def test_unload_stops_the_front_end_cleanly(prod):
    prod.start(fe={"grace": 3})
    assert prod.dep.request("/index.html").status == 200
    r = prod.fe_echo("sys/unload", "1")
    assert r.returncode == 0, r.stderr
    assert prod.wait_fe_exit(15) == 0
    assert "kernel state removed" in prod.fe_log()
    # the VIP is gone from the front end
    vip = prod.lab.topology.vip
    assert not any(a.startswith(vip + "/") for a in prod.lab.addresses("fe")), prod.lab.addresses("fe")


def test_be_control_files(prod):
    prod.start()
    be1 = prod.dep.be_procs["be1"]
    rundir = prod.be_rundirs["be1"]
    r = prod.sh(be1.pid, f"cat {rundir}/sys/dbglevel; echo 5 > {rundir}/sys/dbglevel; cat {rundir}/sys/dbglevel")
    assert r.stdout == "3\n5\n", r
    r = prod.sh(be1.pid, f"echo 8 > {rundir}/sys/dbglevel")
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    # a download in progress (be2 serves /video/) shows in that back end's conn with bytes moving
    rundir2 = prod.be_rundirs["be2"]
    s = prod.dep.connect(timeout=30)
    s.sendall(b"GET /video/clip.mp4 HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(65536)
    client = f"{prod.lab.ip('client')}:{s.getsockname()[1]}"
    rows = wait_until(lambda: [r for r in prod.ctl_json("conn", rundir=rundir2) if r["client"] == client], 5)
    s.close()
    assert rows and rows[0]["bytes_in"] > 0 and rows[0]["state"] == "relaying"
    r = prod.sh(be1.pid, f"echo 1 > {rundir}/sys/unload")
    assert r.returncode == 0
    assert be1.wait(15) == 0


def test_logfile_gets_one_line_per_handoff_at_dbglevel_4(prod):
    logfile = prod.lab.workdir / "tcphafe.log"
    prod.start(fe={"logfile": str(logfile), "dbglevel": 4})
    r = prod.dep.request("/index.html")
    assert r.status == 200
    lines = wait_until(lambda: [l for l in logfile.read_text().splitlines() if "handed off in" in l], 5)
    assert lines and f"-> {prod.lab.ip('be2')}:666 rule uri:.* handed off in " in lines[-1]
    assert f"{prod.lab.ip('client')}:" in lines[-1]
    # down to 3 at run time: no more per-connection lines
    assert prod.ctl("set", "sys/dbglevel", "3").returncode == 0
    n = len(lines)
    assert prod.dep.request("/index.html").status == 200
    time.sleep(0.3)
    assert len([l for l in logfile.read_text().splitlines() if "handed off in" in l]) == n
