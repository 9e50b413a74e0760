"""Kernel objects: the steering table (install/adopt/remove, timeouts, bounds), the VIP, the ARP filter."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tcpha.steering import (
    ADDRESS_PROTO,
    ArpFilter,
    FlowKey,
    FlowSteering,
    SteeringError,
    VipAddress,
    neighbour_mac,
)
from tcpha.steering.netns import call_in_netns
from tests.support import wait_until

pytestmark = pytest.mark.netns


def _tables(lab, host: str) -> str:
    return lab.run(host, ["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


def _flows(n: int, base: int = 1024) -> list[FlowKey]:
    return [FlowKey(f"10.77.{1 + i // 60000}.{2 + (i // 250) % 250}", base + i % 60000, "10.77.0.100", 80)
            for i in range(n)]


@pytest.fixture
def steering_factory(lab_module, run_prefix):
    made: list[FlowSteering] = []

    def make(**kw) -> FlowSteering:
        args = dict(table=f"{run_prefix}st", ifname=lab_module.ifname("fe"), vip=lab_module.vip, ports=[80],
                    netns=lab_module.netns("fe"))
        args.update(kw)
        fs = FlowSteering(**args)
        made.append(fs)
        return fs

    try:
        yield make
    finally:
        for fs in made:
            fs.remove()
            fs.close()


def test_install_adopt_remove(lab_module, steering_factory, run_prefix):
    first = steering_factory()
    first.install()
    assert not first.adopted
    flows = _flows(50)
    first.forward_many([(f, "02:00:00:00:00:0b") for f in flows])
    first.freeze(FlowKey("10.77.0.2", 999, lab_module.vip, 80))
    # The process "crashes" (no remove); a successor with other ports adopts the same table.
    second = steering_factory(ports=[80, 8080])
    second.install()
    assert second.adopted
    assert second.entries() == 50
    assert set(second.forwarded()) == set(flows)
    assert second.frozen_entries() == 1
    assert _tables(lab_module, "fe").count(f"table netdev {run_prefix}st\n") == 1
    rules = lab_module.run("fe", ["nft", "list", "chain", "netdev", f"{run_prefix}st", "ingress"],
                           capture_output=True, text=True, check=True).stdout
    assert "{ 80, 8080 }" in rules
    second.remove()
    assert f"{run_prefix}st" not in _tables(lab_module, "fe")
    assert not second.installed()
    second.remove()  # idempotent


def test_incompatible_table_of_same_name_is_replaced(lab_module, steering_factory, run_prefix):
    lab_module.run("fe", ["nft", f"add table netdev {run_prefix}st; add set netdev {run_prefix}st frozen "
                          "{ type ipv4_addr; }"], check=True)
    fs = steering_factory()
    fs.install()
    assert not fs.adopted
    fs.forward(FlowKey("10.77.0.2", 5000, lab_module.vip, 80), "02:00:00:00:00:0b")
    assert fs.entries() == 1


def test_entries_time_out_and_table_stays_bounded(steering_factory, run_prefix):
    # A flow timeout far longer than the test for the 10,000 entries: at load ~4 the ten batches took more
    # than a second, and a 1 s timeout let the first ones expire before they were counted.
    fs = steering_factory(flow_timeout=600.0)
    fs.install()
    flows = _flows(10_000)
    for i in range(0, len(flows), 1000):
        fs.forward_many([(f, "02:00:00:00:00:0b") for f in flows[i:i + 1000]])
    assert fs.entries() == 10_000
    # Connections end: the BE reports them, the FE removes them (in batches, some twice, some already gone).
    fs.unforward_many(flows[:9_950])
    fs.unforward_many(flows[9_900:9_950])  # already removed: no error
    assert fs.entries() == 50
    # ... and the safety timeout removes the rest (the close reports that were lost): a table of its own
    # with short timeouts, long enough to see its entries in before they go.
    short = steering_factory(table=f"{run_prefix}sto", flow_timeout=3.0, freeze_timeout=1.0)
    short.install()
    short.forward_many([(f, "02:00:00:00:00:0b") for f in flows[-50:]])
    short.freeze(FlowKey("10.77.0.2", 999, "10.77.0.100", 80))
    assert short.entries() == 50 and short.frozen_entries() == 1
    wait_until(lambda: short.entries() == 0 and short.frozen_entries() == 0, 15,
               "the safety timeout to empty the table", interval=0.05)
    short.unforward_many(flows[-50:])  # expired already: still fine
    short.thaw(FlowKey("10.77.0.2", 999, "10.77.0.100", 80))


def test_bad_input_is_refused_with_clear_errors(lab_module, steering_factory):
    with pytest.raises(SteeringError, match="IPv4 VIP"):
        steering_factory(vip="not-an-ip")
    with pytest.raises(SteeringError, match="table name"):
        steering_factory(table="bad name; flush ruleset")
    fs = steering_factory()
    fs.install()
    with pytest.raises(SteeringError, match="MAC"):
        fs.forward(FlowKey("10.77.0.2", 1, lab_module.vip, 80), "zz:zz")
    with pytest.raises(SteeringError, match="port"):
        fs.forward(FlowKey("10.77.0.2", 0, lab_module.vip, 80), "02:00:00:00:00:0b")
    with pytest.raises(SteeringError, match="not an IPv4 address"):
        fs.freeze(FlowKey("10.77.0.2; flush ruleset", 1, lab_module.vip, 80))
    missing = steering_factory(table="x" + fs.table, ifname="nosuch0")
    with pytest.raises(SteeringError, match="no interface nosuch0"):
        missing.install()


def test_vip_address_ownership_and_adoption(lab_module):
    ns = lab_module.netns("be2")
    vip = "10.77.0.201"
    first = VipAddress(vip, "lo", netns=ns)
    try:
        assert first.add() is True
        with lab_module.ipr("be2") as ipr:
            found = [a for a in ipr.get_addr(family=socket.AF_INET) if a.get("IFA_LOCAL") == vip]
        assert len(found) == 1 and found[0].get("IFA_PROTO") == ADDRESS_PROTO
        # A restart: the successor adopts the address it finds with our mark, and adds no second one.
        second = VipAddress(vip, "lo", netns=ns)
        assert second.add() is True
        second.remove()
        assert not first.present()
        # An address configured by the operator (no mark) is used but never removed.
        lab_module.run("be2", ["ip", "addr", "add", f"{vip}/32", "dev", "lo"], check=True)
        theirs = VipAddress(vip, "lo", netns=ns)
        assert theirs.add() is False
        theirs.remove()
        assert theirs.present()
    finally:
        lab_module.run("be2", ["ip", "addr", "del", f"{vip}/32", "dev", "lo"])


def _arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    eth = b"\xff" * 6 + src_mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, socket.inet_aton(src_ip), b"\0" * 6,
                      socket.inet_aton(target_ip))
    return eth + arp


def _arp_replies_for(lab, target_ip: str, after_first: float = 0.3, timeout: float = 3.0) -> set[str]:
    """Send one ARP request for target_ip from the client; collect the MACs that answer.

    Waits until the first answer arrives, then a further `after_first` seconds for any other host to answer.
    """
    ifname = lab.ifname("client")
    mac = bytes.fromhex(lab.mac("client").replace(":", ""))

    def body() -> set[str]:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        try:
            s.bind((ifname, 0x0806))
            s.send(_arp_request(mac, lab.ip("client"), target_ip))
            answers: set[str] = set()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    frame = s.recv(1500)
                except TimeoutError:
                    break
                op, sha, spa = struct.unpack_from("!6xH6s4s", frame, 14)
                if op == 2 and socket.inet_ntoa(spa) == target_ip:
                    if not answers:
                        deadline = min(deadline, time.monotonic() + after_first)
                    answers.add(sha.hex(":"))
            return answers
        finally:
            s.close()

    return call_in_netns(lab.netns("client"), body)


def test_arp_filter_keeps_backend_quiet_about_the_vip(lab_module, run_prefix):
    lab = lab_module
    vip = "10.77.0.150"
    ns = lab.netns("be1")
    fe_vip = VipAddress(vip, lab.ifname("fe"), netns=lab.netns("fe"))
    be_vip = VipAddress(vip, "lo", netns=ns)
    arp = ArpFilter(vip, lab.ifname("be1"), table=f"{run_prefix}arp", netns=ns)
    try:
        be_vip.add()
        # Control: without the filter the back end does answer ARP for an address on its lo.
        assert lab.mac("be1") in _arp_replies_for(lab, vip)
        fe_vip.add()
        arp.install()
        assert lab.sysctl("be1", "net.ipv4.conf.all.arp_ignore") == "1"
        assert lab.sysctl("be1", f"net.ipv4.conf.{lab.ifname('be1')}.arp_announce") == "2"
        for _ in range(3):
            assert _arp_replies_for(lab, vip) == {lab.mac("fe")}
        # A second instance adopts the table and still restores the original sysctls on remove.
        again = ArpFilter(vip, lab.ifname("be1"), table=f"{run_prefix}arp", netns=ns)
        again.install()
        assert again.adopted
        assert _tables(lab, "be1").count(f"table arp {run_prefix}arp\n") == 1
        again.remove()
        assert lab.sysctl("be1", "net.ipv4.conf.all.arp_ignore") == "0"
        assert lab.sysctl("be1", f"net.ipv4.conf.{lab.ifname('be1')}.arp_announce") == "0"
        assert f"{run_prefix}arp" not in _tables(lab, "be1")
    finally:
        arp.remove()
        arp.close()
        fe_vip.remove()
        be_vip.remove()


def test_neighbour_mac_resolves_on_demand(lab_module):
    lab = lab_module
    ns = lab.netns("fe")
    lab.run("fe", ["ip", "neigh", "flush", "dev", lab.ifname("fe")])
    assert neighbour_mac(lab.ip("be2"), lab.ifname("fe"), netns=ns) == lab.mac("be2")
    with pytest.raises(Exception, match="did not answer ARP"):
        neighbour_mac("10.77.0.222", lab.ifname("fe"), netns=ns, timeout=0.5)


def test_forward_replaces_a_stale_entry_and_freeze_many(lab_module, steering_factory):
    fs = steering_factory()
    fs.install()
    flow = FlowKey("10.77.0.2", 4242, lab_module.vip, 80)
    fs.forward(flow, "02:00:00:00:00:0b")
    # The same 4-tuple comes back (a new connection) before the old entry was removed: it goes elsewhere.
    fs.freeze(flow)
    fs.forward(flow, "02:00:00:00:00:0c")
    assert fs.forwarded() == {flow: "02:00:00:00:00:0c"}
    assert fs.frozen_entries() == 0
    many = _flows(1200, base=20000)
    fs.freeze_many(many)
    assert fs.frozen_entries() == 1200
    fs.forward_many([(f, "02:00:00:00:00:0b") for f in many])
    assert fs.frozen_entries() == 0 and fs.entries() == 1201
    with pytest.raises(SteeringError, match="is the table installed"):
        steering_factory(table="x" + fs.table).freeze(flow)


def test_vip_announce_updates_a_stale_arp_entry(lab_module):
    lab = lab_module
    vip = "10.77.0.160"
    fe_vip = VipAddress(vip, lab.ifname("fe"), netns=lab.netns("fe"))
    client_if = lab.ifname("client")
    try:
        # The client believes a previous holder (be2's MAC) has the VIP.
        lab.run("client", ["ip", "neigh", "replace", vip, "lladdr", lab.mac("be2"), "dev", client_if,
                           "nud", "stale"], check=True)
        fe_vip.add()
        fe_vip.announce()

        def client_sees_fe() -> bool:
            with lab.ipr("client") as ipr:
                for n in ipr.get_neighbours(family=socket.AF_INET):
                    if n.get("NDA_DST") == vip:
                        return n.get("NDA_LLADDR") == lab.mac("fe")
            return False

        wait_until(client_sees_fe, 5, "the client's ARP entry for the VIP to name the front end", interval=0.05)
    finally:
        fe_vip.remove()
        lab.run("client", ["ip", "neigh", "del", vip, "dev", client_if])


def test_freeze_forward_in_one_transaction(lab_module, steering_factory):
    fs = steering_factory()
    fs.install()
    frozen_before = _flows(3, base=30000)
    fs.freeze_many(frozen_before)
    new = _flows(2, base=31000)
    fs.freeze_forward(new, [(f, "02:00:00:00:00:0b") for f in frozen_before])
    assert fs.forwarded() == {f: "02:00:00:00:00:0b" for f in frozen_before}
    assert fs.frozen_entries() == 2
    fs.freeze_forward([], [(f, "02:00:00:00:00:0c") for f in new])      # one side empty: plain calls
    assert fs.frozen_entries() == 0 and fs.entries() == 5
    with pytest.raises(SteeringError, match="is the table installed"):
        steering_factory(table="x" + fs.table).freeze_forward(new, [(frozen_before[0], "02:00:00:00:00:0b")])


def test_a_late_close_report_of_an_earlier_connection_leaves_the_newer_entry(lab_module, steering_factory):
    """A client reuses its port: the entry of its new connection holds the new handoff's id, and the old
    connection's FlowClosed (its handoff id) removes nothing; the new one's own report removes it."""
    fs = steering_factory()
    fs.install()
    reused, other, legacy = _flows(3, base=41000)
    fs.forward_many([(reused, "02:00:00:00:00:0b", 0x1_0000_0001), (other, "02:00:00:00:00:0b", 7),
                     (legacy, "02:00:00:00:00:0b")])
    assert fs.handoffs([reused, other, legacy, FlowKey("10.77.9.9", 9, lab_module.vip, 80)]) == [
        0x1_0000_0001, 7, 0, None]
    # `nft list` shows the id as the element's comment (libnftnl's user-data layout)
    listing = lab_module.run("fe", ["nft", "list", "map", "netdev", fs.table, "forward"], capture_output=True,
                             text=True, check=True).stdout
    assert 'comment "handoff 0000000100000001"' in listing
    # the client's new connection on the same 4-tuple is handed off again (handoff 2), through the
    # freeze-and-forward transaction this time
    fs.freeze_forward([FlowKey("10.77.9.9", 9, lab_module.vip, 80)], [(reused, "02:00:00:00:00:0c", 2)])
    assert fs.handoffs([reused]) == [2]
    # the old connection's report comes 0.5 s after its end: stale, the entry stays; an entry
    # without an id (made before ids existed) and a report without one (an older back end) remove it
    assert fs.unforward_closed([(reused, 0x1_0000_0001), (other, 7), (legacy, 99)]) == [reused]
    assert fs.forwarded() == {reused: "02:00:00:00:00:0c"}
    assert fs.unforward_closed([(reused, 2)]) == []
    assert fs.forwarded() == {}
    fs.forward_many([(reused, "02:00:00:00:00:0b", 3)])
    assert fs.unforward_closed([(reused, 0)]) == [] and fs.forwarded() == {}


def test_close_reports_for_many_flows_at_once(steering_factory):
    """A batch of close reports larger than one netlink read of the entries (chunked): the stale half kept."""
    fs = steering_factory()
    fs.install()
    flows = _flows(1500, base=2000)
    fs.forward_many([(f, "02:00:00:00:00:0b", 10 + i) for i, f in enumerate(flows)])
    reports = [(f, 10 + i if i % 2 else 99_999) for i, f in enumerate(flows)]
    assert set(fs.unforward_closed(reports)) == set(flows[0::2])
    assert set(fs.forwarded()) == set(flows[0::2])
