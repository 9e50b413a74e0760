"""distcache (libnal) address syntax.

The original forms (prefixes are case-sensitive):

=================  ==========================================================
``IP:host:port``   connect to / listen on host (``IPv4:host:port`` is the same)
``IP:port``        listen on all interfaces only; cannot be connected to
``IP::port``       same as ``IP:port``
``UNIX:/path``     a UNIX-domain socket, both ways
``FD:n``           a pre-opened descriptor (listening or connected socket)
``FD:r:w``         a pre-opened pair of descriptors (read, write)
=================  ==========================================================

Extension (the original has no IPv6): ``IP:[v6addr]:port``,
``IPv6:[v6addr]:port``, ``IPv6:v6addr:port`` (the last colon starts the port),
``IPv6:port`` / ``IPv6::port`` (listen on all IPv6 interfaces).

Differences on purpose: a UNIX path longer than the kernel's sun_path limit is
refused (the C code truncates it silently), and the port must be 0..65535 and
made of digits only.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass

__all__ = ["AddressError", "Address", "parse_address", "listen_socket", "connect_socket", "resolve",
           "UNIX_PATH_MAX", "DC_NAME"]

# A data center name, as given with an address (-dc NAME, ADDR,dc=NAME, -dc-map host:port=NAME).
DC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# sun_path is 108 bytes on Linux and needs a terminating NUL for a pathname socket.
UNIX_PATH_MAX = 107


class AddressError(ValueError):
    """A bad address or a failure to use it; str(e) is one clear line."""


@dataclass(frozen=True)
class Address:
    kind: str                    # 'ip' | 'unix' | 'fd'
    host: str | None             # None: all interfaces (listen-only form)
    port: int | None
    path: str | None
    fds: tuple[int, ...]
    text: str
    ipv6: bool = False           # extension: an IPv6 address

    @property
    def listen_only(self) -> bool:
        """True for ``IP:port`` / ``IP::port``: listening on all interfaces, no peer to connect to."""
        return self.kind == "ip" and self.host is None


def _port(text: str, whole: str) -> int:
    # Rule: "Port <= 65535, the whole rest must be the port".
    if not text or not text.isascii() or not text.isdigit():
        raise AddressError(f"bad address '{whole}': port '{text}' is not a number 0..65535")
    value = int(text)
    if value > 65535:
        raise AddressError(f"bad address '{whole}': port {value} is out of range 0..65535")
    return value


def _fd(text: str, whole: str) -> int:
    if not text or not text.isascii() or not text.isdigit():
        raise AddressError(f"bad address '{whole}': descriptor '{text}' is not a number")
    return int(text)


def parse_address(text: str) -> Address:
    """Parse a libnal-style address; raises AddressError (one line) when it is not one."""
    if not isinstance(text, str) or not text:
        raise AddressError("empty address (expected IP:host:port, IP:port, UNIX:/path or FD:n)")
    prefix, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(f"bad address '{text}': expected IP:host:port, IP:port, UNIX:/path or FD:n")
    if prefix in ("IP", "IPv4", "IPv6"):
        return _parse_ip(prefix, rest, text)
    if prefix == "UNIX":
        if not rest:
            raise AddressError(f"bad address '{text}': empty UNIX socket path")
        if "\0" in rest:
            raise AddressError(f"bad address '{text}': NUL byte in UNIX socket path")
        size = len(os.fsencode(rest))
        if size > UNIX_PATH_MAX:
            raise AddressError(
                f"bad address '{text}': UNIX socket path is {size} bytes, the limit is {UNIX_PATH_MAX}")
        return Address("unix", None, None, rest, (), text)
    if prefix == "FD":
        parts = rest.split(":")
        if len(parts) == 1:
            fd = _fd(parts[0], text)
            return Address("fd", None, None, None, (fd,), text)
        if len(parts) == 2:
            return Address("fd", None, None, None, (_fd(parts[0], text), _fd(parts[1], text)), text)
        raise AddressError(f"bad address '{text}': expected FD:n or FD:read:write")
    raise AddressError(
        f"bad address '{text}': unknown prefix '{prefix}' (IP, IPv4, IPv6, UNIX, FD; case-sensitive)")


def _parse_ip(prefix: str, rest: str, whole: str) -> Address:
    if rest.startswith("["):
        # Extension: bracketed IPv6 literal.
        if prefix == "IPv4":
            raise AddressError(f"bad address '{whole}': IPv4: cannot take a bracketed IPv6 address")
        close = rest.find("]")
        if close < 0 or rest[close + 1:close + 2] != ":":
            raise AddressError(f"bad address '{whole}': expected [ipv6-address]:port")
        host = rest[1:close]
        port = _port(rest[close + 2:], whole)
        _check_v6(host, whole)
        return Address("ip", host, port, None, (), whole, ipv6=True)
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host = ""  # IP:port
    port = _port(port_text, whole)
    if prefix == "IPv6":
        if host:
            _check_v6(host, whole)
        return Address("ip", host or None, port, None, (), whole, ipv6=True)
    if ":" in host:
        raise AddressError(f"bad address '{whole}': write IPv6 addresses in brackets, e.g. IP:[::1]:{port}")
    return Address("ip", host or None, port, None, (), whole)


def _check_v6(host: str, whole: str) -> None:
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        raise AddressError(f"bad address '{whole}': '{host}' is not an IPv6 address") from None


def _resolve(addr: Address, *, passive: bool) -> tuple[int, tuple]:
    family = socket.AF_INET6 if addr.ipv6 else socket.AF_INET
    host = addr.host
    if host is None:
        host = "::" if addr.ipv6 else "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, addr.port, family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve '{addr.host}' in '{addr.text}': {exc.strerror}") from None
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


def resolve(addr: Address) -> tuple[int, tuple]:
    """(family, sockaddr) to connect to an IP address; AddressError when the name does not resolve
    (the original resolves when its address is made, and fails there)."""
    return _resolve(addr, passive=False)


def listen_socket(addr: Address, backlog: int = 1024) -> socket.socket:
    """A listening socket for ``addr``; raises AddressError (one line) on failure.

    A UNIX socket file left by a dead server is replaced; a live one is not.
    """
    if addr.kind == "fd":
        if len(addr.fds) != 1:
            raise AddressError(f"cannot listen on '{addr.text}': FD:r:w is for connections, use FD:n")
        try:
            sock = socket.socket(fileno=addr.fds[0])
        except OSError as exc:
            raise AddressError(f"cannot listen on '{addr.text}': {exc.strerror}") from None
        try:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.listen(backlog)
        except OSError as exc:
            sock.detach()
            raise AddressError(f"cannot listen on '{addr.text}': {exc.strerror}") from None
        return sock
    if addr.kind == "unix":
        _clear_stale_unix(addr)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr.path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise AddressError(f"cannot listen on '{addr.text}': {exc.strerror}") from None
        return sock
    family, sockaddr = _resolve(addr, passive=True)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and addr.host is None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise AddressError(f"cannot listen on '{addr.text}': {exc.strerror}") from None
    return sock


def _clear_stale_unix(addr: Address) -> None:
    try:
        st = os.lstat(addr.path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AddressError(f"cannot listen on '{addr.text}': {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressError(f"cannot listen on '{addr.text}': {addr.path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(addr.path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            try:
                os.unlink(addr.path)
            except FileNotFoundError:
                pass
            return
        raise AddressError(f"cannot listen on '{addr.text}': {exc.strerror}") from None
    finally:
        probe.close()
    raise AddressError(f"cannot listen on '{addr.text}': another process is listening there")


def connect_socket(addr: Address, timeout: float | None = None) -> socket.socket:
    """A connected socket for ``addr``; raises AddressError for an address that cannot
    be connected to, and OSError (e.g. ConnectionRefusedError) for network failures."""
    if addr.kind == "fd":
        if len(addr.fds) == 2 and addr.fds[0] != addr.fds[1]:
            raise AddressError(f"cannot use '{addr.text}' as one socket: it names two descriptors")
        try:
            sock = socket.socket(fileno=addr.fds[0])
        except OSError as exc:
            raise AddressError(f"cannot use '{addr.text}': {exc.strerror}") from None
        sock.settimeout(timeout)
        return sock
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    if addr.host is None:
        # Rule: IP:port / IP::port are listen-only.
        raise AddressError(f"cannot connect to '{addr.text}': IP:port is a listen-only address, give a host")
    if addr.port == 0:
        raise AddressError(f"cannot connect to '{addr.text}': port 0")
    family, sockaddr = _resolve(addr, passive=False)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock
