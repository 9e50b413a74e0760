"""Routed mode (`tunnel = vxlan` or `ipip`): the tunnel devices that carry handed-off flows to back ends on
other subnets, as TCPHA's IPIP mode does (the back end holds the VIP on `tunl0`).

Front end: one collect-metadata ("external") device, `tcpha-vxlan` or `tcpha-ipip`. The steering program
(tcpha.bpf.programs.steering with a tunnel id) sets each forwarded packet's tunnel key (the back end's
address) and redirects it to this device, which encapsulates it; the outer packet is routed like any other.

Back end: the device the flows arrive on, holding the VIP as a /32: vxlan: `tcpha-vxlan` (VNI VXLAN_ID,
UDP port VXLAN_PORT, MAC TUNNEL_MAC: the inner frames the front end sends are addressed to it, the
same on every back end, since the tunnel key, not the MAC, picks the back end); ipip: the kernel's
`tunl0`, as TCPHA. Its reverse-path filter is set to loose: the client's packets arrive on the tunnel
but the answers leave by the LAN. ARP filtering on the LAN interface stays (tcpha.steering.arp): Linux
would otherwise answer ARP for any local address, the VIP included.

The ipip kernel module may be absent (this project's CI kernel has no ipip): `tunnel_possible` says so in
one line, and the daemons refuse `tunnel = ipip` at start with it. The underlay must carry the
encapsulation overhead (50 bytes vxlan, 20 ipip) on top of the client's packets, or the client's MSS be
clamped: the front end does not fragment for it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .netns import call_in_netns

log = logging.getLogger(__name__)

__all__ = ["TUNNELS", "TUNNEL_MAC", "VXLAN_ID", "VXLAN_PORT", "TunnelError", "FrontTunnel", "BackTunnel",
           "tunnel_possible", "tunnel_remote", "backend_tunnel_devices"]

TUNNELS = ("none", "vxlan", "ipip")
VXLAN_ID = 0x7C_4A                       # the VNI of tcpha's flows
VXLAN_PORT = 4789                        # IANA's VXLAN port
TUNNEL_MAC = "02:74:63:70:68:61"         # "\x02tcpha": the back ends' vxlan device (locally administered)
FE_DEVICE = {"vxlan": "tcpha-vxlan", "ipip": "tcpha-ipip"}
BE_DEVICE = {"vxlan": "tcpha-vxlan", "ipip": "tunl0"}


class TunnelError(RuntimeError):
    """A tunnel this kernel or host cannot provide; str(e) is one clear line."""


def backend_tunnel_devices() -> set[str]:
    """The names of the devices a back end holds the VIP on in routed mode."""
    return set(BE_DEVICE.values())


def tunnel_remote(address: str) -> int:
    """A back end's IPv4 address as the steering entry keeps it (host order, as bpf_tunnel_key)."""
    try:
        return int(ipaddress.IPv4Address(address))
    except ValueError:
        raise TunnelError(f"tunnel: back end address {address!r} is not an IPv4 address") from None


def _link_kwargs(kind: str, external: bool) -> dict:
    if kind == "vxlan":
        kw = {"kind": "vxlan", "vxlan_port": VXLAN_PORT}
        if external:
            kw["vxlan_collect_metadata"] = 1
        else:
            kw["vxlan_id"] = VXLAN_ID
            kw["vxlan_learning"] = 0
        return kw
    kw = {"kind": "ipip"}
    if external:
        kw["ipip_collect_metadata"] = 1
    return kw


def _explain(kind: str, exc: NetlinkError) -> str:
    if exc.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL) or "Unknown" in str(exc):
        why = exc.args[-1] if exc.args else exc
        return f"tunnel = {kind}: this kernel has no {kind} tunnels (no {kind} module; creating one: {why})"
    return f"tunnel = {kind}: cannot create the {kind} device: {exc}"


def tunnel_possible(kind: str, *, netns: str | None = None) -> str | None:
    """None if this kernel makes `kind` tunnels, else why not (one line). Checked with a throw-away device."""
    if kind == "none":
        return None
    if kind not in TUNNELS:
        return f"tunnel must be one of {', '.join(TUNNELS)}, not {kind!r}"
    probe = "tcphaprobe0"
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        with contextlib.suppress(NetlinkError):
            for idx in ipr.link_lookup(ifname=probe):
                ipr.link("del", index=idx)
        kw = _link_kwargs(kind, external=kind == "vxlan")
        if kind == "vxlan":
            kw["vxlan_port"] = 0                     # a probe must not take the real port
            kw.pop("vxlan_collect_metadata", None)
            kw["vxlan_id"] = 1
        try:
            ipr.link("add", ifname=probe, **kw)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                # the kernel knows the kind; an equivalent tunnel is there already (ipip: the module's own
                # tunl0 has the same any/any parameters as the probe)
                return None
            return _explain(kind, exc)
        with contextlib.suppress(NetlinkError):
            for idx in ipr.link_lookup(ifname=probe):
                ipr.link("del", index=idx)
    return None


def _sysctl(netns: str | None, ifname: str, key: str, value: str) -> None:
    def body() -> None:
        with open(f"/proc/sys/net/ipv4/conf/{ifname}/{key}", "w") as f:
            f.write(value)
    call_in_netns(netns, body)


class _Device:
    def __init__(self, kind: str, ifname: str, *, external: bool, netns: str | None = None,
                 mac: str | None = None):
        if kind not in ("vxlan", "ipip"):
            raise TunnelError(f"tunnel must be vxlan or ipip here, not {kind!r}")
        self.kind = kind
        self.ifname = ifname
        self.external = external
        self.netns = netns
        self.want_mac = mac
        self.ifindex = 0
        self.mac: str | None = None
        self.created = False

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def install(self) -> None:
        """Create the device (or adopt the one a predecessor left), bring it up. Idempotent."""
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.ifname)
            if not idx:
                kw = _link_kwargs(self.kind, self.external)
                if self.want_mac:
                    kw["address"] = self.want_mac
                try:
                    ipr.link("add", ifname=self.ifname, **kw)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:       # tunl0 appears with the ipip module itself
                        raise TunnelError(_explain(self.kind, exc)) from None
                self.created = self.ifname != "tunl0"
                idx = ipr.link_lookup(ifname=self.ifname)
                if not idx:
                    raise TunnelError(f"tunnel = {self.kind}: {self.ifname} did not appear")
            elif self.want_mac:
                ipr.link("set", index=idx[0], address=self.want_mac)
            self.ifindex = idx[0]
            ipr.link("set", index=self.ifindex, state="up")
            link = ipr.get_links(self.ifindex)[0]
            self.mac = link.get("IFLA_ADDRESS") if self.kind == "vxlan" else None
        # Flows arrive here from clients whose route is elsewhere (the LAN): loose reverse-path check,
        # which wins over a strict conf/all (the kernel takes the larger value).
        _sysctl(self.netns, self.ifname, "rp_filter", "2")
        log.info("tunnel device %s (%s%s) up, ifindex %d", self.ifname, self.kind,
                 ", collect metadata" if self.external else "", self.ifindex)

    def remove(self) -> None:
        """Delete the device if we made it (tunl0 belongs to the kernel: left). Idempotent."""
        if self.ifname == "tunl0":
            return
        with self._ipr() as ipr:
            for idx in ipr.link_lookup(ifname=self.ifname):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=idx)
        self.created = False


class FrontTunnel(_Device):
    """The front end's collect-metadata device the steering program redirects forwarded flows to."""

    def __init__(self, kind: str, *, netns: str | None = None):
        super().__init__(kind, FE_DEVICE.get(kind, "?"), external=True, netns=netns)
        self.tunnel_id = VXLAN_ID if kind == "vxlan" else 0

    def lookup(self) -> None:
        """Fill ifindex and mac from the installed device (a worker's handle)."""
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.ifname)
            if not idx:
                raise TunnelError(f"tunnel = {self.kind}: no device {self.ifname} (is the front end's "
                                  "steering installed?)")
            self.ifindex = idx[0]
            self.mac = ipr.get_links(self.ifindex)[0].get("IFLA_ADDRESS") if self.kind == "vxlan" else None


class BackTunnel(_Device):
    """The back end's device the flows arrive on; the VIP goes on it (tcpha.be.kernelstate)."""

    def __init__(self, kind: str, *, netns: str | None = None):
        super().__init__(kind, BE_DEVICE.get(kind, "?"), external=False, netns=netns,
                         mac=TUNNEL_MAC if kind == "vxlan" else None)
