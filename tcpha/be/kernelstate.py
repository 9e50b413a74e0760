"""The back end's kernel state for the VIP: the VIP as a /32 on lo, and ARP filtering so that this host
never answers for it (the front end owns the VIP on the LAN; replies to handed-off clients leave from
here with the VIP as their source). In routed mode (`tunnel = vxlan|ipip`) the VIP goes on the tunnel
device the flows arrive on instead (tcpha.steering.tunnel: `tcpha-vxlan`, or `tunl0` as TCPHA).

KernelState installs both and removes them again, in reverse order; vip_held_elsewhere tells whether a
front end on this host already holds the VIP (then the back end installs nothing).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pyroute2 import IPRoute

from tcpha import steering
from tcpha.loglevels import NOTICE
from tcpha.steering.tunnel import BackTunnel, backend_tunnel_devices

log = logging.getLogger("tcpha.be")

NFT_TABLE = "tcpha_be"


def vip_held_elsewhere(vip: str) -> bool:
    """True when `vip` is an address of an interface other than lo or a back end's tunnel device (a front
    end on this host)."""
    mine = {"lo"} | backend_tunnel_devices()
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get_attr("IFA_ADDRESS") == vip and msg.get_attr("IFA_LABEL") not in mine:
                return True
    return False


class KernelState:
    """The VIP on lo and its ARP filter on the LAN interface (`interface`, or the one holding `raddr`
    when it is empty or "auto"). Netlink work: call it outside a running asyncio loop (pyroute2)."""

    def __init__(self, vip: str, interface: str | None, raddr: str, tunnel: str = "none"):
        self.vip = vip
        self.tunnel = tunnel
        self.interface = interface
        self.raddr = raddr
        self.lan_mac: str | None = None       # the LAN interface's MAC (sent in Hello, and to a registrar)
        self._installed: list[Any] = []

    def install(self) -> None:
        """The VIP as a /32 on lo (or the tunnel device), and ARP filtering so that this host never answers
        for it. On failure, what was installed is removed again and the error (one line) raised."""
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    def _install(self) -> None:
        holder = "lo"
        if self.tunnel != "none":
            dev = BackTunnel(self.tunnel)
            dev.install()          # first: refuses a tunnel this kernel cannot make, before anything else
            self._installed.append(dev)
            holder = dev.ifname
        ifname = self.interface
        if not ifname or ifname == "auto":
            ifname = steering.interface_holding(self.raddr)
        try:
            with open(f"/sys/class/net/{ifname}/address") as f:
                self.lan_mac = f.read().strip()
        except OSError:
            self.lan_mac = None
        arp = steering.ArpFilter(self.vip, ifname, table=NFT_TABLE)
        arp.install()              # before the VIP: never a moment where it could be answered
        self._installed.append(arp)
        vip = steering.VipAddress(self.vip, holder, prefixlen=32)
        vip.add()
        self._installed.append(vip)
        log.log(NOTICE, "kernel state installed: VIP %s on %s, ARP filtered on %s", self.vip, holder, ifname)

    def remove(self) -> None:
        while self._installed:
            obj = self._installed.pop()
            try:
                obj.remove()
            except Exception as e:
                log.error("removing %s failed: %s", type(obj).__name__, e)
