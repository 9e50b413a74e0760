"""Steering handed-off flows in a tc ingress BPF program: FlowSteering's job without nftables.

The kernel objects, on the FE's LAN interface:

- a clsact qdisc, and on its ingress hook one cls_bpf filter (direct-action) named `tcpha-<table>`
  running the program of tcpha.bpf.programs.steering();
- the program's hash map `flows`: FlowKey.key() -> frozen | forward (back end MAC, source MAC, ifindex),
  with the handoff id and the time of the entry's last packet (the layout is in tcpha/bpf/programs.py).

The program does what the nft table of tcpha.steering.flows does: a frozen flow's packets are dropped, a
forwarded flow's get both MACs rewritten (destination: the back end; source: the interface's own) and
leave through the same interface (bpf_redirect to its egress; no TTL, no checksum touched), a SYN removes
the entry of its 4-tuple (a new connection is the FE's), everything else goes on to the stack.

Per-flow changes are single bpf() map calls (no netlink transaction, no commit): see
bench/results/steering.md. A hash map update is atomic per entry, not across entries: forward_many is
not all-or-none as the nft transaction is (each entry is whole, which is what the data path needs).

Expiry: the program stamps each forwarded packet's time (bpf_ktime_get_ns) into its entry; a sweeper
thread of the process that installed the filter removes forward entries idle for `flow_timeout` and
frozen ones older than `freeze_timeout` (nft's element timeouts). The map's max_entries bounds the table:
a full map refuses the new flow (SteeringError), it never evicts one.

Surviving kill -9: the filter stays attached (it holds the program, the program holds the map), so
handed-off flows keep flowing while no FE runs. The next FE finds the filter by name in the tc filter dump
(its TCA_BPF_ID is the program id), the map through the program's info (map ids) and opens it by id: no
bpffs to mount and nothing left behind in a file system when the interface or namespace goes away. It
then loads the current program on the adopted map and replaces the filter in place (one netlink call).
remove() deletes the filter, and the clsact qdisc when no other filter is left on it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tcpha.bpf import programs
from tcpha.bpf.programs import FLOW_FORWARD, FLOW_FROZEN, FLOW_KEY_SIZE, FLOW_VALUE
from tcpha.bpf.syscall import (MAP_TYPE_HASH, NO_PREALLOC, PROG_TYPE_SCHED_CLS, BpfError, Map, Program,
                               prog_map_ids)

from .flows import _IFNAME_RE, _KEY, _NAME_RE, FlowKey, FlowSteering, SteeringError, _mac, _mac_bytes
from .tunnel import TUNNEL_MAC, TUNNELS, FrontTunnel, TunnelError, tunnel_remote

log = logging.getLogger(__name__)

__all__ = ["BpfFlowSteering", "bpf_steering_possible"]

MAP_SIZE = 1 << 20
SWEEP_DUTY = 20                    # pause between sweeps: at least this many times the last sweep's length
TC_INGRESS = 0xFFFFFFF2            # clsact's ingress hook (parent ffff:fff2)
TCA_OPTIONS, TCA_BPF_NAME, TCA_BPF_ID = 2, 7, 11
FILTER_PRIO = 0xC0DE               # our filter's tc priority (one filter of ours per interface)
FILTER_HANDLE = 1
PROGRAM_NAME = "tcpha_steer"
MAP_NAME = "tcpha_flows"


def bpf_steering_possible() -> str | None:
    """None if this kernel loads the steering program (checked with a throw-away map), else why not."""
    flows = prog = None
    try:
        flows = Map(MAP_TYPE_HASH, FLOW_KEY_SIZE, FLOW_VALUE.size, 16, "tcpha_probe", NO_PREALLOC)
        prog = Program(PROG_TYPE_SCHED_CLS, programs.steering(flows.fd), "tcpha_probe")
        return None
    except OSError as exc:
        return str(exc)
    finally:
        for obj in (prog, flows):
            if obj is not None:
                obj.close()


def _filter_attrs(msg) -> dict[int, bytes]:
    """The TCA_OPTIONS attributes of a filter message by number, read from its raw bytes (pyroute2 0.9
    does not decode TCA_BPF_ID)."""
    raw = bytes(msg.data[msg.offset:msg.offset + msg["header"]["length"]])
    out: dict[int, bytes] = {}
    for kind, value in _attrs(raw, 16 + 20):                 # nlmsghdr, tcmsg
        if kind == TCA_OPTIONS:
            out.update(_attrs(value, 0))
    return out


def _attrs(raw: bytes, pos: int) -> list[tuple[int, bytes]]:
    out = []
    while pos + 4 <= len(raw):
        length, kind = struct.unpack_from("<HH", raw, pos)
        if length < 4:
            break
        out.append((kind & 0x3FFF, raw[pos + 4:pos + length]))
        pos += (length + 3) & ~3
    return out


def _outside_event_loop(fn):
    """Run `fn` in a helper thread when this thread runs an asyncio loop: pyroute2 0.9's synchronous
    IPRoute drives an event loop of its own, which cannot run inside a running one (a worker's)."""
    def wrapper(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(fn, *args, **kwargs).result()
    wrapper.__doc__ = fn.__doc__
    return wrapper


class BpfFlowSteering:
    """The FE's steering table as a tc BPF program and map; the interface of FlowSteering."""

    kind = "bpf"

    def __init__(self, *, table: str, ifname: str, vip: str, ports: list[int], netns: str | None = None,
                 flow_timeout: float = 900.0, freeze_timeout: float = 10.0, capacity: int = MAP_SIZE,
                 sweep_interval: float | None = None, tunnel: str = "none"):
        if not _NAME_RE.match(table):
            raise SteeringError(f"bad steering table name {table!r}")
        if not _IFNAME_RE.match(ifname):
            raise SteeringError(f"bad interface name {ifname!r}")
        if flow_timeout <= 0 or freeze_timeout <= 0:
            raise SteeringError("timeouts must be positive")
        if tunnel not in TUNNELS:
            raise SteeringError(f"tunnel must be one of {', '.join(TUNNELS)}, not {tunnel!r}")
        self.tunnel = tunnel
        # routed mode: forwarded flows leave through this collect-metadata device, encapsulated
        self._tunnel_dev = FrontTunnel(tunnel, netns=netns) if tunnel != "none" else None
        self.table = table
        self.ifname = ifname
        self.vip = vip
        self.ports = sorted({int(p) for p in ports})
        self.netns = netns
        self.flow_timeout = flow_timeout
        self.freeze_timeout = freeze_timeout
        self.capacity = capacity
        self.sweep_interval = sweep_interval or max(0.05, min(1.0, freeze_timeout / 4, flow_timeout / 4))
        self.filter_name = f"tcpha-{table}"
        self.mac: str | None = None
        self.ifindex = 0
        self.adopted = False
        self._flows: Map | None = None
        self._macs = b""
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _link(self, ipr: IPRoute) -> None:
        idx = ipr.link_lookup(ifname=self.ifname)
        if not idx:
            raise SteeringError(f"no interface {self.ifname}" + (f" in namespace {self.netns}" if self.netns else ""))
        self.ifindex = idx[0]
        mac = ipr.get_links(idx[0])[0].get("IFLA_ADDRESS")
        if not mac:
            raise SteeringError(f"interface {self.ifname} has no MAC address")
        self.mac = _mac(mac)

    def _our_filter(self, ipr: IPRoute) -> int | None:
        """The program id of our filter on the interface's ingress hook, or None."""
        try:
            found = ipr.get_filters(index=self.ifindex, parent=TC_INGRESS)
        except NetlinkError:
            return None                      # no clsact qdisc
        for msg in found:
            attrs = _filter_attrs(msg)
            if attrs.get(TCA_BPF_NAME, b"").rstrip(b"\0") == self.filter_name.encode() and TCA_BPF_ID in attrs:
                return struct.unpack("<I", attrs[TCA_BPF_ID][:4])[0]
        return None

    def _adopt_map(self, prog_id: int) -> Map | None:
        try:
            for map_id in prog_map_ids(int(prog_id)):
                flows = Map.by_id(map_id)
                if (flows.name == MAP_NAME and flows.key_size == FLOW_KEY_SIZE
                        and flows.value_size == FLOW_VALUE.size and flows.map_type == MAP_TYPE_HASH):
                    return flows
                flows.close()
        except (OSError, ValueError, TypeError) as exc:
            log.warning("steering filter %s on %s found but its map cannot be opened (%s): replacing it",
                        self.filter_name, self.ifname, exc)
        return None

    def _program(self, flows_fd: int) -> bytes:
        if self._tunnel_dev is None:
            return programs.steering(flows_fd)
        return programs.steering(flows_fd, tunnel_id=self._tunnel_dev.tunnel_id)

    @_outside_event_loop
    def install(self) -> None:
        """Attach the program, or adopt the filter and map a crashed predecessor left (its entries keep working)."""
        if self._tunnel_dev is not None:
            try:
                self._tunnel_dev.install()          # before the program: entries point at its ifindex
            except TunnelError as exc:
                raise SteeringError(str(exc)) from None
        with self._ipr() as ipr:
            self._link(ipr)
            self._macs = b""
            existing = self._our_filter(ipr)
            flows = self._adopt_map(existing) if existing is not None else None
            self.adopted = flows is not None
            try:
                if flows is None:
                    flows = Map(MAP_TYPE_HASH, FLOW_KEY_SIZE, FLOW_VALUE.size, self.capacity, MAP_NAME, NO_PREALLOC)
                prog = Program(PROG_TYPE_SCHED_CLS, self._program(flows.fd), PROGRAM_NAME)
            except OSError as exc:
                if flows is not None:
                    flows.close()
                raise SteeringError(f"loading the steering program for {self.ifname}: {exc}") from None
            try:
                try:
                    ipr.tc("add", "clsact", self.ifindex)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                # replace: creates the filter, or swaps the program of ours in place (no gap)
                ipr.tc("replace-filter", "bpf", self.ifindex, FILTER_HANDLE, fd=prog.fd, name=self.filter_name,
                       parent=TC_INGRESS, prio=FILTER_PRIO, protocol=0x0003, classid=1, direct_action=True)
            except NetlinkError as exc:
                flows.close()
                raise SteeringError(f"attaching the steering program to {self.ifname}: {exc}") from None
            finally:
                prog.close()                     # the filter holds the program, the program the map
        self._flows = flows
        self.capacity = getattr(flows, "max_entries", self.capacity)
        if self.adopted:
            log.info("adopted steering program %s on %s (%d forwarded flows kept)", self.filter_name,
                     self.ifname, self.entries())
        self._start_sweeper()

    @_outside_event_loop
    def remove(self) -> None:
        """Detach the filter (and the clsact qdisc if nothing else uses it). Idempotent."""
        self._stop_sweeper()
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.ifname)
            if not idx:
                return
            self.ifindex = idx[0]
            prog_id = self._our_filter(ipr)
            try:
                if prog_id is not None:
                    ipr.tc("del-filter", "bpf", self.ifindex, FILTER_HANDLE, parent=TC_INGRESS,
                           prio=FILTER_PRIO, protocol=0x0003)
                others = [m for hook in (TC_INGRESS, 0xFFFFFFF3)
                          for m in self._filters(ipr, hook) if m.get_attr("TCA_KIND")]
                if not others and any(q.get_attr("TCA_KIND") == "clsact"
                                      for q in ipr.get_qdiscs(index=self.ifindex)):
                    ipr.tc("del", "clsact", self.ifindex)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL):
                    raise SteeringError(f"removing the steering program from {self.ifname}: {exc}") from None
        if self._tunnel_dev is not None:
            self._tunnel_dev.remove()
        self.close()

    def _filters(self, ipr: IPRoute, parent: int) -> list:
        try:
            return list(ipr.get_filters(index=self.ifindex, parent=parent))
        except NetlinkError:
            return []

    @_outside_event_loop
    def installed(self) -> bool:
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.ifname)
            if not idx:
                return False
            self.ifindex = idx[0]
            return self._our_filter(ipr) is not None

    def close(self) -> None:
        """Release this handle (the kernel objects stay: see remove())."""
        self._stop_sweeper()
        if self._flows is not None:
            self._flows.close()
            self._flows = None

    # -- expiry ----------------------------------------------------------------------------------
    def _start_sweeper(self) -> None:
        self._stop.clear()
        self._sweeper = threading.Thread(target=self._sweep_loop, name=f"sweep-{self.table}", daemon=True)
        self._sweeper.start()

    def _stop_sweeper(self) -> None:
        self._stop.set()
        thread, self._sweeper = self._sweeper, None
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout=5)

    def _sweep_loop(self) -> None:
        wait = self.sweep_interval
        while not self._stop.wait(wait):
            started = time.monotonic()
            try:
                self.sweep()
            except Exception as exc:             # the map closed under us at stop, or a kernel error
                if not self._stop.is_set():
                    log.warning("expiring idle steering entries failed: %s", exc)
            # a sweep is one bpf() call per entry: with many entries, sweep less often (at most ~5% of a
            # CPU; expiry is a safety net, its precision does not matter)
            wait = max(self.sweep_interval, (time.monotonic() - started) * SWEEP_DUTY)

    def sweep(self, now_ns: int | None = None) -> int:
        """Remove entries idle past their timeout; returns how many."""
        flows = self._map()
        now = time.monotonic_ns() if now_ns is None else now_ns
        limits = {FLOW_FORWARD: int(self.flow_timeout * 1e9), FLOW_FROZEN: int(self.freeze_timeout * 1e9)}
        removed = 0
        for key in flows.keys():
            raw = flows.lookup(key)
            if raw is None:
                continue
            last, _xid, state, *_ = FLOW_VALUE.unpack(raw)
            if now - last > limits.get(state, 0):
                removed += flows.delete(key)
        if removed:
            log.debug("expired %d idle steering entries", removed)
        return removed

    # -- per-flow operations (one bpf() map call each) -------------------------------------------
    def _map(self) -> Map:
        if self._flows is None:
            self._open_installed()
        assert self._flows is not None
        return self._flows

    @_outside_event_loop
    def _open_installed(self) -> None:
        """A handle made without install() (a worker, the control plane): open the installed map."""
        with self._ipr() as ipr:
            self._link(ipr)
            prog_id = self._our_filter(ipr)
        if self._tunnel_dev is not None:
            try:
                self._tunnel_dev.lookup()
            except TunnelError as exc:
                raise SteeringError(str(exc)) from None
        flows = self._adopt_map(prog_id) if prog_id is not None else None
        if flows is None:
            raise SteeringError(f"no steering program on {self.ifname} (is it installed?)")
        self._flows = flows

    def _put(self, key: bytes, value: bytes) -> None:
        flows = self._map()
        try:
            flows.update(key, value)
        except BpfError as exc:
            if exc.errno != errno.E2BIG:
                raise SteeringError(f"steering map update: {exc}") from None
            self.sweep()
            try:
                flows.update(key, value)
            except BpfError as again:
                raise SteeringError(f"steering table full ({self.capacity} flows): {again.strerror}") from None

    def _value(self, state: int, mac: bytes = b"\0" * 6, xid: int = 0, remote: int = 0) -> bytes:
        if not self._macs:
            self._map()                          # a handle without install(): finds ifindex and MAC too
            if self._tunnel_dev is not None:
                self._macs = _mac_bytes(self._tunnel_dev.mac or "00:00:00:00:00:00")
            else:
                self._macs = _mac_bytes(self.mac or "00:00:00:00:00:00")
        ifindex = self._tunnel_dev.ifindex if self._tunnel_dev is not None and state == FLOW_FORWARD else self.ifindex
        return FLOW_VALUE.pack(time.monotonic_ns(), xid, state, ifindex, mac, self._macs, remote)

    def _state(self, key: bytes) -> tuple[int, int] | None:
        raw = self._map().lookup(key)
        if raw is None:
            return None
        _last, xid, state, *_ = FLOW_VALUE.unpack(raw)
        return state, xid

    def freeze(self, flow: FlowKey) -> None:
        """Drop the flow's incoming packets (the client retransmits them) until thaw() or forward()."""
        self._put(flow.key(), self._value(FLOW_FROZEN))

    def freeze_many(self, flows: Iterable[FlowKey]) -> None:
        value = self._value(FLOW_FROZEN)
        for f in flows:
            self._put(f.key(), value)

    def thaw(self, flow: FlowKey) -> None:
        """Let the flow's packets reach this host again (a forwarded flow stays forwarded). Idempotent."""
        key = flow.key()
        now = self._state(key)
        if now is not None and now[0] == FLOW_FROZEN:
            self._map().delete(key)

    def forward(self, flow: FlowKey, be_mac: str) -> None:
        """Send the flow's later packets to the back end with MAC `be_mac` (with a tunnel: the back end's
        IPv4 address); also thaws it (one update)."""
        self.forward_many([(flow, be_mac)])

    def forward_many(self, flows: Iterable[tuple[FlowKey, str] | tuple[FlowKey, str, int]]) -> None:
        """forward() for many flows; a third item is the handoff id kept with the entry (see handoffs())."""
        for item in flows:
            xid = item[2] if len(item) > 2 and item[2] else 0
            if self._tunnel_dev is not None:
                try:
                    remote = tunnel_remote(item[1])
                except TunnelError as exc:
                    raise SteeringError(str(exc)) from None
                value = self._value(FLOW_FORWARD, _mac_bytes(TUNNEL_MAC), xid, remote)
            else:
                value = self._value(FLOW_FORWARD, _mac_bytes(item[1]), xid)
            self._put(item[0].key(), value)

    def freeze_forward(self, freezes: list[FlowKey], forwards: list[tuple]) -> None:
        self.forward_many(forwards)
        self.freeze_many(freezes)

    def handoffs(self, flows: list[FlowKey]) -> list[int | None]:
        """Per flow, the handoff id of its forward entry: 0 for an entry without one, None for no entry."""
        out: list[int | None] = []
        for f in flows:
            now = self._state(f.key())
            out.append(now[1] if now is not None and now[0] == FLOW_FORWARD else None)
        return out

    # The check against the handoff ids is the same as the nft class's (see its docstring).
    unforward_closed = FlowSteering.unforward_closed

    def unforward(self, flow: FlowKey) -> None:
        """Forget the flow (its connection ended); a frozen entry (a newer connection mid-handoff) stays."""
        self.unforward_many([flow])

    def unforward_many(self, flows: Iterable[FlowKey]) -> None:
        flows_map = self._map()
        for f in flows:
            key = f.key()
            now = self._state(key)
            if now is not None and now[0] == FLOW_FORWARD:
                flows_map.delete(key)

    # -- inspection ------------------------------------------------------------------------------
    def _entries(self) -> list[tuple[bytes, tuple]]:
        flows = self._map()
        out = []
        for key in flows.keys():
            raw = flows.lookup(key)
            if raw is not None:
                out.append((key, FLOW_VALUE.unpack(raw)))
        return out

    def entries(self) -> int:
        """Number of forwarded flows (one bpf() call per entry; for status output)."""
        return sum(1 for _, v in self._entries() if v[2] == FLOW_FORWARD)

    def frozen_entries(self) -> int:
        return sum(1 for _, v in self._entries() if v[2] == FLOW_FROZEN)

    def forwarded(self) -> dict[FlowKey, str]:
        """The forwarded flows as {flow: BE MAC} (with a tunnel: {flow: BE address}; for status output and tests)."""
        out: dict[FlowKey, str] = {}
        for key, v in self._entries():
            if v[2] == FLOW_FORWARD:
                cip, cport, vip, vport = _KEY.unpack(key)
                target = str(ipaddress.IPv4Address(v[6])) if self._tunnel_dev is not None else v[4].hex(":")
                out[FlowKey(socket.inet_ntoa(cip), cport, socket.inet_ntoa(vip), vport)] = target
        return out

