"""The lab topology for real machines: renders a Topology as the host list vagrant/Vagrantfile reads.

    python -m tcpha.lab.vm [--backends N | --topology FILE] > vagrant/topology.json

Same hosts, roles and addresses as the namespace lab; on the VMs the LAN is the second NIC.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from .topology import DEFAULT_TOPOLOGY, Topology, TopologyError, load_topology, make_topology

VM_LAN_IFNAME = "eth1"  # Vagrant's first NIC (eth0) is its NAT management interface


def vagrant_hosts(topology: Topology) -> dict:
    return {
        "subnet": topology.subnet,
        "prefixlen": topology.prefixlen,
        "netmask": str(ipaddress.ip_network(topology.subnet).netmask),
        "vip": topology.vip,
        "lan_ifname": VM_LAN_IFNAME,
        "hosts": [{"name": h.name, "role": h.role, "lan_ip": h.lan_ip} for h in topology.hosts],
    }


def render(topology: Topology) -> str:
    return json.dumps(vagrant_hosts(topology), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tcpha.lab.vm", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--backends", type=int, metavar="N")
    g.add_argument("--topology", metavar="FILE")
    a = p.parse_args(argv)
    try:
        t = (load_topology(a.topology) if a.topology else
             make_topology(a.backends) if a.backends is not None else DEFAULT_TOPOLOGY)
    except TopologyError as e:
        print(f"tcpha.lab.vm: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
