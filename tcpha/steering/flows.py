"""Steering handed-off flows from the front end to their back end, in the kernel (nftables netdev ingress).

The table, on the FE's LAN interface (for table T, interface eth0, VIP V, ports P):

    table netdev T {
      set frozen  { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; ... }
      map forward { type ipv4_addr . inet_service . ipv4_addr . inet_service : ether_addr;
                    flags dynamic,timeout; ... }
      chain ingress {
        type filter hook ingress device "eth0" priority filter; policy accept;
        ip daddr V tcp dport { P } jump flows
      }
      chain flows {
        tcp flags syn delete @frozen { KEY } delete @forward { KEY : ether daddr } return
                      # KEY = ip saddr . tcp sport . ip daddr . tcp dport; a new connection is the FE's
        ip saddr . tcp sport . ip daddr . tcp dport @frozen drop
        ether daddr set ip saddr . tcp sport . ip daddr . tcp dport map @forward
          ether saddr set FE_MAC
          update @forward { ip saddr . tcp sport . ip daddr . tcp dport timeout FLOW_TIMEOUT : ether daddr }
          fwd to "eth0"
      }
    }

Why netdev ingress and not fwmark + policy routing: it runs before conntrack, routing and the IP stack, so
there is no TTL decrement, no ICMP redirect (send_redirects), no rp_filter, no ip_forward and no conntrack
judging the forwarded ACKs invalid; nothing outside this one table has to change, so install/adopt/remove
touch a single kernel object. The source MAC is rewritten too: with only the destination rewritten, the
bridge/switch learns the client's MAC on the FE's port and the BE's replies to the client get lost.

Keys are the flow's full 4-tuple (client ip . client port . VIP . port), so several VIPs/ports never mix.
A key missing from the map ends the rule: new SYNs and flows the FE still owns reach its own stack.
Every element has a timeout (the safety net when a close report is lost); each forwarded packet refreshes
it, so the forward timeout is an idle timeout and a long download never loses its entry.

Everything lives in the kernel: handed-off flows keep working while the FE process is dead, and a new FE
adopts the table (same name) with its elements instead of duplicating or flushing it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Iterable

from pyroute2 import IPRoute

from .nfnl import NFPROTO_NETDEV, ElementBatch, ElementSocket, NetlinkError, comment_userdata, userdata_comment
from .nft import Nft, NftError

log = logging.getLogger(__name__)

__all__ = ["FlowKey", "FlowSteering", "SteeringError"]

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,31}$")
_IFNAME_RE = re.compile(r"^[^\s/\"']{1,15}$")
_KEY_TYPE = ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"]
_KEY = struct.Struct("!4sH2x4sH2x")
FROZEN_SET = "frozen"
FORWARD_MAP = "forward"
INGRESS_CHAIN = "ingress"
FLOWS_CHAIN = "flows"
MAP_SIZE = 1 << 20
_BATCH_ELEMENTS = 500  # flows per transaction: keeps each netlink message well below 64 KiB
FROZEN_SIZE = 1 << 16
_GET_ELEMENTS = 16     # element reads per netlink send: each answer is an skb of ~4-8 KiB truesize, and
#                       the socket's receive buffer (~208 KiB) must hold them all (else ENOBUFS)


class SteeringError(RuntimeError):
    """Kernel flow steering failed; str(e) is one clear line."""


@dataclass(frozen=True, slots=True)
class FlowKey:
    client_ip: str
    client_port: int
    vip: str
    vport: int

    def nft(self) -> str:
        """The key in nft syntax; validated, since it is spliced into a command."""
        try:
            cip = ipaddress.IPv4Address(self.client_ip)
            vip = ipaddress.IPv4Address(self.vip)
        except ValueError:
            raise SteeringError(f"bad flow {self.client_ip!r} -> {self.vip!r}: not an IPv4 address") from None
        if not (isinstance(self.client_port, int) and isinstance(self.vport, int)
                and 0 < self.client_port < 65536 and 0 < self.vport < 65536):
            raise SteeringError(f"bad flow {cip}:{self.client_port} -> {vip}:{self.vport}: port out of range")
        return f"{cip} . {self.client_port} . {vip} . {self.vport}"

    def key(self) -> bytes:
        """The 16-byte kernel key (each field in a 4-byte slot, network order); validated."""
        try:
            if 0 < self.client_port < 65536 and 0 < self.vport < 65536:
                return _KEY.pack(socket.inet_pton(socket.AF_INET, self.client_ip), self.client_port,
                                 socket.inet_pton(socket.AF_INET, self.vip), self.vport)
        except (OSError, TypeError, struct.error):
            pass
        self.nft()  # raises the precise error
        raise SteeringError(f"bad flow {self}")


def _mac(mac: str) -> str:
    mac = mac.lower()
    if not _MAC_RE.match(mac):
        raise SteeringError(f"not a MAC address: {mac!r}")
    return mac


def _mac_bytes(mac: str) -> bytes:
    raw = _MAC_CACHE.get(mac)
    if raw is None:
        raw = bytes.fromhex(_mac(mac).replace(":", ""))
        if len(_MAC_CACHE) < 4096:
            _MAC_CACHE[mac] = raw
    return raw


_MAC_CACHE: dict[str, bytes] = {}


def handoff_comment(xid: int) -> str:
    """The comment of a forward-map entry: the id of the handoff that made it (fixed width)."""
    return f"handoff {xid:016x}"


def parse_handoff_comment(comment: str | None) -> int:
    """The handoff id in an entry's comment; 0 when it has none (made by a version without ids)."""
    if comment and comment.startswith("handoff "):
        try:
            return int(comment[8:], 16)
        except ValueError:
            return 0
    return 0


def _ms(seconds: float) -> str:
    return f"{max(1, int(round(seconds * 1000)))}ms"


class FlowSteering:
    """The FE's steering table: freeze a flow during its handoff, then forward it to its back end."""

    def __init__(self, *, table: str, ifname: str, vip: str, ports: list[int], netns: str | None = None,
                 flow_timeout: float = 900.0, freeze_timeout: float = 10.0):
        if not _NAME_RE.match(table):
            raise SteeringError(f"bad nft table name {table!r}")
        if not _IFNAME_RE.match(ifname):
            raise SteeringError(f"bad interface name {ifname!r}")
        try:
            self.vip = str(ipaddress.IPv4Address(vip))
        except ValueError:
            raise SteeringError(f"flow steering needs an IPv4 VIP, got {vip!r}") from None
        if not ports or any(not (0 < int(p) < 65536) for p in ports):
            raise SteeringError(f"bad port list {ports!r}")
        if flow_timeout <= 0 or freeze_timeout <= 0:
            raise SteeringError("timeouts must be positive")
        self.table = table
        self.ifname = ifname
        self.ports = sorted({int(p) for p in ports})
        self.netns = netns
        self.flow_timeout = flow_timeout
        self.freeze_timeout = freeze_timeout
        self._nft = Nft(netns)
        self._elements_sock: ElementSocket | None = None
        self._elements_pid = 0
        self._prefix = f"netdev {table}"
        self._flow_ms = max(1, int(round(flow_timeout * 1000)))
        self._freeze_ms = max(1, int(round(freeze_timeout * 1000)))
        self._flow_to = _ms(flow_timeout)
        self._freeze_to = _ms(freeze_timeout)
        self.mac: str | None = None
        self.adopted = False

    # -- lifecycle -------------------------------------------------------------------------------
    def _own_mac(self) -> str:
        with IPRoute(netns=self.netns) if self.netns else IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.ifname)
            if not idx:
                raise SteeringError(f"no interface {self.ifname}" + (f" in namespace {self.netns}" if self.netns else ""))
            mac = ipr.get_links(idx[0])[0].get("IFLA_ADDRESS")
        if not mac:
            raise SteeringError(f"interface {self.ifname} has no MAC address")
        return _mac(mac)

    def _objects(self) -> str:
        t = self._prefix
        key = " . ".join(_KEY_TYPE)
        return "\n".join((
            f"add table {t} {{ comment \"tcpha-fe flow steering\"; }}",
            f"add set {t} {FROZEN_SET} {{ type {key}; flags timeout; timeout {self._freeze_to}; size {FROZEN_SIZE}; }}",
            f"add map {t} {FORWARD_MAP} {{ type {key} : ether_addr; flags dynamic,timeout; "
            f"timeout {self._flow_to}; size {MAP_SIZE}; }}",
            f"add chain {t} {INGRESS_CHAIN} {{ type filter hook ingress device \"{self.ifname}\" "
            f"priority filter; policy accept; }}",
            f"add chain {t} {FLOWS_CHAIN}",
        ))

    def _rules(self) -> str:
        t = self._prefix
        key = "ip saddr . tcp sport . ip daddr . tcp dport"
        ports = ", ".join(str(p) for p in self.ports)
        return "\n".join((
            f"flush chain {t} {INGRESS_CHAIN}",
            f"flush chain {t} {FLOWS_CHAIN}",
            f"add rule {t} {INGRESS_CHAIN} ip daddr {self.vip} tcp dport {{ {ports} }} jump {FLOWS_CHAIN}",
            # A SYN opens a new connection, always the FE's: any entry left for the same 4-tuple belongs to
            # an earlier connection (its removal lost or still pending) and would steal the handshake's
            # ACK and the request, so the SYN removes it. (The data in the map delete is ignored.)
            f"add rule {t} {FLOWS_CHAIN} tcp flags syn delete @{FROZEN_SET} {{ {key} }} "
            f"delete @{FORWARD_MAP} {{ {key} : ether daddr }} return",
            f"add rule {t} {FLOWS_CHAIN} {key} @{FROZEN_SET} drop",
            # The map lookup comes first: on a miss the rule stops before touching the packet.
            f"add rule {t} {FLOWS_CHAIN} ether daddr set {key} map @{FORWARD_MAP} "
            f"ether saddr set {self.mac} "
            f"update @{FORWARD_MAP} {{ {key} timeout {self._flow_to} : ether daddr }} "
            f"fwd to \"{self.ifname}\"",
        ))

    def _compatible(self) -> str | None:
        """None if the existing table has the layout we need (rules aside), else why not."""
        # Listed piece by piece: JSON listings of the rules print warnings in nft 1.0.x, and the chain's
        # device only shows in the text form.
        sets = {o["set"]["name"]: o["set"] for o in self._nft.list_json("sets netdev", terse=True)
                if "set" in o and o["set"].get("table") == self.table}
        maps = {o["map"]["name"]: o["map"] for o in self._nft.list_json("maps netdev", terse=True)
                if "map" in o and o["map"].get("table") == self.table}
        chains = {o["chain"]["name"]: o["chain"] for o in self._nft.list_json("chains netdev")
                  if "chain" in o and o["chain"].get("table") == self.table}
        frozen = sets.get(FROZEN_SET)
        if frozen is None or frozen.get("type") != _KEY_TYPE:
            return f"set {FROZEN_SET} missing or of another type"
        fwd = maps.get(FORWARD_MAP)
        if fwd is None or fwd.get("type") != _KEY_TYPE or fwd.get("map") != "ether_addr":
            return f"map {FORWARD_MAP} missing or of another type"
        if "timeout" not in (fwd.get("flags") or []):
            return f"map {FORWARD_MAP} without timeouts"
        ingress = chains.get(INGRESS_CHAIN)
        if ingress is None or ingress.get("hook") != "ingress":
            return f"chain {INGRESS_CHAIN} missing or not an ingress hook"
        text = self._nft.list_text(f"chain {self._prefix} {INGRESS_CHAIN}")
        m = re.search(r'hook ingress (?:device "([^"]+)"|devices = \{([^}]*)\})', text)
        devices = ([m.group(1)] if m.group(1) else re.findall(r'"([^"]+)"', m.group(2))) if m else []
        if devices != [self.ifname]:
            return f"chain {INGRESS_CHAIN} hooked on {devices or 'another device'}, not {self.ifname}"
        if FLOWS_CHAIN not in chains:
            return f"chain {FLOWS_CHAIN} missing"
        return None

    def install(self) -> None:
        """Create the table, or adopt the one a crashed predecessor left (its elements keep working).

        Adopting replaces the rules (VIP, ports, MAC may have changed) in one atomic transaction and keeps
        every set and map element. A table of the same name with an incompatible layout is replaced.
        """
        self.mac = self._own_mac()
        try:
            if self._nft.table_exists("netdev", self.table):
                why = self._compatible()
                if why is None:
                    self._nft.run(self._rules())
                    self.adopted = True
                    log.info("adopted nft table netdev %s (%d forwarded flows kept)", self.table, self.entries())
                    return
                log.warning("nft table netdev %s exists but %s: replacing it", self.table, why)
                self._nft.run(f"delete table {self._prefix}\n{self._objects()}\n{self._rules()}")
                self.adopted = False
                return
            self._nft.run(f"{self._objects()}\n{self._rules()}")
        except NftError as exc:
            raise SteeringError(f"installing nft table netdev {self.table} on {self.ifname}: {exc}") from None
        self.adopted = False

    def remove(self) -> None:
        """Delete the table (handed-off flows then reach the FE again, which resets them). Idempotent."""
        try:
            self._nft.run(f"delete table {self._prefix}")
        except NftError as exc:
            if not exc.missing:
                raise SteeringError(f"removing nft table netdev {self.table}: {exc}") from None

    def installed(self) -> bool:
        return self._nft.table_exists("netdev", self.table)

    # -- per-flow operations (hot path: one nfnetlink transaction each, ~15 µs of CPU) -----------------
    # Element changes go over raw nfnetlink (tcpha.steering.nfnl): libnftables re-reads its cache from
    # the kernel on every call and costs 10-50x more. Each call is one atomic transaction.
    def _send(self, batch: ElementBatch, what: str) -> None:
        sock = self._element_socket()
        try:
            sock.run(batch)
        except NetlinkError as exc:
            hint = " (is the table installed?)" if exc.errno == 2 else ""
            raise SteeringError(f"{what}: {exc}{hint}") from None

    def freeze(self, flow: FlowKey) -> None:
        """Drop the flow's incoming packets (the client retransmits them) until thaw() or forward()."""
        batch = ElementBatch()
        batch.add(NFPROTO_NETDEV, self.table, FROZEN_SET, [(flow.key(), None, self._freeze_ms)])
        self._send(batch, "freezing flow")

    def freeze_many(self, flows: Iterable[FlowKey]) -> None:
        """freeze() for many flows, one transaction per _BATCH_ELEMENTS flows."""
        elems = [(f.key(), None, self._freeze_ms) for f in flows]
        for i in range(0, len(elems), _BATCH_ELEMENTS):
            batch = ElementBatch()
            batch.add(NFPROTO_NETDEV, self.table, FROZEN_SET, elems[i:i + _BATCH_ELEMENTS])
            self._send(batch, "freezing flows")

    def thaw(self, flow: FlowKey) -> None:
        """Let the flow's packets reach this host again. Idempotent."""
        batch = ElementBatch()
        batch.destroy(NFPROTO_NETDEV, self.table, FROZEN_SET, [flow.key()])
        self._send(batch, "thawing flow")

    def forward(self, flow: FlowKey, be_mac: str) -> None:
        """Send the flow's later packets to the back end with MAC `be_mac`; also thaws it. Atomic."""
        self.forward_many([(flow, be_mac)])

    def forward_many(self, flows: Iterable[tuple[FlowKey, str] | tuple[FlowKey, str, int]]) -> None:
        """forward() for many flows, one transaction (all or none) per _BATCH_ELEMENTS flows.

        A flow given as (flow, MAC, handoff id) has the id stored with its entry (element comment
        ``handoff <id>``, see handoff_comment), so that a late close report of an earlier connection on
        the same 4-tuple can be told apart (unforward_closed)."""
        adds, keys, udata = self._forward_elements(flows)
        if not adds:
            return
        for i in range(0, len(adds), _BATCH_ELEMENTS):
            chunk = keys[i:i + _BATCH_ELEMENTS]
            batch = ElementBatch()
            # An entry already there for the same 4-tuple belongs to an earlier connection that ended (the
            # FE has just accepted this one), its removal still pending: replace it, in the same transaction.
            batch.destroy(NFPROTO_NETDEV, self.table, FORWARD_MAP, chunk)
            batch.add(NFPROTO_NETDEV, self.table, FORWARD_MAP, adds[i:i + _BATCH_ELEMENTS],
                      None if udata is None else udata[i:i + _BATCH_ELEMENTS])
            batch.destroy(NFPROTO_NETDEV, self.table, FROZEN_SET, chunk)
            self._send(batch, "forwarding flows")

    def _forward_elements(self, flows: Iterable[tuple]) -> tuple[list, list[bytes], list[bytes] | None]:
        adds, keys, udata = [], [], []
        for item in flows:
            key = item[0].key()
            adds.append((key, _mac_bytes(item[1]), self._flow_ms))
            keys.append(key)
            udata.append(comment_userdata(handoff_comment(item[2])) if len(item) > 2 and item[2] else b"")
        return adds, keys, (udata if any(udata) else None)

    def freeze_forward(self, freezes: list[FlowKey], forwards: list[tuple]) -> None:
        """freeze_many(freezes) and forward_many(forwards) in one transaction (all or none).

        The front end's loop often has new connections to freeze and Restored answers to forward in
        the same wake-up: one transaction instead of two (each costs a netlink round trip and a
        commit in the kernel). Too many flows for one message: the two calls, one after the other.
        """
        if not freezes or not forwards or len(freezes) + len(forwards) > _BATCH_ELEMENTS:
            self.forward_many(forwards)
            self.freeze_many(freezes)
            return
        adds, keys, udata = self._forward_elements(forwards)
        batch = ElementBatch()
        batch.destroy(NFPROTO_NETDEV, self.table, FORWARD_MAP, keys)     # as in forward_many
        batch.add(NFPROTO_NETDEV, self.table, FORWARD_MAP, adds, udata)
        batch.destroy(NFPROTO_NETDEV, self.table, FROZEN_SET, keys)
        ms = self._freeze_ms
        batch.add(NFPROTO_NETDEV, self.table, FROZEN_SET, [(f.key(), None, ms) for f in freezes])
        self._send(batch, "freezing and forwarding flows")

    def handoffs(self, flows: list[FlowKey]) -> list[int | None]:
        """Per flow, the handoff id stored with its entry: 0 for an entry without one, None for no entry."""
        sock = self._element_socket()
        keys = [f.key() for f in flows]
        found: list = []
        try:
            # chunks: each key is answered with two messages, which must fit the socket's receive buffer
            for i in range(0, len(keys), _GET_ELEMENTS):
                found += sock.get_userdata(NFPROTO_NETDEV, self.table, FORWARD_MAP, keys[i:i + _GET_ELEMENTS])
        except OSError as exc:                 # NetlinkError, or the socket's own (ENOBUFS)
            raise SteeringError(f"reading entries of nft table netdev {self.table}: {exc}") from None
        return [None if u is False else parse_handoff_comment(userdata_comment(u) if u else None) for u in found]

    def unforward_closed(self, closed: list[tuple[FlowKey, int]]) -> list[FlowKey]:
        """Remove the entries of flows whose connection ended, as reported by their back end with the
        handoff id; an entry holding another handoff's id belongs to a newer connection of the client on
        the same 4-tuple (it reused its port before the report came) and stays. Id 0 (a back end that
        sends none) and entries without an id are removed unconditionally, as before ids existed.
        Returns the flows whose report was stale (entry kept).

        The check and the removal are two netlink round trips, not one transaction: a newer connection
        steered between them (a whole handshake and handoff within microseconds) would still lose its
        entry; the window of the old scheme was FLOWCLOSED_DELAY, half a second."""
        with_id = [(f, xid) for f, xid in closed if xid]
        try:
            current = self.handoffs([f for f, _ in with_id]) if with_id else []
        except (SteeringError, OSError) as exc:
            # Entries left behind would steer the client's next connection on that 4-tuple astray
            # until flowtimeout: remove them unchecked, as before ids existed.
            log.warning("reading the handoff ids of %d closed flows failed (%s): removed unchecked", len(with_id), exc)
            current = []
        stale = [f for (f, xid), now in zip(with_id, current) if now and now != xid]
        kept = set(stale)
        self.unforward_many([f for f, _ in closed if f not in kept])
        return stale

    def unforward(self, flow: FlowKey) -> None:
        """Forget the flow (its connection ended). Idempotent: a flow already gone is fine."""
        batch = ElementBatch()
        batch.destroy(NFPROTO_NETDEV, self.table, FORWARD_MAP, [flow.key()])
        self._send(batch, "unforwarding flow")

    def unforward_many(self, flows: Iterable[FlowKey]) -> None:
        keys = [f.key() for f in flows]
        if not keys:
            return
        for i in range(0, len(keys), _BATCH_ELEMENTS):
            batch = ElementBatch()
            batch.destroy(NFPROTO_NETDEV, self.table, FORWARD_MAP, keys[i:i + _BATCH_ELEMENTS])
            self._send(batch, "unforwarding flows")

    def close(self) -> None:
        """Release this handle's sockets (the kernel objects stay: see remove())."""
        if self._elements_sock is not None:
            self._elements_sock.close()
            self._elements_sock = None
        self._nft.close()

    # -- inspection (netlink dumps: fast even with 100k flows, unlike listing through libnftables) ---
    def _element_socket(self) -> ElementSocket:
        sock = self._elements_sock
        if sock is None or self._elements_pid != os.getpid():
            # (Re)open after a fork too: two processes sharing one netlink socket would read each other's acks.
            sock = self._elements_sock = ElementSocket(self.netns)
            self._elements_pid = os.getpid()
        return sock

    def _dump(self, name: str, keys: bool) -> tuple[int, list[tuple[bytes, bytes | None]]]:
        sock = self._element_socket()
        try:
            return sock.dump_elements(NFPROTO_NETDEV, self.table, name, keys=keys)
        except NetlinkError as exc:
            raise SteeringError(f"listing {name} of nft table netdev {self.table}: {exc}") from None

    def entries(self) -> int:
        """Number of flows in the forward map (a kernel dump: O(n), ~1 s per 100k flows; for status output)."""
        return self._dump(FORWARD_MAP, False)[0]

    def frozen_entries(self) -> int:
        return self._dump(FROZEN_SET, False)[0]

    def forwarded(self) -> dict[FlowKey, str]:
        """The forward map as {flow: BE MAC} (for status output and tests)."""
        out: dict[FlowKey, str] = {}
        for key, mac in self._dump(FORWARD_MAP, True)[1]:
            cip, cport, vip, vport = _KEY.unpack(key)
            out[FlowKey(socket.inet_ntoa(cip), cport, socket.inet_ntoa(vip), vport)] = (mac or b"").hex(":")
        return out
