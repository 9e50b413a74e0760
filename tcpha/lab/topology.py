"""Lab topologies as plain data.

A topology says which hosts exist, their roles and LAN addresses, the subnet and the virtual address
(VIP). It says nothing about how the hosts are built: the namespace builder (tcpha.lab.netns) reads it
today, a VM builder (vagrant/) can read the same description later.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("client", "fe", "be", "cache")

# Host names become namespace names (f"{prefix}-{name}") and port names on the lab switch, so they
# must fit in an interface name (IFNAMSIZ 16 incl. NUL) together with a 6-character prefix and "-".
HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
MAX_BACKENDS = 200


class TopologyError(ValueError):
    """A topology description that cannot be built; str(e) is one line."""


@dataclass
class HostSpec:
    name: str
    lan_ip: str
    role: str  # 'client' | 'fe' | 'be' | 'cache'


@dataclass
class Topology:
    subnet: str
    vip: str
    hosts: list[HostSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        try:
            net = ipaddress.ip_network(self.subnet, strict=True)
        except ValueError as e:
            raise TopologyError(f"subnet {self.subnet!r}: {e}") from None
        if net.version != 4:
            raise TopologyError(f"subnet {self.subnet!r}: only IPv4 lab networks are supported")
        seen_names: set[str] = set()
        seen_ips: set[str] = set()
        for h in self.hosts:
            if not HOST_NAME.match(h.name):
                raise TopologyError(
                    f"host name {h.name!r}: use 1-8 lower-case letters/digits starting with a letter")
            if h.role not in ROLES:
                raise TopologyError(f"host {h.name}: role {h.role!r} is not one of {', '.join(ROLES)}")
            try:
                ip = ipaddress.ip_address(h.lan_ip)
            except ValueError:
                raise TopologyError(f"host {h.name}: lan_ip {h.lan_ip!r} is not an IPv4 address") from None
            if ip not in net or ip in (net.network_address, net.broadcast_address):
                raise TopologyError(f"host {h.name}: lan_ip {h.lan_ip} is not a host address in {self.subnet}")
            if h.name in seen_names:
                raise TopologyError(f"host {h.name}: declared twice")
            if h.lan_ip in seen_ips:
                raise TopologyError(f"host {h.name}: address {h.lan_ip} used twice")
            seen_names.add(h.name)
            seen_ips.add(h.lan_ip)
        try:
            vip = ipaddress.ip_address(self.vip)
        except ValueError:
            raise TopologyError(f"vip {self.vip!r} is not an IPv4 address") from None
        if vip not in net:
            raise TopologyError(f"vip {self.vip} is not in {self.subnet}")
        if self.vip in seen_ips:
            raise TopologyError(f"vip {self.vip} is also a host's address")

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in the topology (hosts: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def by_role(self, role: str) -> list[HostSpec]:
        return [h for h in self.hosts if h.role == role]

    @property
    def backends(self) -> list[HostSpec]:
        return self.by_role("be")

    def to_dict(self) -> dict:
        return {"subnet": self.subnet, "vip": self.vip,
                "hosts": [{"name": h.name, "lan_ip": h.lan_ip, "role": h.role} for h in self.hosts]}

    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        try:
            hosts = [HostSpec(name=str(h["name"]), lan_ip=str(h["lan_ip"]), role=str(h["role"]))
                     for h in data.get("hosts", [])]
            return cls(subnet=str(data["subnet"]), vip=str(data["vip"]), hosts=hosts)
        except KeyError as e:
            raise TopologyError(f"missing key {e.args[0]!r}") from None
        except TypeError as e:
            raise TopologyError(f"malformed topology: {e}") from None


def make_topology(backends: int = 2, *, subnet: str = "10.77.0.0/24", vip: str | None = None,
                  cache: bool = True) -> Topology:
    """The standard lab: client .2, fe .10, back ends be1.. from .11 up, cache .20 (when backends <= 8).

    With more than 8 back ends they go from .31 upwards so that the well-known addresses stay put.
    """
    if not 1 <= backends <= MAX_BACKENDS:
        raise TopologyError(f"backends must be between 1 and {MAX_BACKENDS}, not {backends}")
    net = ipaddress.ip_network(subnet)
    base = net.network_address

    def at(n: int) -> str:
        return str(base + n)

    hosts = [HostSpec("client", at(2), "client"), HostSpec("fe", at(10), "fe")]
    for i in range(1, backends + 1):
        hosts.append(HostSpec(f"be{i}", at(10 + i) if backends <= 8 else at(30 + i), "be"))
    if cache:
        hosts.append(HostSpec("cache", at(20), "cache"))
    return Topology(subnet=subnet, vip=vip or at(100), hosts=hosts)


DEFAULT_TOPOLOGY = make_topology(2)


def load_topology(path: str | Path) -> Topology:
    """Read a topology from a TOML file (see conf/lab/default.toml). Errors: TopologyError "PATH: what"."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TopologyError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"{path}: {e}") from None
    try:
        if "backends" in data and "hosts" not in data:
            return make_topology(int(data["backends"]), subnet=data.get("subnet", "10.77.0.0/24"),
                                 vip=data.get("vip"), cache=bool(data.get("cache", True)))
        return Topology.from_dict(data)
    except (TopologyError, ValueError) as e:
        raise TopologyError(f"{path}: {e}") from None
