"""Routed mode in the namespace lab: some hosts moved to a second subnet behind a router namespace.

route_apart(lab, ["be1", "be2"]) turns an up NamespaceLab (one LAN, one bridge) into two subnets:

  near LAN (the lab's subnet, bridge P-br):  client, fe, ...       router P-rt  .1 on both
  far LAN (`far_subnet`, bridge P-br2):      the hosts named        (ip_forward, no rp_filter)

Each moved host's switch port goes to the second bridge, its address becomes the same host number in the
far subnet, and its default route goes through the router; near hosts get a route to the far subnet
through the router. The lab's topology is replaced by an updated copy, so lab.ip(host) and everything built on it
(tcpha.lab.deploy's configs) use the new addresses. The router namespace and the bridge carry the lab's
prefix: lab.down() removes them with the rest (it removes every namespace of the prefix).

Used by the routed mode's tests (`tunnel = vxlan`): a back end on another subnet than the front end
cannot be reached by MAC, only through a tunnel.
"""

from __future__ import annotations

import copy
import ipaddress

from pyroute2 import IPRoute, netns as pr_netns

from .netns import LAN_IFNAME, NamespaceLab, in_netns

__all__ = ["route_apart", "ROUTER", "FAR_SUBNET"]

ROUTER = "rt"                   # the router namespace is P-rt
FAR_SUBNET = "10.78.0.0/24"


def _sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def route_apart(lab: NamespaceLab, far: list[str], far_subnet: str = FAR_SUBNET) -> str:
    """Move the hosts `far` onto a second subnet behind a router (see the module docstring); returns the
    router namespace's name."""
    # the lab's own copy: the topology it was made from may be shared (DEFAULT_TOPOLOGY) and must not change
    lab.topology = copy.deepcopy(lab.topology)
    near_net = ipaddress.ip_network(lab.topology.subnet)
    far_net = ipaddress.ip_network(far_subnet)
    near_gw, far_gw = str(near_net.network_address + 1), str(far_net.network_address + 1)
    taken = {h.lan_ip for h in lab.topology.hosts}
    if near_gw in taken or lab.topology.vip == near_gw:
        raise ValueError(f"{near_gw} (the router's address) is a host's address already")
    router = f"{lab.prefix}-{ROUTER}"
    bridge2 = f"{lab.prefix}-br2"
    pr_netns.create(router)
    in_netns(router, _sysctls, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                                "net.ipv4.conf.default.rp_filter": "0"})
    with IPRoute(netns=lab.switch_netns) as sw:
        sw.link("add", ifname=bridge2, kind="bridge", br_stp_state=0, br_forward_delay=0)
        br1 = sw.link_lookup(ifname=lab.bridge)[0]
        br2 = sw.link_lookup(ifname=bridge2)[0]
        sw.link("set", index=br2, state="up")
        for side, br, addr, plen in (("rt0", br1, near_gw, near_net.prefixlen),
                                     ("rt1", br2, far_gw, far_net.prefixlen)):
            port = f"{lab.prefix}-{side}"
            sw.link("add", ifname=port, kind="veth", peer={"ifname": side, "net_ns_fd": router})
            sw.link("set", index=sw.link_lookup(ifname=port)[0], master=br, state="up")
            with IPRoute(netns=router) as rt:
                idx = rt.link_lookup(ifname=side)[0]
                rt.addr("add", index=idx, address=addr, prefixlen=plen)
                rt.link("set", index=idx, state="up")
        with IPRoute(netns=router) as rt:
            rt.link("set", index=rt.link_lookup(ifname="lo")[0], state="up")
        in_netns(router, _sysctls, {"net.ipv4.conf.rt0.rp_filter": "0", "net.ipv4.conf.rt1.rp_filter": "0"})
        for spec in lab.topology.hosts:
            ns = lab.netns(spec.name)
            host_no = int(ipaddress.ip_address(spec.lan_ip)) - int(near_net.network_address)
            with IPRoute(netns=ns) as ipr:
                idx = ipr.link_lookup(ifname=LAN_IFNAME)[0]
                if spec.name in far:
                    new_ip = str(far_net.network_address + host_no)
                    sw.link("set", index=sw.link_lookup(ifname=spec.name)[0], master=br2)
                    ipr.addr("del", index=idx, address=spec.lan_ip, prefixlen=near_net.prefixlen)
                    ipr.addr("add", index=idx, address=new_ip, prefixlen=far_net.prefixlen)
                    ipr.route("add", dst="0.0.0.0/0", gateway=far_gw)
                    spec.lan_ip = new_ip
                else:
                    ipr.route("add", dst=far_subnet, gateway=near_gw)
    return router
