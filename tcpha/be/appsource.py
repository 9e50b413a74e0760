"""Which address the back end's connection to the application comes from (`appsource`).

- local: from this host's own address (the kernel's choice), as before: the application sees the back
  end as its client.
- transparent: from the client's own address and port, as HAProxy's `source 0.0.0.0 usesrc clientip`.
  The socket is IP_TRANSPARENT (CAP_NET_ADMIN) so that it may bind an address that is not this host's,
  and carries the fwmark APPSOURCE_MARK (SO_MARK). The application's replies go to the client's address,
  which is not local: without more they would be routed out towards the real client. Policy routing
  brings them back to our socket instead:
    * net.ipv4.tcp_fwmark_accept = 1: the application's accepted socket takes the mark of the SYN that
      opened it (ours; a SYN from the network carries none), so its SYN-ACK and every later packet are
      routed with it (before any firewall hook: this works for 127.0.0.1 too, where a reply rerouted
      by a firewall mark would already have failed its first route lookup);
    * `ip rule fwmark APPSOURCE_MARK lookup APPSOURCE_TABLE` (priority RULE_PRIORITY), and in that
      table `local 0.0.0.0/0 dev lo`: a marked packet to any address is delivered here, where the
      transparent socket is its established socket.
  No conntrack, no per-packet firewall rule: nothing costs anything per packet, and the rule and route
  are installed once at start and removed at stop (pyroute2, never a subprocess per connection). A
  start after a kill -9 removes the rules and routes the dead process left (its fwmark and table) and
  installs them again. tcp_fwmark_accept is set back to 0 at stop if it was 0 at start (after a kill -9
  it stays 1: harmless, it only concerns SYNs that carry a mark).
- auto (the default): transparent where it works, else local. Checked once at start by a real
  transparent connection from TEST_SOURCE (TEST-NET-1) to a listener of our own on the application's
  address; the start-up log line says which mode is in use and why.

A client whose port is already in use towards the application (an earlier connection from the same
client port still in TIME_WAIT, or the client itself connected to the application from that port) cannot
be connected from that 4-tuple: that connection alone is made from our own address, logged and counted
(AppSource.fallbacks).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tcpha.loglevels import NOTICE
from tcpha.proxyproto import proxy_header
from tcpha.sockdiag import SocketLookup

log = logging.getLogger("tcpha.be")

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
APPSOURCE_MARK = 0x74636861          # "tcha": the fwmark of transparent application connections
APPSOURCE_TABLE = 2914               # the routing table holding `local 0.0.0.0/0 dev lo`
RULE_PRIORITY = 110                  # after the local table (0), before main (32766)
TEST_SOURCE = "192.0.2.1"            # TEST-NET-1 (RFC 5737): the start-up check's client address
CHECK_TIMEOUT = 2.0
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"
MODES = ("auto", "transparent", "local")


class AppSourceError(RuntimeError):
    """Transparent application connections were asked for (appsource = transparent) and cannot work here."""


class RoutingPolicy:
    """The fwmark rule, the local route of APPSOURCE_TABLE and tcp_fwmark_accept, in this namespace.
    Netlink work (pyroute2): call it outside a running asyncio loop."""

    def __init__(self) -> None:
        self._restore_fwmark_accept: str | None = None
        self.installed = False
        self.replaced = 0                  # rules/routes a previous process left (kill -9), removed first

    def install(self) -> None:
        with IPRoute() as ipr:
            self.replaced = self._remove_ours(ipr)
            lo = ipr.link_lookup(ifname="lo")
            if not lo:
                raise OSError(errno.ENODEV, "no lo interface")
            ipr.route("add", dst="0.0.0.0/0", type="local", oif=lo[0], table=APPSOURCE_TABLE,
                      proto="static", scope="host")
            ipr.rule("add", family=socket.AF_INET, fwmark=APPSOURCE_MARK, table=APPSOURCE_TABLE,
                     priority=RULE_PRIORITY)
        self.installed = True
        with open(FWMARK_ACCEPT) as f:
            previous = f.read().strip()
        if previous != "1":
            with open(FWMARK_ACCEPT, "w") as f:
                f.write("1")
            self._restore_fwmark_accept = previous

    def remove(self) -> None:
        if self._restore_fwmark_accept is not None:
            try:
                with open(FWMARK_ACCEPT, "w") as f:
                    f.write(self._restore_fwmark_accept)
            except OSError as e:
                log.error("tcp_fwmark_accept not restored: %s", e)
            self._restore_fwmark_accept = None
        if self.installed:
            with IPRoute() as ipr:
                self._remove_ours(ipr)
            self.installed = False

    @staticmethod
    def _remove_ours(ipr: Any) -> int:
        """Remove every rule pointing at APPSOURCE_TABLE with our mark, and the table's routes."""
        removed = 0
        for rule in ipr.get_rules(family=socket.AF_INET):
            if rule.get_attr("FRA_TABLE") == APPSOURCE_TABLE and rule.get_attr("FRA_FWMARK") == APPSOURCE_MARK:
                try:
                    ipr.rule("del", family=socket.AF_INET, fwmark=APPSOURCE_MARK, table=APPSOURCE_TABLE,
                             priority=rule.get_attr("FRA_PRIORITY"))
                    removed += 1
                except NetlinkError as e:
                    if e.code != errno.ENOENT:
                        raise
        for route in ipr.get_routes(family=socket.AF_INET, table=APPSOURCE_TABLE):
            if route.get_attr("RTA_TABLE") != APPSOURCE_TABLE:
                continue
            try:
                ipr.route("del", dst=f"{route.get_attr('RTA_DST') or '0.0.0.0'}/{route['dst_len']}",
                          type=route["type"], scope=route["scope"], table=APPSOURCE_TABLE,
                          oif=route.get_attr("RTA_OIF"))
                removed += 1
            except NetlinkError as e:
                if e.code != errno.ENOENT:
                    raise
        return removed


# States of an application socket to client:port that do not clash with our connect from that port.
_NO_CLASH_STATES = (6, 10)           # TCP_TIME_WAIT (a new SYN may reuse it), TCP_LISTEN (no connection)


def _transparent_socket(source: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, APPSOURCE_MARK)
        # An earlier connection from this client port may linger in TIME_WAIT; connect() decides.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(source)
    except BaseException:
        sock.close()
        raise
    return sock


def is_local_address(ip: str) -> bool:
    """True when `ip` is an address of this host (a socket may bind it without IP_TRANSPARENT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def check_transparent(app_ip: str, timeout: float = CHECK_TIMEOUT) -> None:
    """A real transparent connection from TEST_SOURCE to a listener of ours on `app_ip`; OSError with the
    reason when it does not arrive from TEST_SOURCE (or does not arrive at all)."""
    if not is_local_address(app_ip):
        raise OSError(errno.EADDRNOTAVAIL, f"the application's address {app_ip} is not an address of this host, "
                      "its replies could not be brought back")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((app_ip, 0))
        listener.listen(1)
        listener.settimeout(timeout)
        try:
            sock = _transparent_socket((TEST_SOURCE, 0))
        except PermissionError:
            raise OSError(errno.EPERM, "IP_TRANSPARENT needs CAP_NET_ADMIN") from None
        with sock:
            sock.settimeout(timeout)
            try:
                sock.connect(listener.getsockname())
            except socket.timeout:
                raise OSError(errno.ETIMEDOUT, "a transparent connect got no answer (the replies are not "
                              "routed back: policy routing missing or overridden)") from None
            accepted, peer = listener.accept()
            with accepted:
                if peer[0] != TEST_SOURCE or peer[1] != sock.getsockname()[1]:
                    raise OSError(errno.EPROTO, f"a transparent connect arrived from {peer[0]}:{peer[1]}")
                accepted.sendall(b"\0")
                if sock.recv(1) != b"\0":
                    raise OSError(errno.EPROTO, "the application's reply did not come back")


class AppSource:
    """How application connections are made (`appsource` in force) and the kernel state that needs."""

    def __init__(self, mode: str = "local", reason: str = "appsource = local"):
        self.mode = mode            # "transparent" | "local": what is in use
        self.reason = reason        # why (the start-up log line)
        self.policy: RoutingPolicy | None = None
        self.fallbacks = 0          # transparent connections made from our own address (client port in use)
        self._local: dict[str, bool] = {}
        self._loopback: dict[str, bool] = {}    # per application address: in 127/8 (no lookup needed)
        self._lookup: SocketLookup | None = None

    @property
    def transparent(self) -> bool:
        return self.mode == "transparent"

    @classmethod
    def start(cls, wanted: str, app_addr: tuple[str, int]) -> AppSource:
        """Set up `wanted` (auto | transparent | local) for the application at `app_addr`: the routing
        policy, then the check. AppSourceError when `transparent` was asked for and cannot work."""
        if wanted == "local":
            return cls("local", "appsource = local")
        policy = RoutingPolicy()
        try:
            policy.install()
            check_transparent(app_addr[0])
        except (OSError, NetlinkError) as e:
            try:
                policy.remove()
            except (OSError, NetlinkError) as re:
                log.error("removing the transparent routing policy failed: %s", re)
            why = getattr(e, "strerror", None) or str(e)
            if isinstance(e, NetlinkError):
                why = f"routing policy: {e}"
            if wanted == "transparent":
                raise AppSourceError(f"appsource = transparent: {why}") from None
            return cls("local", f"appsource = auto: transparent connections do not work here: {why}")
        source = cls("transparent", f"appsource = {wanted}: a transparent connect succeeded at start")
        source.policy = policy
        source._local[app_addr[0]] = True
        if policy.replaced:
            log.log(NOTICE, "transparent routing policy: %d rules/routes of an earlier process replaced",
                    policy.replaced)
        return source

    def describe(self) -> str:
        if self.transparent:
            return (f"from the client's address and port (transparent: {self.reason}; "
                    f"fwmark 0x{APPSOURCE_MARK:x}, rule priority {RULE_PRIORITY}, table {APPSOURCE_TABLE})")
        return f"from this host's address ({self.reason})"

    def stop(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
            self._lookup = None
        if self.policy is not None:
            try:
                self.policy.remove()
            except (OSError, NetlinkError) as e:
                log.error("removing the transparent routing policy failed: %s", e)
            self.policy = None

    def _app_is_local(self, ip: str) -> bool:
        known = self._local.get(ip)
        if known is None:           # redirectaddr changed by a reload
            known = self._local[ip] = is_local_address(ip)
        return known

    def _app_connected_to(self, client: tuple[str, int], app_addr: tuple[str, int]) -> bool:
        """True when the application already has a connection with client:port (the client reached it
        directly from that port: our SYN from the same 4-tuple would land in that connection). Only an
        application address outside 127/8 can be reached by a client; the lookup is not made otherwise.
        Whether the address is in 127/8 is worked out once per address, not per connection (parsing it
        with ipaddress costs 4-7 µs, a tenth of what transparency adds to a handoff)."""
        loopback = self._loopback.get(app_addr[0])
        if loopback is None:
            loopback = self._loopback[app_addr[0]] = ipaddress.ip_address(app_addr[0]).is_loopback
        if loopback:
            return False
        try:
            if self._lookup is None:
                self._lookup = SocketLookup()
            state = self._lookup.state(app_addr, client)
        except OSError as e:
            log.debug("socket lookup %s:%d <-> %s:%d failed: %s", *app_addr, *client, e)
            return False
        return state is not None and state not in _NO_CLASH_STATES

    def connect(self, client: tuple[str, int] | None, app_addr: tuple[str, int]) -> tuple[socket.socket, int]:
        """A non-blocking socket connecting to `app_addr`, from `client` when transparent (and possible),
        and connect_ex's result (0, EINPROGRESS, or the error)."""
        if self.transparent and client is not None and self._app_is_local(app_addr[0]):
            sock: socket.socket | None = None
            try:
                if self._app_connected_to(client, app_addr):
                    raise OSError(errno.EADDRINUSE, "the client is connected to the application from that port")
                sock = _transparent_socket((client[0], client[1]))
                sock.setblocking(False)
                rc = sock.connect_ex(app_addr)
            except OSError as e:
                rc = e.errno or errno.EIO
            if rc in (0, errno.EINPROGRESS, errno.EAGAIN):
                assert sock is not None
                return sock, rc
            if sock is not None:
                sock.close()
            if rc not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                return _plain_failed(rc)
            self.fallbacks += 1
            log.warning("application connection for %s:%d made from this host's address: the client's port is "
                        "already in use towards %s:%d (%s)", client[0], client[1], *app_addr, os.strerror(rc))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock, sock.connect_ex(app_addr)


def send_proxy_header(app: socket.socket, version: str, client: tuple[str, int] | None,
                      server: tuple[str, int] | None) -> None:
    """Write the PROXY protocol header (tcpha.proxyproto) first on a just connected application socket.
    It is at most 107 bytes and the socket's send buffer is empty: one send takes it all, or OSError."""
    header = proxy_header(version, client, server)
    sent = app.send(header)
    if sent != len(header):
        raise OSError(errno.EAGAIN, f"PROXY header: {sent} of {len(header)} bytes written")


def _plain_failed(rc: int) -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return sock, rc


def client_address(sock: socket.socket) -> tuple[str, int] | None:
    """The peer of a client socket as (ip, port), None when it has none or is not IPv4."""
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    try:
        if ipaddress.ip_address(peer[0]).version != 4:
            return None
    except ValueError:
        return None
    return peer[0], peer[1]
