"""Finding a back end's MAC address on the LAN (the FE rewrites handed-off flows' frames to it)."""

from __future__ import annotations

import ipaddress
import socket
import time

from pyroute2 import IPRoute

from .netns import call_in_netns

__all__ = ["neighbour_mac", "NeighbourError"]

# NUD states whose lladdr can be used
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE, STALE, DELAY, PROBE, PERMANENT
DISCARD_PORT = 9


class NeighbourError(RuntimeError):
    """The address did not resolve; str(e) is one clear line."""


def _lookup(ipr: IPRoute, ip: str, index: int) -> str | None:
    for msg in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
        if msg.get("NDA_DST") == ip and msg["state"] & _NUD_USABLE and msg.get("NDA_LLADDR"):
            return msg.get("NDA_LLADDR")
    return None


def _provoke(ip: str, ifname: str) -> None:
    # An empty UDP datagram to the discard port makes the kernel resolve the address (ARP) the normal way.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        try:
            s.sendto(b"", (ip, DISCARD_PORT))
        except OSError:
            pass  # EHOSTUNREACH etc.: the poll below reports it


def neighbour_mac(ip: str, ifname: str, *, netns: str | None = None, timeout: float = 1.0) -> str:
    """The MAC of `ip` on `ifname`, from the neighbour table, resolving it first if needed."""
    try:
        ip = str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise NeighbourError(f"not an IPv4 address: {ip!r}") from None
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise NeighbourError(f"no interface {ifname}")
        mac = _lookup(ipr, ip, idx[0])
        if mac:
            return mac
        call_in_netns(netns, _provoke, ip, ifname)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while time.monotonic() < deadline:
            mac = _lookup(ipr, ip, idx[0])
            if mac:
                return mac
            time.sleep(delay)  # polling the neighbour table for the kernel's ARP result
            delay = min(delay * 2, 0.05)
    raise NeighbourError(f"{ip} did not answer ARP on {ifname} within {timeout:g}s")
