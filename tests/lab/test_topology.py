"""Topology descriptions: pure data, no root needed."""

from pathlib import Path

import pytest

from tcpha.lab import DEFAULT_TOPOLOGY, HostSpec, LabError, NamespaceLab, Topology, TopologyError
from tcpha.lab import load_topology, make_topology

REPO = Path(__file__).resolve().parents[2]


def test_default_topology_addresses():
    t = DEFAULT_TOPOLOGY
    assert t.subnet == "10.77.0.0/24" and t.vip == "10.77.0.100"
    assert {(h.name, h.lan_ip, h.role) for h in t.hosts} == {
        ("client", "10.77.0.2", "client"), ("fe", "10.77.0.10", "fe"), ("be1", "10.77.0.11", "be"),
        ("be2", "10.77.0.12", "be"), ("cache", "10.77.0.20", "cache")}
    assert [h.name for h in t.backends] == ["be1", "be2"]
    assert t.host("fe").lan_ip == "10.77.0.10"
    with pytest.raises(KeyError):
        t.host("be3")


def test_conf_lab_default_file_is_the_default_topology():
    assert load_topology(REPO / "conf/lab/default.toml") == DEFAULT_TOPOLOGY


@pytest.mark.parametrize("n", [1, 2, 8, 9, 30])
def test_make_topology_n_backends(n):
    t = make_topology(n)
    assert [h.name for h in t.backends] == [f"be{i}" for i in range(1, n + 1)]
    ips = [h.lan_ip for h in t.hosts]
    assert len(set(ips)) == len(ips) and t.vip not in ips
    # the well-known hosts keep their addresses whatever the size
    assert t.host("client").lan_ip == "10.77.0.2" and t.host("fe").lan_ip == "10.77.0.10"
    assert t.host("cache").lan_ip == "10.77.0.20"


def test_make_topology_limits():
    with pytest.raises(TopologyError):
        make_topology(0)
    with pytest.raises(TopologyError):
        make_topology(10_000)


def test_dict_round_trip():
    t = make_topology(3)
    assert Topology.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("hosts, vip, message", [
    ([HostSpec("a", "10.77.0.2", "client"), HostSpec("a", "10.77.0.3", "fe")], "10.77.0.100", "declared twice"),
    ([HostSpec("a", "10.77.0.2", "client"), HostSpec("b", "10.77.0.2", "fe")], "10.77.0.100", "used twice"),
    ([HostSpec("a", "10.78.0.2", "client")], "10.77.0.100", "not a host address"),
    ([HostSpec("a", "10.77.0.255", "client")], "10.77.0.100", "not a host address"),
    ([HostSpec("a", "nonsense", "client")], "10.77.0.100", "not an IPv4 address"),
    ([HostSpec("a", "10.77.0.2", "router")], "10.77.0.100", "role"),
    ([HostSpec("Bad_Name", "10.77.0.2", "fe")], "10.77.0.100", "host name"),
    ([HostSpec("waytoolongname", "10.77.0.2", "fe")], "10.77.0.100", "host name"),
    ([HostSpec("a", "10.77.0.2", "fe")], "10.77.0.2", "also a host"),
    ([HostSpec("a", "10.77.0.2", "fe")], "10.99.0.1", "not in"),
])
def test_bad_topologies_one_line_errors(hosts, vip, message):
    with pytest.raises(TopologyError) as e:
        Topology(subnet="10.77.0.0/24", vip=vip, hosts=hosts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_topology_backends_form(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('backends = 4\nsubnet = "10.88.0.0/24"\n')
    t = load_topology(p)
    assert [h.name for h in t.backends] == ["be1", "be2", "be3", "be4"]
    assert t.vip == "10.88.0.100" and t.host("be4").lan_ip == "10.88.0.14"


@pytest.mark.parametrize("text, message", [
    ("subnet = ", "t.toml"),
    ('vip = "10.77.0.100"\n', "missing key 'subnet'"),
    ('subnet = "10.77.0.0/24"\nvip = "10.77.0.100"\n[[hosts]]\nname = "a"\nlan_ip = "10.77.0.2"\n', "role"),
])
def test_load_topology_errors_name_the_file(tmp_path, text, message):
    p = tmp_path / "t.toml"
    p.write_text(text)
    with pytest.raises(TopologyError) as e:
        load_topology(p)
    assert str(e.value).startswith(str(p)) and message in str(e.value)


def test_load_topology_missing_file(tmp_path):
    with pytest.raises(TopologyError, match="No such file"):
        load_topology(tmp_path / "nope.toml")


def test_lab_names_fit_ifnamsiz_and_are_derived_from_prefix():
    t = make_topology(30)
    lab = NamespaceLab(t, "abcdef")
    assert lab.netns("be30") == "abcdef-be30"
    assert lab.bridge == "abcdef-br" and lab.switch_netns == "abcdef-sw"
    assert lab.ifname("be1") == "eth0"
    assert all(len(n) <= 15 for n in lab.namespaces() + [lab.bridge])
    with pytest.raises(KeyError):
        lab.netns("nohost")


@pytest.mark.parametrize("prefix", ["", "toolong7", "Upper", "1abc", "a-b"])
def test_bad_prefix_refused(prefix):
    with pytest.raises(LabError):
        NamespaceLab(DEFAULT_TOPOLOGY, prefix)


def test_host_named_like_the_switch_refused():
    t = Topology("10.77.0.0/24", "10.77.0.100", [HostSpec("sw", "10.77.0.2", "client")])
    with pytest.raises(LabError, match="reserved"):
        NamespaceLab(t, "abc")
