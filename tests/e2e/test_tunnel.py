"""Routed mode (`tunnel = vxlan`) end to end in the namespace lab: the back ends sit on another subnet than
the front end, behind a router namespace (tcpha.lab.routed), so that no frame can reach them by MAC; the
front end's steering program sends handed-off flows to them encapsulated, they hold the VIP on their
tunnel device and answer the client directly through the router. And `tunnel = ipip` on a kernel
without ipip: refused at start in one line."""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from tcpha.lab.demo import LabDeployment
from tcpha.lab.deploy import fe_steering
from tcpha.lab.routed import FAR_SUBNET, route_apart
from tcpha.steering.tunnel import tunnel_possible
from tcpha.lab.deploy import DataPath
from tests.support import up_lab, wait_until

pytestmark = pytest.mark.netns

BIG = "video/clip.mp4"          # 20 MiB


@pytest.fixture
def lab(run_prefix):
    """A lab of its own, not one per --datapaths path (tests/e2e/conftest.py): a tunnel needs the BPF
    steering program, which the tests below set (steering = auto picks it; nft is refused)."""
    yield from up_lab(run_prefix, DataPath(None, None))


@pytest.fixture
def routed(lab):
    """client and fe on the lab's subnet; be1, be2 and cache on FAR_SUBNET behind the router."""
    route_apart(lab, ["be1", "be2", "cache"])
    return LabDeployment(lab)


def start_tunnelled(dep: LabDeployment, kind: str = "vxlan", **fe) -> None:
    be1, be2 = dep.lab.ip("be1"), dep.lab.ip("be2")
    dep.start(fe={"rules": [f"{be1} jpg$", f"{be2} .*"], "tunnel": kind, "steering": "auto", **fe},
              be={"tunnel": kind})


def start_download(dep: LabDeployment, path: str):
    s = dep.connect()
    s.sendall(f"GET /{path} HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        assert b, "no answer"
        buf += b
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return s, hashlib.sha256(rest), len(rest)


def read(s, digest, got: int, until: int | None = None) -> int:
    while until is None or got < until:
        b = s.recv(1 << 20)
        if not b:
            assert until is None, "download ended early"
            return got
        digest.update(b)
        got += len(b)
    return got


def test_vxlan_routes_by_uri_to_back_ends_behind_a_router(routed):
    dep = routed
    lab = dep.lab
    assert lab.ip("be1").startswith(FAR_SUBNET.rsplit(".", 2)[0]) and lab.ip("fe").startswith("10.77.")
    start_tunnelled(dep, startservers=2)          # forked workers open the program and the device too
    for path, who in (("/img/logo.jpg", "be1"), ("/index.html", "be2"), ("/1m.bin", "be2")):
        r = dep.request(path)
        assert (r.status, r.backend) == (200, who), path
        assert r.body == dep.origins[who].expected(path.lstrip("/"))
    # the back ends hold the VIP on their tunnel device, not on lo; the front end's flows were steered
    # to their addresses (the steering entries name them)
    assert f"{dep.vip}/32@tcpha-vxlan" in lab.addresses("be1")
    assert not any(a.startswith(dep.vip) and a.endswith("@lo") for a in lab.addresses("be1"))
    s, digest, got = start_download(dep, "1m.bin")
    try:
        wait_until(lambda: lab.ip("be2") in fe_steering(lab, dep.vip, "forwarded", tunnel="vxlan").values(), timeout=5)
        got = read(s, digest, got)
    finally:
        s.close()
    assert got == dep.files["1m.bin"]


def test_vxlan_20mb_download_front_end_sends_under_1_percent_and_survives_kill9(routed):
    dep = routed
    lab = dep.lab
    start_tunnelled(dep)
    before = lab.counters("fe")
    s, digest, got = start_download(dep, BIG)
    try:
        got = read(s, digest, got, 4 << 20)
        os.kill(dep.fe_proc.pid, signal.SIGKILL)           # the front end dies mid-download
        dep.fe_proc.wait(10)
        got = read(s, digest, got)                         # the flow stays steered in the kernel
    finally:
        s.close()
    after = lab.counters("fe")
    assert got == dep.files[BIG]
    assert digest.hexdigest() == dep.origins["be2"].sha256(BIG)
    fe_tx = after.tx_bytes - before.tx_bytes
    assert fe_tx < 0.01 * got, f"front end transmitted {fe_tx} bytes for a {got}-byte download"
    # the client's ACKs went to be2 through the tunnel: the front end did transmit something
    assert fe_tx > 0
    # a new front end adopts the program and the tunnel device, and hands off again
    dep.start_fe(rules=[f"{lab.ip('be1')} jpg$", f"{lab.ip('be2')} .*"], tunnel="vxlan")
    assert dep.request("/img/logo.jpg").backend == "be1"


@pytest.mark.skipif(tunnel_possible("ipip") is None, reason="this kernel has ipip: nothing to refuse")
def test_ipip_without_the_module_is_refused_in_one_line(lab):
    dep = LabDeployment(lab)
    fe = dep.start_fe(wait=False, tunnel="ipip")
    assert fe.wait(15) == 1
    text = lab.log_path("fe", "tcpha-fe").read_text()
    lines = [line for line in text.splitlines() if "tunnel = ipip" in line]
    assert len(lines) == 1 and "cannot start: tunnel = ipip: this kernel has no ipip tunnels" in lines[0], text
    assert "Traceback" not in text
    assert not any(a.startswith(dep.vip) for a in lab.addresses("fe"))      # nothing left behind

    with pytest.raises(Exception, match="exited with status 1"):
        dep.start_backend("be1", tunnel="ipip")
    text = lab.log_path("be1", "tcpha-be").read_text()
    assert "tcpha-be stopped: tunnel = ipip: this kernel has no ipip tunnels" in text and "Traceback" not in text
    assert not any(a.startswith(dep.vip) for a in lab.addresses("be1"))
