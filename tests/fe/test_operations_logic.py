"""Sans-I/O parts of the operations features: health damping, the spare-worker policy, control-file parsing, the control
socket's answers, metrics exposition; and the two control-directory mechanisms on a scratch path."""

from __future__ import annotations

import asyncio
import errno
import json
import os

import pytest
from hypothesis import given, strategies as st

from tcpha.fe.health import BackendHealth, HealthTable, http_status_ok
from tcpha.fe.pool import SparePolicy
from tcpha.metrics import LATENCY_BUCKETS, WorkerMetrics, exposition, parse_exposition
from tcpha.runtime.ctlsock import answer
from tcpha.runtime.tree import ControlFile, ControlTree, WriteRefused, bool_setter, float_setter, int_setter
from tests.support import wait_until


# -- health -------------------------------------------------------------------------------------

def test_fall_takes_out_after_consecutive_failures_only():
    be = BackendHealth("b", rise=2, fall=3)
    assert be.record(False, "x") is None and be.up
    assert be.record(False, "x") is None and be.up
    assert be.record(True) is None                      # a success resets the failure run
    assert be.record(False) is None and be.record(False) is None
    assert be.record(False, "refused") == "down"
    assert not be.up and not be.accepts_new and be.last_error == "refused" and be.status == "down"


def test_rise_damps_a_flapping_back_end():
    be = BackendHealth("b", rise=2, fall=1)
    assert be.record(False) == "down"
    for _ in range(10):                                 # good, bad, good, bad...: never back
        assert be.record(True) is None
        assert be.record(False) is None
    assert not be.up
    assert be.record(True) is None
    assert be.record(True) == "up" and be.accepts_new


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_state_follows_the_last_run_of_results(results, rise, fall):
    be = BackendHealth("b", rise=rise, fall=fall)
    for r in results:
        be.record(r)
    # whatever happened before, `fall` failures in a row mean down and `rise` successes mean up
    run = 0
    for r in reversed(results):
        if r != (results[-1] if results else True):
            break
        run += 1
    if results and not results[-1] and run >= fall:
        assert not be.up
    if results and results[-1] and run >= rise:
        assert be.up


def test_weight_and_drain_stop_new_connections_only():
    t = HealthTable(rise=1, fall=1)
    a = t.add("a", weight=1)
    t.add("b", weight=0)
    assert t.available() == {"a": True, "b": False}
    a.drain = True
    assert t.available()["a"] is False and a.status == "drain" and a.up
    with pytest.raises(ValueError):
        a.set_weight(257)


def test_http_check_status_lines():
    assert http_status_ok(b"HTTP/1.1 200 OK\r\n")[0]
    assert http_status_ok(b"HTTP/1.0 302 Found\r\n")[0]
    ok, why = http_status_ok(b"HTTP/1.1 503 Service Unavailable\r\n", "h", 80, "/hc")
    assert not ok and "503" in why
    assert not http_status_ok(b"SSH-2.0-OpenSSH\r\n")[0]


# -- worker pool --------------------------------------------------------------------------------

def test_spare_policy():
    p = SparePolicy(minspare=2, maxspare=4)
    assert p.decide([1, 1, 0]) == 1                    # 1 idle < 2: start one
    assert p.decide([0, 0, 1]) == 0
    assert p.decide([0, 0, 0, 0, 0, 3]) == -1          # 5 idle > 4: stop one
    assert p.decide([0]) == 1                          # min 2 idle
    assert SparePolicy(0, 0).decide([0]) == 0          # never below one worker
    assert SparePolicy(5, 9, max_workers=3).decide([1, 1, 1]) == 0


# -- control files ------------------------------------------------------------------------------

def make_tree():
    state = {"n": 3, "f": 2.0, "b": False}
    t = ControlTree()
    t.add(ControlFile("sys/n", lambda: str(state["n"]), int_setter(lambda v: state.__setitem__("n", v), 0, 6, "n"),
                      data=lambda: state["n"]))
    t.add(ControlFile("sys/f", lambda: f"{state['f']:g}", float_setter(lambda v: state.__setitem__("f", v), 0, 60, "f")))
    t.add(ControlFile("sys/b", lambda: str(int(state["b"])), bool_setter(lambda v: state.__setitem__("b", v), "b")))
    t.add(ControlFile("conn", lambda: "a\nb"))
    return t, state


@pytest.mark.parametrize("path,text,ok", [
    ("sys/n", "5\n", "5"), ("sys/n", " 0 ", "0"), ("sys/n", "7", False), ("sys/n", "-1", False),
    ("sys/n", "1.5", False), ("sys/n", "", False), ("sys/f", "0.5", "0.5"), ("sys/f", "nan", False),
    ("sys/f", "61", False), ("sys/b", "1", "1"), ("sys/b", "yes", "1"), ("sys/b", "2", False),
])
def test_setters(path, text, ok):
    t, _ = make_tree()
    before = t.read(path)
    if ok:
        t.write(path, text)
        assert t.read(path).strip() == ok and ok != before.strip()   # the value written is the one read
    else:
        with pytest.raises(WriteRefused):
            t.write(path, text)
        assert t.read(path) == before


def test_tree_layout_and_read_only():
    t, _ = make_tree()
    assert t.listdir("") == ["conn", "sys"]
    assert t.listdir("sys") == ["b", "f", "n"]
    assert t.is_dir("sys") and not t.is_dir("conn") and t.is_file("conn")
    with pytest.raises(PermissionError):
        t.write("conn", "x")
    with pytest.raises(FileNotFoundError):
        t.read("nope")
    t.remove_prefix("sys")
    assert t.listdir("") == ["conn"]


def test_control_socket_answers():
    t, state = make_tree()

    async def go():
        assert (await answer(t, {"op": "read", "path": "sys/n"})) == {"ok": True, "text": "3\n", "data": 3}
        assert (await answer(t, {"op": "write", "path": "sys/n", "value": "4"})) == {"ok": True}
        bad = await answer(t, {"op": "write", "path": "sys/n", "value": "40"})
        assert not bad["ok"] and "out of range" in bad["error"]
        assert not (await answer(t, {"op": "write", "path": "conn", "value": "1"}))["ok"]
        assert not (await answer(t, {"op": "read", "path": 5}))["ok"]
        assert not (await answer(t, {"op": "frobnicate"}))["ok"]
        files = (await answer(t, {"op": "list"}))["files"]
        assert {f["path"] for f in files} == {"sys/n", "sys/f", "sys/b", "conn"}
    asyncio.run(go())
    assert state["n"] == 4


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_merge_and_exposition_round_trip():
    a, b = WorkerMetrics(), WorkerMetrics()
    a.handoff("10.0.0.1:666", "uri:jpg$", "handed_off", 0.0004)
    a.handoff("10.0.0.1:666", "uri:jpg$", "handed_off", 0.003)
    b.handoff("10.0.0.1:666", "uri:jpg$", "handed_off", 5.0)       # beyond the last bucket: +Inf only
    b.handoff("10.0.0.2:666", 'host:^a"b', "refused")
    b.control_error("10.0.0.2:666")
    b.answered[503] = 2
    m = WorkerMetrics.merge([json.loads(json.dumps(a.to_dict())), b.to_dict()])
    text = exposition(m, health=[{"name": "10.0.0.1:666", "up": True, "status": "up", "weight": 1, "failures": 0}],
                      active_flows=7, dispatching=1, workers=2)
    s = parse_exposition(text)
    assert s[("tcpha_fe_handoffs_total", (("backend", "10.0.0.1:666"), ("rule", "uri:jpg$"),
                                          ("outcome", "handed_off")))] == 3
    assert s[("tcpha_fe_handoffs_total", (("backend", "10.0.0.2:666"), ("rule", 'host:^a\\"b'),
                                          ("outcome", "refused")))] == 1
    assert s[("tcpha_fe_handoff_latency_seconds_bucket", (("le", "0.0005"),))] == 1
    assert s[("tcpha_fe_handoff_latency_seconds_bucket", (("le", f"{LATENCY_BUCKETS[-1]:g}"),))] == 2
    assert s[("tcpha_fe_handoff_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert s[("tcpha_fe_handoff_latency_seconds_count", ())] == 3
    assert s[("tcpha_fe_active_flows", ())] == 7
    assert s[("tcpha_fe_control_errors_total", (("backend", "10.0.0.2:666"),))] == 1
    assert s[("tcpha_fe_responses_total", (("status", "503"),))] == 2
    # every family has HELP and TYPE lines
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"tcpha_fe_handoffs_total", "tcpha_fe_backend_up", "tcpha_fe_handoff_latency_seconds"} <= names


# -- the two mechanisms, for real, on a scratch directory (root) ----------------------------------

needs_root = pytest.mark.root


@needs_root
def test_fuse_mount_refuses_invalid_writes_with_einval(tmp_path):
    from tcpha.runtime.fusefs import FuseMount, fuse_available
    if fuse_available() is not None:
        pytest.fail(f"FUSE not available: {fuse_available()} (scripts/install-deps installs fuse3 and pyfuse3)")
    t, state = make_tree()
    mnt = str(tmp_path / "ctl")
    m = FuseMount(t, mnt, links={"ctl.sock": "/nonexistent.sock"})
    m.start()
    try:
        assert sorted(os.listdir(mnt)) == ["conn", "ctl.sock", "sys"]
        assert os.readlink(os.path.join(mnt, "ctl.sock")) == "/nonexistent.sock"
        with open(os.path.join(mnt, "sys/n")) as f:
            assert f.read() == "3\n"
        with open(os.path.join(mnt, "sys/n"), "w") as f:
            f.write("6\n")
        assert state["n"] == 6
        with pytest.raises(OSError) as e:
            with open(os.path.join(mnt, "sys/n"), "w") as f:
                f.write("9\n")
        assert e.value.errno == errno.EINVAL
        assert state["n"] == 6
        with pytest.raises(PermissionError):
            open(os.path.join(mnt, "conn"), "w")
        state["n"] = 2                                  # a change made by the daemon shows at the next read
        with open(os.path.join(mnt, "sys/n")) as f:
            assert f.read() == "2\n"
    finally:
        m.stop()
    assert not os.path.ismount(mnt)


@needs_root
def test_mirror_fallback_reverts_invalid_writes(tmp_path):
    from tcpha.runtime.mirror import MirrorDirectory
    t, state = make_tree()
    d = str(tmp_path / "ctl")
    m = MirrorDirectory(t, d)
    m.start()
    try:
        path = os.path.join(d, "sys/n")
        assert open(path).read() == "3\n"
        with open(path, "w") as f:
            f.write("5\n")
        assert wait_until(lambda: state["n"] == 5, 3)
        with open(path, "w") as f:
            f.write("77\n")
        assert wait_until(lambda: open(path).read() == "5\n", 3)   # reverted to the value in force
        assert state["n"] == 5
        state["n"] = 1
        assert wait_until(lambda: open(path).read() == "1\n", 3)   # refreshed every second
    finally:
        m.stop()


@needs_root
def test_control_plane_socket_and_tcpha_ctl(tmp_path, capsys):
    from tcpha.cli.ctl import main as ctl_main
    from tcpha.runtime.plane import ControlPlane
    t, state = make_tree()
    rundir = str(tmp_path / "fe")
    plane = ControlPlane(rundir=rundir, tree=t, name="tcpha-test")
    plane.start()
    try:
        assert plane.mode == "fuse"
        assert ctl_main(["--rundir", rundir, "get", "sys/n"]) == 0
        assert capsys.readouterr().out == "3\n"
        assert ctl_main(["--rundir", rundir, "set", "sys/n", "4"]) == 0
        assert state["n"] == 4
        assert ctl_main(["--rundir", rundir, "set", "sys/n", "x"]) == 1
        assert "not a whole number" in capsys.readouterr().err
        assert ctl_main(["--rundir", rundir, "--json", "get", "sys/n"]) == 0
        assert json.loads(capsys.readouterr().out) == 4
        # the mount's ctl.sock symlink leads to the same socket
        assert ctl_main(["--socket", os.path.join(rundir, "ctl.sock"), "get", "sys/b"]) == 0
        assert capsys.readouterr().out == "0\n"
        # a second daemon on the same rundir runs without a directory and socket; the first keeps them
        second = ControlPlane(rundir=rundir, tree=t, name="tcpha-test2")
        second.start()
        try:
            assert second.mode == "none"
            assert second.run(asyncio.sleep(0, result=42)) == 42      # its loop runs (health, metrics)
        finally:
            second.stop()
        assert ctl_main(["--rundir", rundir, "get", "sys/n"]) == 0
        assert capsys.readouterr().out == "4\n"
    finally:
        plane.stop()
    assert not os.path.ismount(rundir)
    assert ctl_main(["--rundir", rundir, "get", "sys/n"]) == 2


# -- the worker's ledger ------------------------------------------------------------------------

def test_ledger_rule_states_and_pruning():
    from tcpha.config import compile_rule
    from tcpha.fe.ledger import ConnectionLedger
    from tcpha.fe.rules import RequestFacts

    from tcpha.control.handoff import FeConnection, FeEvent

    class D:                                        # what the ledger reads of a Dispatch
        def __init__(self, port, uri):
            self.peer, self.lport, self.t0 = ("10.0.0.9", port), 80, 0.0
            self.facts = RequestFacts(uri=uri, host=b"x", sni=None)
            self.handoff, self.backend, self.peeked = FeConnection(), None, 40
            self.candidates, self.moves = ["a:1"], 0      # routed: both URIs' rules name a:1

    rules = [compile_rule("a:1", "uri", "jpg$"), compile_rule("b:1", "uri", "^/api/"), compile_rule("a:1", "uri", ".*")]
    ledger = ConnectionLedger(rules, flow_timeout=100)
    d1, d2 = D(1000, b"/x.jpg"), D(1001, b"/index.html")
    ledger.started(d1)
    assert [r["state"] for r in ledger.conn_rows()] == ["reading"]
    for event in (FeEvent.HEAD_READ, FeEvent.FREEZE, FeEvent.HANDOFF_SENT):   # the state machine's state
        d1.handoff.handle(event)
    assert [r["state"] for r in ledger.conn_rows()] == ["handing-off"]
    ledger.handed_off(d1, "a:1")
    ledger.ended(d1)
    ledger.handed_off(d2, "a:1")                    # the fallback rule '.*' is the one that matched
    rows = {r["client"]: r for r in ledger.conn_rows()}
    assert rows["10.0.0.9:1000"]["rule"] == "uri:jpg$" and rows["10.0.0.9:1001"]["rule"] == "uri:.*"
    assert {r["state"] for r in rows.values()} == {"handed-off"}
    ledger.gate = {"a:1": False}
    assert {r["state"] for r in ledger.conn_rows()} == {"draining"}
    assert not ledger.accepts("a:1") and ledger.accepts("b:1")
    ledger.flow_closed("10.0.0.9", 1000, 80)
    assert [r["client"] for r in ledger.conn_rows()] == ["10.0.0.9:1001"]
    ledger.flows[("10.0.0.9", 1001, 80)].since -= 200   # older than the steering timeout: forgotten
    ledger.prune()
    assert ledger.conn_rows() == []
    m = ledger.metrics.to_dict()
    assert ["a:1", "uri:jpg$", "handed_off", 1] in m["handoffs"] and m["latency_count"] == 2


_PLANE_SCRIPT = """
import sys, time
from tcpha.runtime.plane import ControlPlane
from tcpha.runtime.tree import ControlFile, ControlTree
t = ControlTree()
t.add(ControlFile("sys/n", lambda: "7"))
plane = ControlPlane(rundir=sys.argv[1], tree=t, name="tcpha-test")
plane.start()
print(plane.mode, flush=True)
time.sleep(600)
"""


@needs_root
def test_stale_mount_of_a_killed_daemon_is_detached_at_the_next_start(tmp_path, caplog):
    """docs/operations.md: a FUSE mount left by a daemon killed with kill -9 (ENOTCONN) is detached at
    the next start, which then serves its own control files there."""
    import logging
    import subprocess
    import sys

    from tcpha.runtime.fusefs import detach_stale_mount, unmount
    from tcpha.runtime.plane import ControlPlane
    rundir = str(tmp_path / "fe")
    dead = subprocess.Popen([sys.executable, "-c", _PLANE_SCRIPT, rundir], stdout=subprocess.PIPE, text=True)
    plane = None
    try:
        assert dead.stdout.readline().strip() == "fuse"
        assert os.path.ismount(rundir)
        dead.kill()
        dead.wait(10)
        with pytest.raises(OSError) as e:                  # the mount outlived its daemon: stale
            os.stat(rundir)
        assert e.value.errno == errno.ENOTCONN
        t, state = make_tree()
        plane = ControlPlane(rundir=rundir, tree=t, name="tcpha-test")
        with caplog.at_level(logging.WARNING, logger="tcpha"):
            plane.start()
        assert plane.mode == "fuse"
        assert "removed the stale mount of a daemon that died" in caplog.text
        with open(os.path.join(rundir, "sys/n")) as f:
            assert f.read() == "3\n"                       # the new daemon's tree, not the dead one's
    finally:
        if dead.poll() is None:
            dead.kill()
        if plane is not None:
            plane.stop()
        detach_stale_mount(rundir)                         # whatever is left mounted, stale or not
        for _ in range(3):
            if not os.path.ismount(rundir):
                break
            unmount(rundir)


# -- the arbiter's links to its workers ---------------------------------------------------------

def test_a_gate_change_is_in_force_when_the_write_returns(tmp_path):
    """docs/operations.md: a write of ``backends/NAME/drain`` or ``weight`` that has returned is in force for
    the next connection. The control plane's push of the new gate returns only once each worker has
    answered it (a worker answers after applying it); from the plane's own loop (the health prober) it is
    scheduled instead, and must not wait on itself."""
    import socket
    import threading

    from tcpha.fe.workerlinks import WorkerLinks
    from tcpha.runtime.plane import ControlPlane

    links = WorkerLinks()
    links.plane = ControlPlane(rundir=str(tmp_path / "fe"), tree=ControlTree(), name="tcpha-test", use_fuse=False)
    links.health = HealthTable(2, 3)
    links.health.add("be1:80", 1)
    links.registry, links.dbglevel = None, 3
    ours, worker_end = socket.socketpair()
    applied: list[dict] = []                       # the gates the fake worker applied, in order

    def fake_worker() -> None:
        with worker_end, worker_end.makefile("rwb") as f:
            try:
                for line in f:
                    req = json.loads(line)
                    if req["op"] == "gate":
                        applied.append(req["gate"])
                    f.write(json.dumps({"id": req["id"], "ok": True}).encode() + b"\n")
                    f.flush()
            except ConnectionError:
                pass                    # the plane closed its end of the link: the test is over

    worker = threading.Thread(target=fake_worker, daemon=True)
    worker.start()
    links.plane.start()
    try:
        links.attach_worker(4242, ours)
        assert wait_until(lambda: applied == [{"be1:80": True}], 5)          # the gate sent at attach
        for drain in (True, False, True, False, True):
            links.health.get("be1:80").drain = drain
            links.push_gate()                                                 # as a control-file write does
            assert applied[-1] == {"be1:80": not drain}, applied
        # from the plane's loop: scheduled, returns at once; the worker has it soon after
        links.health.get("be1:80").drain = False

        async def from_the_loop() -> None:
            links.push_gate()
        links.plane.run(from_the_loop(), timeout=2.0)
        assert wait_until(lambda: applied[-1] == {"be1:80": True}, 5)
    finally:
        links.close_links()
        links.plane.stop()
        worker.join(5)


def test_a_worker_forked_before_a_reload_and_linked_after_it_is_reloaded(tmp_path):
    """A reload asks the workers linked at that moment. A worker forked with the config of before (the pool
    started it just then) and linked after that ask ran the old rules for good (seen under load: a request
    routed by the old rules after the reload). At its link it is asked to reload; one forked with the
    config in force is not."""
    import socket
    import threading
    from types import SimpleNamespace

    from tcpha.fe.workerlinks import WorkerLinks
    from tcpha.runtime.plane import ControlPlane

    links = WorkerLinks()
    links.plane = ControlPlane(rundir=str(tmp_path / "fe"), tree=ControlTree(), name="tcpha-test", use_fuse=False)
    links.health = HealthTable(2, 3)
    links.registry, links.dbglevel = None, 3
    old, new = object(), object()
    links.fe = SimpleNamespace(config=new)                  # the reload has replaced the arbiter's config
    links.reload_args = {"path": "/etc/tcpha/tcphafe.conf", "keep": ["port"]}
    asked: dict[int, list[dict]] = {1: [], 2: []}
    ends, threads = [], []

    def fake_worker(n: int, end: socket.socket) -> None:
        with end, end.makefile("rwb") as f:
            try:
                for line in f:
                    req = json.loads(line)
                    asked[n].append(req)
                    f.write(json.dumps({"id": req["id"], "ok": True}).encode() + b"\n")
                    f.flush()
            except ConnectionError:
                pass

    links.plane.start()
    try:
        for n, forked_with in ((1, old), (2, new)):
            ours, theirs = socket.socketpair()
            ends.append(theirs)
            threads.append(threading.Thread(target=fake_worker, args=(n, theirs), daemon=True))
            threads[-1].start()
            links.attach_worker(4240 + n, ours, forked_with)
        assert wait_until(lambda: all(any(r["op"] == "dbglevel" for r in asked[n]) for n in (1, 2)), 5), asked
        assert [r["op"] for r in asked[1]][:2] == ["reload", "gate"], asked[1]
        assert {k: asked[1][0][k] for k in ("path", "keep")} == links.reload_args
        assert "reload" not in [r["op"] for r in asked[2]], asked[2]
    finally:
        links.close_links()
        links.plane.stop()
        for t in threads:
            t.join(5)


def test_a_listening_port_still_held_is_tried_again_before_giving_up():
    """As nginx: a port in use (a worker of a front end killed with kill -9 still closing its listeners)
    is tried again a few times before the front end gives up with one clear line."""
    import socket
    import threading

    from tcpha.fe.arbiter import listen_sockets

    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    released = threading.Timer(0.15, holder.close)       # the other process lets go meanwhile
    released.start()
    try:
        [(s, got)] = listen_sockets("127.0.0.1", [port], 16, bind_tries=20, bind_wait=0.05)
        s.close()
        assert got == port
    finally:
        released.join()
    holder = socket.create_server(("127.0.0.1", port))   # held for good: a clear error after the tries
    try:
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listen_sockets("127.0.0.1", [port], 16, bind_tries=3, bind_wait=0.01)
    finally:
        holder.close()
