"""The tc ingress steering program (tcpha.steering.bpf) on a veth pair in a namespace of the test's own.

`fe0` carries the program (and the VIP); frames are written with scapy on its peer `pe0` (so they arrive
on fe0's ingress) and read back on `pe0`: a forwarded frame leaves fe0 again with both MACs rewritten
(to the peer's side), a frame that reaches fe0's stack for a flow without a socket is answered with a
RST, a frozen flow's frame gets neither.
"""

from __future__ import annotations

import select
import socket
import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tcpha.steering import BpfFlowSteering, FlowKey, SteeringError
from tcpha.steering.bpf import FILTER_PRIO
from tcpha.steering.netns import call_in_netns
from tests.support import wait_until

pytestmark = pytest.mark.netns

VIP, PEER = "10.211.0.1", "10.211.0.2"
BE_MAC = "02:be:00:00:00:01"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def pair(run_prefix):
    ns = f"{run_prefix}-bs"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        _ip(ns, "link", "add", "fe0", "type", "veth", "peer", "name", "pe0")
        _ip(ns, "addr", "add", f"{VIP}/24", "dev", "fe0")
        _ip(ns, "link", "set", "fe0", "up")
        _ip(ns, "link", "set", "pe0", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


class Wire:
    """An AF_PACKET socket on pe0: write frames towards fe0, read what fe0 sends."""

    def __init__(self, ns: str):
        self.sock = call_in_netns(ns, socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("pe0", 0))
        self.mac = self.sock.getsockname()[4].hex(":")

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def frames(self, quiet: float = 0.3) -> list[bytes]:
        """What fe0 sent until `quiet` seconds pass without a frame (IPv4 only: no IPv6 chatter)."""
        out = []
        while select.select([self.sock], [], [], quiet)[0]:
            data, addr = self.sock.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING and data[12:14] == b"\x08\x00":
                out.append(data)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire(pair):
    w = Wire(pair)
    _ip(pair, "neigh", "replace", PEER, "lladdr", w.mac, "dev", "fe0")     # the stack's RSTs need no ARP
    yield w
    w.close()


@pytest.fixture
def steering(pair):
    s = BpfFlowSteering(table="unit", ifname="fe0", vip=VIP, ports=[80], netns=pair, flow_timeout=30,
                        freeze_timeout=10)
    s.install()
    yield s
    s.remove()


def _fe_mac(ns: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-br", "link", "show", "fe0"], check=True, capture_output=True, text=True)
    return out.stdout.split()[2]


def _frame(wire: Wire, fe_mac: str, sport: int, flags: str = "A", payload: bytes = b"") -> bytes:
    pkt = (Ether(src=wire.mac, dst=fe_mac) / IP(src=PEER, dst=VIP, ttl=61)
           / TCP(sport=sport, dport=80, flags=flags, seq=1000, ack=2000) / payload)
    return bytes(pkt)


def _resets(frames: list[bytes], sport: int) -> list[bytes]:
    return [f for f in frames if TCP in Ether(f) and Ether(f)[TCP].flags.R and Ether(f)[TCP].dport == sport]


def test_forwarded_flow_leaves_with_both_macs_rewritten_and_nothing_else(pair, wire, steering):
    fe_mac = _fe_mac(pair)
    flow = FlowKey(PEER, 40001, VIP, 80)
    steering.forward(flow, BE_MAC)
    sent = _frame(wire, fe_mac, 40001, payload=b"GET / HTTP/1.1\r\n\r\n")
    wire.send(sent)
    got = wire.frames()
    expected = bytes.fromhex(BE_MAC.replace(":", "")) + bytes.fromhex(fe_mac.replace(":", "")) + sent[12:]
    assert got == [expected]           # byte-exact: TTL, checksums, payload untouched; no RST from the stack


def test_unknown_flow_reaches_the_stack(pair, wire, steering):
    steering.forward(FlowKey(PEER, 40002, VIP, 80), BE_MAC)
    wire.send(_frame(wire, _fe_mac(pair), 40003))           # another port: not ours
    got = wire.frames()
    assert _resets(got, 40003) and not any(f[:6] == bytes.fromhex(BE_MAC.replace(":", "")) for f in got)


def test_frozen_flow_is_dropped_and_thaw_lets_it_through(pair, wire, steering):
    fe_mac = _fe_mac(pair)
    flow = FlowKey(PEER, 40004, VIP, 80)
    steering.freeze(flow)
    wire.send(_frame(wire, fe_mac, 40004))
    assert wire.frames() == []
    steering.thaw(flow)
    wire.send(_frame(wire, fe_mac, 40004))
    assert _resets(wire.frames(), 40004)


def test_syn_removes_the_entry_of_its_4_tuple(pair, wire, steering):
    flow = FlowKey(PEER, 40005, VIP, 80)
    steering.forward(flow, BE_MAC)
    wire.send(_frame(wire, _fe_mac(pair), 40005, flags="S"))
    got = wire.frames()
    assert _resets(got, 40005)                                # the stack answered the SYN (no listener)
    assert steering.forwarded() == {}


def test_forwarded_packets_refresh_the_entry_and_idle_ones_expire(pair, wire, steering):
    fe_mac = _fe_mac(pair)
    kept, idle = FlowKey(PEER, 40006, VIP, 80), FlowKey(PEER, 40007, VIP, 80)
    steering.forward_many([(kept, BE_MAC), (idle, BE_MAC)])
    steering.freeze(FlowKey(PEER, 40008, VIP, 80))
    time.sleep(0.3)                    # the entries' age: the clock must move between update and packet
    before_packet = time.monotonic_ns()
    wire.send(_frame(wire, fe_mac, 40006))
    assert len(wire.frames()) == 1
    # a timeout 0.1 s longer than the time since the packet: the entry without a packet since its
    # update (0.3 s older) is past it, the refreshed one is not
    now = time.monotonic_ns()
    steering.flow_timeout = (now - before_packet) / 1e9 + 0.1
    assert steering.sweep(now) == 1
    assert set(steering.forwarded()) == {kept}
    steering.freeze_timeout = 0.1
    assert steering.sweep(now) == 1 and steering.frozen_entries() == 0


def test_sweeper_thread_expires_idle_entries(pair):
    s = BpfFlowSteering(table="sweep", ifname="fe0", vip=VIP, ports=[80], netns=pair, flow_timeout=0.3,
                        freeze_timeout=0.3)
    s.install()
    try:
        s.forward(FlowKey(PEER, 40009, VIP, 80), BE_MAC)
        s.freeze(FlowKey(PEER, 40010, VIP, 80))
        wait_until(lambda: s.entries() == 0 and s.frozen_entries() == 0, timeout=10,
                   what="idle entries expired by the sweeper")
    finally:
        s.remove()


def test_table_is_bounded(pair):
    s = BpfFlowSteering(table="small", ifname="fe0", vip=VIP, ports=[80], netns=pair, capacity=4)
    s.install()
    try:
        s.forward_many([(FlowKey(PEER, 41000 + i, VIP, 80), BE_MAC) for i in range(4)])
        with pytest.raises(SteeringError, match="full"):
            s.forward(FlowKey(PEER, 42000, VIP, 80), BE_MAC)
        s.forward(FlowKey(PEER, 41000, VIP, 80), "02:be:00:00:00:02")   # replacing an entry still works
        assert s.entries() == 4
    finally:
        s.remove()


def test_a_new_handle_adopts_program_and_entries_and_remove_leaves_nothing(pair, wire):
    first = BpfFlowSteering(table="adopt", ifname="fe0", vip=VIP, ports=[80], netns=pair)
    first.install()
    flow = FlowKey(PEER, 40011, VIP, 80)
    first.forward_many([(flow, BE_MAC, 0x1234)])
    first.close()                                            # as a kill -9 would: kernel objects stay
    second = BpfFlowSteering(table="adopt", ifname="fe0", vip=VIP, ports=[80], netns=pair)
    try:
        second.install()
        assert second.adopted and second.forwarded() == {flow: BE_MAC} and second.handoffs([flow]) == [0x1234]
        wire.send(_frame(wire, _fe_mac(pair), 40011))
        assert [f[:6] for f in wire.frames()] == [bytes.fromhex(BE_MAC.replace(":", ""))]
        # a handle made without install (a forked worker, the control plane) works on the same map
        worker = BpfFlowSteering(table="adopt", ifname="fe0", vip=VIP, ports=[80], netns=pair)
        worker.unforward_many([flow])
        worker.close()
        assert second.forwarded() == {}
    finally:
        second.remove()
    out = subprocess.run(["tc", "-n", pair, "qdisc", "show", "dev", "fe0"], capture_output=True, text=True).stdout
    assert "clsact" not in out
    assert not second.installed()


def test_remove_keeps_a_clsact_someone_else_uses(pair, steering):
    subprocess.run(["tc", "-n", pair, "filter", "add", "dev", "fe0", "ingress", "prio", str(FILTER_PRIO + 1),
                    "bpf", "bytecode", "1,6 0 0 0,", "classid", "1"], check=True)   # classic BPF: no module needed
    steering.remove()
    out = subprocess.run(["tc", "-n", pair, "filter", "show", "dev", "fe0", "ingress"], capture_output=True, text=True).stdout
    assert "bytecode" in out and "tcpha" not in out


def test_a_handle_without_install_forwards_with_the_interface_and_its_mac(pair, wire, steering):
    """A forked worker's handle: never installed, its first call is a forward."""
    worker = BpfFlowSteering(table="unit", ifname="fe0", vip=VIP, ports=[80], netns=pair)
    try:
        worker.forward(FlowKey(PEER, 40012, VIP, 80), BE_MAC)
        wire.send(_frame(wire, _fe_mac(pair), 40012))
        got = wire.frames()
        assert [f[:12] for f in got] == [bytes.fromhex((BE_MAC + _fe_mac(pair)).replace(":", ""))]
    finally:
        worker.close()


def test_auto_keeps_the_nft_table_a_predecessor_left(pair):
    from tcpha.steering import FlowSteering, choose
    kwargs = dict(table="autokeep", ifname="fe0", vip=VIP, ports=[80], netns=pair)
    assert choose._decide("auto", kwargs)[0] == "bpf"
    nft = FlowSteering(**kwargs)
    nft.install()
    try:
        kind, why = choose._decide("auto", kwargs)
        assert kind == "nft" and "predecessor" in why
    finally:
        nft.remove()
        nft.close()
