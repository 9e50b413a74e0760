"""The virtual address (VIP): on the FE's LAN interface, or as a /32 on the BE's `lo`.

Ownership is recorded in the kernel itself, on the address: IFA_PROTO (the address "protocol", like a
route's protocol; shown by `ip addr` as `proto`) is set to ADDRESS_PROTO. A restarted daemon that finds the
VIP carrying that mark adopts it (and will remove it on stop); a VIP configured by the operator (no mark)
is used but never removed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct

from .netns import call_in_netns

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

__all__ = ["VipAddress", "AddressError", "ADDRESS_PROTO", "interface_holding"]

ADDRESS_PROTO = 0x7C  # our mark in IFA_PROTO (user values are free above the kernel's 0..3)


class AddressError(RuntimeError):
    """Adding or removing the VIP failed; str(e) is one clear line."""


def interface_holding(addr: str) -> str:
    """The name of the interface that holds `addr` (RuntimeError if none does)."""
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get_attr("IFA_ADDRESS") == addr:
                return ipr.get_links(msg["index"])[0].get_attr("IFLA_IFNAME")
    raise RuntimeError(f"raddr {addr} is not an address of this host")


class VipAddress:
    """The VIP on one interface of one namespace. add() is idempotent; remove() removes only what we own."""

    def __init__(self, address: str, ifname: str, *, prefixlen: int = 32, netns: str | None = None):
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise AddressError(f"not an IP address: {address!r}") from None
        self.address = str(ip)
        self.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        maxlen = 32 if ip.version == 4 else 128
        if not 0 < prefixlen <= maxlen:
            raise AddressError(f"bad prefix length {prefixlen} for {address}")
        self.ifname = ifname
        self.prefixlen = prefixlen
        self.netns = netns
        self.owned = False  # True once we added it, or adopted one carrying our mark

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _index(self, ipr: IPRoute) -> int:
        idx = ipr.link_lookup(ifname=self.ifname)
        if not idx:
            where = f" in namespace {self.netns}" if self.netns else ""
            raise AddressError(f"no interface {self.ifname}{where}")
        return idx[0]

    def _find(self, ipr: IPRoute, index: int) -> dict | None:
        for msg in ipr.get_addr(family=self.family, index=index):
            if msg.get("IFA_LOCAL", msg.get("IFA_ADDRESS")) == self.address or msg.get("IFA_ADDRESS") == self.address:
                return msg
        return None

    def present(self) -> bool:
        with self._ipr() as ipr:
            return self._find(ipr, self._index(ipr)) is not None

    def add(self) -> bool:
        """Make sure the VIP is on the interface. Returns True if we own it (added now, or adopted)."""
        with self._ipr() as ipr:
            index = self._index(ipr)
            found = self._find(ipr, index)
            if found is not None:
                self.owned = found.get("IFA_PROTO") == ADDRESS_PROTO
                log.info("VIP %s already on %s (%s)", self.address, self.ifname,
                         "ours: adopted" if self.owned else "configured by someone else: left alone")
                return self.owned
            try:
                ipr.addr("add", index=index, address=self.address, prefixlen=self.prefixlen,
                         IFA_PROTO=ADDRESS_PROTO)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise AddressError(f"adding {self.address}/{self.prefixlen} to {self.ifname}: {exc}") from None
            self.owned = True
            return True

    def remove(self) -> None:
        """Remove the VIP if we own it (added or adopted). Idempotent."""
        if not self.owned:
            return
        with self._ipr() as ipr:
            try:
                index = self._index(ipr)
            except AddressError:
                self.owned = False
                return  # the interface (and so the address) is gone
            found = self._find(ipr, index)
            if found is not None:
                try:
                    ipr.addr("del", index=index, address=self.address, prefixlen=found["prefixlen"])
                except NetlinkError as exc:
                    if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                        raise AddressError(f"removing {self.address} from {self.ifname}: {exc}") from None
        self.owned = False

    def announce(self) -> None:
        """Send one gratuitous ARP for the VIP from the interface (what keepalived does on taking a VIP),
        so that hosts with a stale ARP entry (a previous holder) switch to us at once. IPv4, non-lo only."""
        if self.family != socket.AF_INET or self.ifname == "lo":
            return
        with self._ipr() as ipr:
            mac = ipr.get_links(self._index(ipr))[0].get("IFLA_ADDRESS")
        hw = bytes.fromhex(mac.replace(":", ""))
        ip = socket.inet_aton(self.address)
        # Ethernet broadcast + ARP request whose sender and target are both the VIP (RFC 5227 announcement).
        frame = (b"\xff" * 6 + hw + b"\x08\x06"
                 + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, ip, b"\0" * 6, ip))

        def send() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as s:
                s.bind((self.ifname, 0x0806))
                s.send(frame)

        try:
            call_in_netns(self.netns, send)
        except OSError as exc:
            raise AddressError(f"announcing {self.address} on {self.ifname}: {exc}") from None
