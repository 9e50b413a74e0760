"""Keeping a back end quiet about the VIP it holds on `lo` (direct routing).

Two layers, as operators of LVS-DR set them up:
- sysctls arp_ignore=1 (answer ARP only for addresses on the receiving interface) and arp_announce=2
  (use the best local address of the outgoing interface as ARP source, never the VIP), on conf/all and
  on the LAN interface (the kernel uses the larger of the two);
- an nft table of family arp that drops incoming ARP asking for the VIP and any outgoing ARP that
  names the VIP as its sender, so nothing can leak it whatever the sysctls say.

The previous sysctl values are recorded in the table's comment: the table is the kernel-side ownership
record. A restarted back end finding the table adopts it and still knows the values to put back on
remove(), even though it now reads 1/2 in /proc.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re

from .netns import call_in_netns
from .nft import Nft, NftError

log = logging.getLogger(__name__)

__all__ = ["ArpFilter", "ArpFilterError"]

_KEYS = ("arp_ignore", "arp_announce")
_WANTED = {"arp_ignore": "1", "arp_announce": "2"}
_COMMENT_RE = re.compile(r'comment "tcpha-be arp filter; previous: ([^"]*)"')
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,31}$")
_IFNAME_RE = re.compile(r"^[^\s/\"'=,;]{1,15}$")


class ArpFilterError(RuntimeError):
    """Installing or removing the ARP filter failed; str(e) is one clear line."""


def _path(scope: str, key: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{scope}/{key}"


def _read(scope: str, key: str) -> str:
    with open(_path(scope, key)) as f:
        return f.read().strip()


def _write(scope: str, key: str, value: str) -> None:
    with open(_path(scope, key), "w") as f:
        f.write(value)


class ArpFilter:
    def __init__(self, vip: str, ifname: str, *, table: str, netns: str | None = None):
        try:
            self.vip = str(ipaddress.IPv4Address(vip))
        except ValueError:
            raise ArpFilterError(f"ARP filtering needs an IPv4 VIP, got {vip!r}") from None
        if not _NAME_RE.match(table):
            raise ArpFilterError(f"bad nft table name {table!r}")
        if not _IFNAME_RE.match(ifname):
            raise ArpFilterError(f"bad interface name {ifname!r}")
        self.ifname = ifname
        self.table = table
        self.netns = netns
        self._nft = Nft(netns)
        self.adopted = False

    def _scopes(self) -> tuple[str, str]:
        return ("all", self.ifname)

    def _read_all(self) -> dict[str, str]:
        def body() -> dict[str, str]:
            if not os.path.isdir(f"/proc/sys/net/ipv4/conf/{self.ifname}"):
                raise ArpFilterError(f"no interface {self.ifname}")
            return {f"{scope}.{key}": _read(scope, key) for scope in self._scopes() for key in _KEYS}
        return call_in_netns(self.netns, body)

    def _write_all(self, values: dict[str, str]) -> None:
        def body() -> None:
            for name, value in values.items():
                scope, key = name.rsplit(".", 1)
                if os.path.exists(_path(scope, key)):
                    _write(scope, key, value)
        call_in_netns(self.netns, body)

    def _recorded(self) -> dict[str, str] | None:
        """The previous values recorded in an existing table's comment, or None if there is no table."""
        try:
            text = self._nft.list_text(f"table arp {self.table}")
        except NftError as exc:
            if exc.missing:
                return None
            raise
        m = _COMMENT_RE.search(text)
        if not m:
            return {}
        values = {}
        for item in m.group(1).split(","):
            name, _, value = item.partition("=")
            if name and value.isdigit():
                values[name] = value
        return values

    def install(self) -> None:
        """Set the sysctls and the nft arp table; adopt them if a previous instance left them."""
        try:
            recorded = self._recorded()
            current = self._read_all()
            if recorded is None:
                previous = current
                self.adopted = False
            else:
                # Adopting: keep the values recorded by whoever first installed; fill any gaps (e.g. a
                # different interface this time) from what is set now.
                previous = {**current, **recorded}
                self.adopted = True
            record = ",".join(f"{k}={v}" for k, v in previous.items())
            t = f"arp {self.table}"
            iface = f'meta iifname "{self.ifname}" '
            oface = f'meta oifname "{self.ifname}" '
            cmds = []
            if recorded is not None:
                cmds.append(f"delete table {t}")
            cmds += [
                f'add table {t} {{ comment "tcpha-be arp filter; previous: {record}"; }}',
                f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
                f"add chain {t} output {{ type filter hook output priority filter; policy accept; }}",
                f"add rule {t} input {iface}arp daddr ip {self.vip} drop",
                f"add rule {t} output {oface}arp saddr ip {self.vip} drop",
            ]
            self._nft.run("\n".join(cmds))
            wanted = {f"{scope}.{key}": _WANTED[key] for scope in self._scopes() for key in _KEYS}
            self._write_all(wanted)
        except NftError as exc:
            raise ArpFilterError(f"ARP filter for {self.vip} on {self.ifname}: {exc}") from None
        except OSError as exc:
            raise ArpFilterError(f"ARP filter sysctls on {self.ifname}: {exc}") from None

    def remove(self) -> None:
        """Put the recorded sysctl values back and delete the table. Idempotent."""
        try:
            recorded = self._recorded()
            if recorded is None:
                return
            if recorded:
                self._write_all(recorded)
            self._nft.run(f"delete table arp {self.table}")
        except NftError as exc:
            if not exc.missing:
                raise ArpFilterError(f"removing ARP filter table {self.table}: {exc}") from None
        except OSError as exc:
            raise ArpFilterError(f"restoring ARP sysctls: {exc}") from None

    def close(self) -> None:
        """Release this handle's resources (the kernel objects stay: see remove())."""
        self._nft.close()
