"""The namespace lab on the real kernel: build, reach, isolate, tear down."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading

import pytest

from tcpha.lab import DEFAULT_TOPOLOGY, LabError, NamespaceLab
from tcpha.lab import netns as labnetns
from tcpha.lab.netns import pids_in_netns

pytestmark = pytest.mark.netns

OUR_NAMES = {"eth0", "client", "fe", "be1", "be2", "cache"}


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {l["ifname"] for l in json.loads(out)}


def ours(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n.startswith(prefix + "-")}


def test_up_down_leaves_nothing(run_prefix):
    links_before = root_links()
    assert not ours(netns_list(), run_prefix)
    lab = NamespaceLab(DEFAULT_TOPOLOGY, run_prefix)
    lab.up()
    try:
        assert ours(netns_list(), run_prefix) == {f"{run_prefix}-{h}" for h in
                                                  ["sw", "client", "fe", "be1", "be2", "cache"]}
        # Nothing of the lab's lands in the root namespace: no bridge, no veth end.
        new = root_links() - links_before
        assert not {n for n in new if n.startswith(run_prefix) or n in OUR_NAMES}
        # the bridge and its ports live in the switch namespace
        with labnetns.IPRoute(netns=lab.switch_netns) as ipr:
            sw = {l.get("IFLA_IFNAME") for l in ipr.get_links()}
        assert {lab.bridge, "client", "fe", "be1", "be2", "cache"} <= sw
    finally:
        lab.down()
    assert not ours(netns_list(), run_prefix)
    assert not {n for n in root_links() - links_before if n.startswith(run_prefix) or n in OUR_NAMES}
    lab.down()  # idempotent
    assert not ours(netns_list(), run_prefix)


def test_context_manager(run_prefix):
    with NamespaceLab(DEFAULT_TOPOLOGY, run_prefix) as lab:
        assert lab.is_up and f"{run_prefix}-fe" in netns_list()
    assert not ours(netns_list(), run_prefix)


@pytest.mark.parametrize("target", ["fe", "be1", "be2", "cache"])
def test_client_pings_every_host(lab, target):
    r = lab.run("client", ["ping", "-c", "1", "-W", "2", lab.ip(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tcp_between_hosts_and_socket_lands_in_namespace(lab):
    home = os.stat("/proc/thread-self/ns/net").st_ino
    srv = lab.socket("be1")
    assert os.stat("/proc/thread-self/ns/net").st_ino == home  # the caller did not move
    with srv:
        srv.bind((lab.ip("be1"), 0))  # only possible inside be1's namespace
        srv.listen()
        port = srv.getsockname()[1]
        with lab.connect("client", lab.ip("be1"), port) as c:
            conn, peer = srv.accept()
            with conn:
                assert peer[0] == lab.ip("client")
                c.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def test_socket_in_other_namespace_cannot_bind_foreign_address(lab):
    with lab.socket("fe") as s:
        with pytest.raises(OSError) as e:
            s.bind((lab.ip("be1"), 0))
        assert e.value.errno == errno.EADDRNOTAVAIL


def test_socket_types(lab):
    with lab.socket("be2", socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind((lab.ip("be2"), 0))
        with lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"hello", u.getsockname())
            u.settimeout(5)
            data, addr = u.recvfrom(100)
        assert data == b"hello" and addr[0] == lab.ip("client")


def test_vip_is_not_configured_by_the_lab(lab):
    for h in lab.hosts:
        assert not any(a.startswith(lab.vip + "/") for a in lab.addresses(h)), h
    with pytest.raises(OSError):
        lab.connect("client", lab.vip, 80, timeout=0.5)


def test_addresses_and_ipv6_quiet(lab):
    for h in lab.hosts:
        assert f"{lab.ip(h)}/24@eth0" in lab.addresses(h)
        assert lab.sysctl(h, "net.ipv6.conf.all.disable_ipv6") == "1"
        assert lab.sysctl(h, "net/ipv6/conf/eth0/disable_ipv6") == "1"
        r = lab.run(h, ["ip", "-6", "-o", "addr"], capture_output=True, text=True)
        assert r.stdout.strip() == ""


def test_mac_matches_kernel_and_is_unique(lab):
    macs = {}
    for h in lab.hosts:
        out = lab.run(h, ["ip", "-j", "link", "show", lab.ifname(h)], capture_output=True, text=True,
                      check=True).stdout
        assert json.loads(out)[0]["address"] == lab.mac(h)
        macs[h] = lab.mac(h)
    assert len(set(macs.values())) == len(macs)


def test_sysctl_is_per_namespace(lab):
    root = open("/proc/sys/net/ipv4/ip_forward").read().strip()
    other = "0" if root == "1" else "1"
    assert lab.sysctl("fe", "net.ipv4.ip_forward", other) == other
    assert lab.sysctl("fe", "net.ipv4.ip_forward") == other
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == root
    assert lab.sysctl("be1", "net.ipv4.ip_forward") == "0"
    with pytest.raises(LabError, match="no such key"):
        lab.sysctl("fe", "net.ipv4.no_such_key")


def test_counters_count_real_traffic(lab):
    srv = lab.socket("be1")
    srv.bind((lab.ip("be1"), 0))
    srv.listen()
    total = 2_000_000
    got = []

    def sink():
        conn, _ = srv.accept()
        n = 0
        while chunk := conn.recv(1 << 16):
            n += len(chunk)
        got.append(n)
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    be1_before, client_before, fe_before = (lab.counters(h) for h in ("be1", "client", "fe"))
    with lab.connect("client", lab.ip("be1"), srv.getsockname()[1]) as c:
        c.sendall(b"x" * total)
    t.join(10)
    srv.close()
    assert got == [total]
    be1, client, fe = (lab.counters(h) for h in ("be1", "client", "fe"))
    assert be1.rx_bytes - be1_before.rx_bytes >= total
    assert client.tx_bytes - client_before.tx_bytes >= total
    # the FE saw at most flooded frames (ARP), never the stream
    assert fe.tx_bytes - fe_before.tx_bytes < total // 100


def test_two_labs_at_once_are_isolated(lab_factory):
    a = lab_factory()
    b = lab_factory()
    assert a.prefix != b.prefix
    assert not set(a.namespaces()) & set(b.namespaces())
    with b.socket("be1") as srv:
        srv.bind((b.ip("be1"), 0))
        srv.listen()
        port = srv.getsockname()[1]
        b.connect("client", b.ip("be1"), port).close()       # reachable inside lab b
        with pytest.raises(ConnectionRefusedError):           # lab a's be1 is another host
            a.connect("client", a.ip("be1"), port)


def test_more_backends(lab_factory):
    lab = lab_factory(backends=4)
    assert [h.name for h in lab.topology.backends] == ["be1", "be2", "be3", "be4"]
    r = lab.run("be4", ["ping", "-c", "1", "-W", "2", lab.ip("be3")], capture_output=True)
    assert r.returncode == 0


def test_popen_and_stray_processes_killed_by_down(run_prefix):
    lab = NamespaceLab(DEFAULT_TOPOLOGY, run_prefix)
    lab.up()
    try:
        p = lab.popen("be1", ["sleep", "1000"])
        # a daemonised process the lab did not start itself, living in be2's namespace
        lab.run("be2", ["sh", "-c", "setsid sleep 1001 </dev/null >/dev/null 2>&1 &"], check=True)
        stray = [pid for pid, ns in pids_in_netns(lab.namespaces()).items() if ns == lab.netns("be2")]
        assert stray
        assert p.poll() is None
    finally:
        lab.down()
    assert p.poll() is not None
    for pid in stray:
        assert not labnetns._alive(pid)
    assert not ours(netns_list(), run_prefix)


def test_run_passes_exit_status(lab):
    assert lab.run("fe", ["sh", "-c", "exit 5"]).returncode == 5
    with pytest.raises(TypeError):
        lab.run("fe", "echo hi")


def test_up_refuses_existing_lab_and_leaves_it_alone(lab):
    twin = NamespaceLab(DEFAULT_TOPOLOGY, lab.prefix)
    with pytest.raises(LabError, match="already exists"):
        twin.up()
    assert lab.run("client", ["ping", "-c", "1", "-W", "2", lab.ip("be1")]).returncode == 0


class FailingLab(NamespaceLab):
    """Fails in the middle of up(), after some namespaces and links exist."""

    def __init__(self, *a, fail_at: str, **kw):
        super().__init__(*a, **kw)
        self.fail_at = fail_at

    def _quiet_ipv6(self, name):
        if name == self.netns(self.fail_at):
            raise OSError(errno.EIO, "injected failure")
        super()._quiet_ipv6(name)


def test_partial_failure_while_creating_namespaces(run_prefix):
    lab = FailingLab(DEFAULT_TOPOLOGY, run_prefix, fail_at="be2")
    with pytest.raises(LabError, match="injected failure"):
        lab.up()
    assert not ours(netns_list(), run_prefix)
    assert not lab.is_up


class FailingAttachLab(NamespaceLab):
    """Fails while wiring the third host, when veths, the bridge and addresses already exist."""

    attached = 0

    def _attach_host(self, sw, br, host, lan_ip, prefixlen):
        if self.attached == 2:
            raise OSError(errno.EIO, "injected netlink failure")
        super()._attach_host(sw, br, host, lan_ip, prefixlen)
        self.attached += 1


def test_partial_failure_after_links_exist(run_prefix):
    lab = FailingAttachLab(DEFAULT_TOPOLOGY, run_prefix)
    with pytest.raises(LabError, match="injected netlink failure"):
        lab.up()
    assert lab.attached == 2
    assert not ours(netns_list(), run_prefix)


def test_spawn_reports_a_service_that_dies(lab):
    with pytest.raises(LabError, match="exited with status 3.*boom"):
        lab.spawn("be1", ["sh", "-c", "echo boom; exit 3"], name="dies", ready_tcp=(lab.ip("be1"), 1))
    assert not lab.processes()


def test_spawn_reports_a_service_never_ready(lab):
    with pytest.raises(LabError, match="not ready within"):
        lab.spawn("be1", ["sleep", "60"], name="never", ready_tcp=(lab.ip("be1"), 1), timeout=0.5)
    assert not lab.processes()


def test_state_round_trip(lab, tmp_path):
    lab.save(tmp_path / "s.json")
    again = NamespaceLab.load(tmp_path / "s.json")
    assert again.prefix == lab.prefix and again.topology == lab.topology and again.is_up
    assert again.mac("be1") == lab.mac("be1")


def test_lab_module_fixture_is_shared(lab_module):
    assert lab_module.is_up
    test_lab_module_fixture_is_shared.prefixes.append(lab_module.prefix)
    assert lab_module.run("client", ["ping", "-c", "1", "-W", "2", lab_module.ip("fe")]).returncode == 0


test_lab_module_fixture_is_shared.prefixes = []


def test_lab_module_fixture_same_lab_again(lab_module):
    assert test_lab_module_fixture_is_shared.prefixes == [lab_module.prefix]
