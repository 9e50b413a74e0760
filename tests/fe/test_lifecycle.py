"""The front end's process life cycle as an operator meets it: the control socket
through a seamless upgrade, workers left by a killed arbiter, a restart while they finish, and a stop
that does not wait for flows whose back end is dead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tcpha.cli.ctl import socket_for
from tcpha.runtime.ctlsock import request
from tests.deployment import fe_workers
from tests.support import running, wait_until

pytestmark = pytest.mark.netns

CLIP = "video/clip.mp4"


def start_download(prod):
    """A download handed off to be2 and left in flight (the client reads its first MiB, then waits)."""
    s = prod.dep.connect(timeout=30)
    s.sendall(f"GET /{CLIP} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    s.settimeout(30)
    data = b""
    while len(data) < 1 << 20:
        chunk = s.recv(65536)
        assert chunk, "the download ended early"
        data += chunk
    return s, data


def read_to_end(s, data: bytes) -> bytes:
    while chunk := s.recv(1 << 20):
        data += chunk
    return data


def test_control_socket_answers_throughout_a_seamless_upgrade(prod):
    """tcpha-ctl finds a front end that answers at every moment of an upgrade: the predecessor until the
    successor holds the listening sockets, the successor from then on; never "no control socket"."""
    prod.start(fe={"grace": 20, "peektimeout": 20, "startservers": 3})
    old = prod.dep.fe_proc
    slow = prod.dep.connect(timeout=30)              # keeps the predecessor dispatching for a while
    slow.sendall(b"GET /index.html HTTP/1.1\r\n")     # half a request head
    answers: list[tuple[float, int]] = []
    failures: list[tuple[float, str]] = []
    done = threading.Event()

    def poll() -> None:                              # what an operator's script does, as fast as it can
        while not done.is_set():
            try:
                pid = request(socket_for(prod.fe_rundir), {"op": "read", "path": "status"}, timeout=5)["data"]["pid"]
                answers.append((time.monotonic(), pid))
            except Exception as e:
                failures.append((time.monotonic(), f"{type(e).__name__}: {e}"))
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        assert wait_until(lambda: any(r["state"] == "reading" for r in prod.ctl_json("conn")), 10)
        poller.start()
        assert wait_until(lambda: answers, 5, "the poller's first answer")
        conf = prod.dep.dir / "tcphafe.conf"
        new = prod.lab.spawn("fe", prod.dep.python("tcpha.fe", "-c", str(conf)), name="tcpha-fe-new", timeout=15)
        log_new = prod.lab.log_path("fe", "tcpha-fe-new")
        assert wait_until(lambda: "took over the listening sockets" in log_new.read_text(), 15)
        slow.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        slow.settimeout(10)
        assert read_to_end(slow, b"").startswith(b"HTTP/1.1 200")
        assert old.wait(30) == 0
        gone_at = time.monotonic()
        # the successor mounts the control directory once the predecessor has left
        assert wait_until(lambda: f"control directory {prod.fe_rundir} (" in log_new.read_text(), 15)
        n = len(answers)
        assert wait_until(lambda: len(answers) > n + 20, 10)
    finally:
        done.set()
        slow.close()
        if poller.is_alive():
            poller.join(10)
    assert failures == [], failures[:5]
    pids = [pid for _, pid in answers]
    assert pids[0] == old.pid and pids[-1] == new.pid
    assert all(pid == new.pid for t, pid in answers if t > gone_at)
    print(f"\ncontrol socket through an upgrade: {len(answers)} answers, {len(failures)} failures")
    prod.lab.stop(new, grace=15)


def test_workers_of_a_killed_arbiter_stop_at_once_and_a_new_front_end_starts_meanwhile(prod):
    """SIGTERM, then SIGKILL 0.5 s later (systemd's stop timeout with KillMode=process): the workers do
    not wait `grace` (120 s) for the handed-off download (the kernel steers it), let go of the listening sockets
    and the control socket at once, and a front end started while one of them still finishes a client
    starts (no takeover from the dead one) and adopts the kernel state."""
    prod.start(fe={"grace": 120, "peektimeout": 60, "startservers": 3})
    arbiter = prod.dep.fe_proc
    expected = prod.dep.origins["be2"].expected(CLIP)
    s, data = start_download(prod)
    slow = prod.dep.connect(timeout=30)
    try:
        slow.sendall(b"GET /index.html HTTP/1.1\r\n")          # half a request head: a worker reads it
        assert wait_until(lambda: any(r["state"] == "reading" for r in prod.ctl_json("conn")), 10)
        workers = fe_workers(prod)
        assert len(workers) == 3
        arbiter.send_signal(signal.SIGTERM)
        time.sleep(0.5)                                         # the operator's (or systemd's) patience
        arbiter.send_signal(signal.SIGKILL)
        arbiter.wait(10)

        # Nothing answers on the dead front end's control socket, and nothing keeps it connectable.
        with pytest.raises(ConnectionRefusedError):
            request(socket_for(prod.fe_rundir), {"op": "list"}, timeout=3)
        # The workers that dispatch nothing are gone at once, not after grace (120 s)...
        assert wait_until(lambda: len(running(workers)) <= 1, 15,
                          "the workers of the killed arbiter to stop"), running(workers)
        leftover = running(workers)
        assert len(leftover) == 1, "no worker is finishing the half-read request: this test proves nothing"

        # ...and a new front end starts while the last one still finishes its client.
        new = prod.start_fe(grace=120, peektimeout=60, startservers=3)
        assert running(leftover) == leftover
        new_log = prod.fe_log()
        assert "cannot start" not in new_log and "adopted" in new_log
        assert prod.ctl_json("status")["pid"] == new.pid
        assert prod.dep.request("/index.html").status == 200

        # the leftover worker serves its client, then leaves
        slow.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        slow.settimeout(15)
        assert read_to_end(slow, b"").startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: not running(leftover), 15, "the last worker of the killed arbiter to stop")
        # the download, handed off by the killed front end, arrives whole
        data = read_to_end(s, data)
    finally:
        s.close()
        slow.close()
    assert data.split(b"\r\n\r\n", 1)[1] == expected


def test_start_after_a_dead_front_end_whose_control_socket_is_still_held(prod):
    """A control socket whose listener outlives the front end that made it (held by a process it left)
    is no predecessor: the new front end starts at once instead of waiting for an answer
    ("cannot start: timed out")."""
    path = socket_for(prod.fe_rundir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The listener is made by a process that exits at once; its child keeps the descriptor.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, socket, time\n"
         "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
         f"s.bind({path!r}); s.listen(8)\n"
         "pid = os.fork()\n"
         "if pid == 0:\n"
         "    os.setsid(); os.close(1); time.sleep(120); os._exit(0)\n"
         "print(pid)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, _ = holder.communicate(timeout=20)
    child = int(out.strip())
    try:
        assert running([child]) == [child]
        with pytest.raises(TimeoutError):                 # connectable, but nobody answers
            request(path, {"op": "list"}, timeout=1)
        prod.start(fe={"grace": 5})
        log = prod.fe_log()
        assert "cannot start" not in log
        assert f"its tcpha-fe (pid {holder.pid}) is gone" in log
        assert prod.ctl_json("status")["pid"] == prod.dep.fe_proc.pid
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("startservers", [1, 3])
def test_stop_does_not_wait_for_flows_whose_back_end_is_dead(prod, startservers):
    """A flow steered to a back end that was killed never reports its end: unload does not wait `grace`
    (60 s) for it, while the kernel state is still removed cleanly."""
    prod.start(fe={"grace": 60, "startservers": startservers})
    s, _ = start_download(prod)
    try:
        os.kill(prod.dep.be_procs["be2"].pid, signal.SIGKILL)
        prod.dep.be_procs["be2"].wait(10)
        assert prod.fe_echo("sys/unload", "1").returncode == 0
        assert prod.wait_fe_exit(20) == 0, "the front end waited for the dead back end's flow"
    finally:
        s.close()
    assert "belong to back ends that are down: not waited for" in prod.fe_log()
    vip = prod.lab.topology.vip
    assert not any(a.startswith(vip + "/") for a in prod.lab.addresses("fe"))
