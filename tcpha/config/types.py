"""Value parsers and validators for the settings table.

A parser turns the text after ``key =`` into a Python value and raises ``ValueError`` with a
short message (no key, no file, no line: the loader adds those) when the text is not valid.
A validator receives the parsed value and raises ``ValueError`` the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, Optional

from tcpha.tls.sealing import SessionKeyFile, session_key_file
from tcpha.distcache.address import AddressError, parse_address

Parser = Callable[[str], Any]
Validator = Callable[[Any], None]


def _kind(name: str, value_type: Any) -> Callable[[Parser], Parser]:
    """Declare what a parser returns: ``kind`` is the name the reference shows (int, float, bool, str,
    path, address, port, list of ports, ...), ``value_type`` the Python type of the loaded value (the
    annotation of the FEConfig/BEConfig field). Every parser of the settings table carries both."""
    def mark(parser: Parser) -> Parser:
        parser.kind = name              # type: ignore[attr-defined]
        parser.value_type = value_type  # type: ignore[attr-defined]
        return parser
    return mark

_NUMBER = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)$")


@_kind("address", str)
def ipv4(text: str) -> str:
    """A dotted-quad IPv4 address, returned in canonical form."""
    # The kernel pieces (repair, nft steering, ARP filtering) are IPv4: refuse anything else
    # here rather than fail later in a netlink call.
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"bad IPv4 address {text!r}") from None


@_kind("port", int)
def port(text: str) -> int:
    """A TCP port 1..65535."""
    if not text.isdigit():
        raise ValueError(f"bad port {text!r} (expected a number 1-65535)")
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"bad port {text!r} (expected a number 1-65535)")
    return value


@_kind("port", int)
def port_or_zero(text: str) -> int:
    """A TCP port 1..65535, or 0 for 'off / automatic'."""
    if text == "0":
        return 0
    return port(text)


@_kind("list of ports", list[int])
def port_list(text: str) -> list[int]:
    """One or more ports separated by spaces or commas: ``80 443``."""
    words = [w for w in re.split(r"[\s,]+", text) if w]
    if not words:
        raise ValueError("expected at least one port")
    ports: list[int] = []
    for word in words:
        value = port(word)
        if value in ports:
            raise ValueError(f"port {value} listed twice")
        ports.append(value)
    return ports


@_kind("int", int)
def integer(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"bad integer {text!r}") from None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
               "mib": 1024 ** 2}


@_kind("int", int)
def size(text: str) -> int:
    """A byte count, optionally with a unit: ``16384``, ``16k``, ``1M`` (binary units)."""
    match = _NUMBER.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS or "." in match.group(1):
        raise ValueError(f"bad size {text!r} (expected bytes, e.g. 16384 or 16k)")
    return int(match.group(1)) * _SIZE_UNITS[unit]


_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


@_kind("float", float)
def seconds(text: str) -> float:
    """A duration in seconds, optionally with a unit: ``10``, ``0.5``, ``500ms``, ``5m``, ``1h``."""
    match = _NUMBER.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _TIME_UNITS:
        raise ValueError(f"bad duration {text!r} (expected seconds, e.g. 10, 0.5 or 500ms)")
    return float(match.group(1)) * _TIME_UNITS[unit]


_TRUE = {"1", "yes", "on", "true"}
_FALSE = {"0", "no", "off", "false"}


@_kind("bool", bool)
def boolean(text: str) -> bool:
    """``1``/``0`` as in TCPHA, also yes/no, on/off, true/false."""
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"bad boolean {text!r} (expected 0 or 1)")


@_kind("str", str)
def text(value: str) -> str:
    return value


@_kind("path", str)
def path(value: str) -> str:
    if "\0" in value:
        raise ValueError("a path cannot contain NUL")
    return value


@_kind("path", Optional[str])
def optional_path(value: str) -> str | None:
    """A path, or ``none`` / ``-`` for 'not set'."""
    if value.lower() in ("none", "-", "off"):
        return None
    return path(value)


@_kind("key file", Optional[SessionKeyFile])
def session_keys(value: str) -> SessionKeyFile | None:
    """A session key file read and checked now (tcpha.tls.sealing), or ``none``."""
    return session_key_file(value)


_IFNAME = re.compile(r"^[^\s/:]{1,15}$")


@_kind("interface", Optional[str])
def interface(value: str) -> str | None:
    """A network interface name, or ``auto``."""
    if value.lower() == "auto":
        return None
    if not _IFNAME.match(value):
        raise ValueError(f"bad interface name {value!r} (1-15 characters, no '/', ':' or spaces)")
    return value


def choice(*choices: str) -> Parser:
    def parse(value: str) -> str:
        lowered = value.lower()
        if lowered not in choices:
            raise ValueError(f"bad value {value!r} (expected one of: {', '.join(choices)})")
        return lowered
    parse.__doc__ = "one of " + ", ".join(choices)
    return _kind("choice", str)(parse)


@_kind("address", Optional[tuple[str, int]])
def listen_address(value: str) -> tuple[str, int] | None:
    """``off``, ``PORT`` (on 127.0.0.1) or ``ADDR:PORT``: where to serve an HTTP endpoint."""
    if value.lower() in ("off", "0", "none"):
        return None
    if value.isdigit():
        return ("127.0.0.1", port(value))
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"bad listen address {value!r} (expected off, PORT or ADDR:PORT)")
    return (ipv4(host), port(port_text))


@_kind("address", Optional[str])
def distcache_address(value: str) -> str | None:
    """A distcache address (``UNIX:/path``, ``IP:host:port``), or ``none``."""
    if value.lower() in ("none", "off", "-"):
        return None
    try:
        addr = parse_address(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None
    if addr.kind == "ip" and addr.host is None:
        raise ValueError(f"{value!r} is a listen-only address; name the host to connect to")
    return value


# -- validators -----------------------------------------------------------------------------

def in_range(low: float, high: float | None = None) -> Validator:
    def check(value: float) -> None:
        if value < low or (high is not None and value > high):
            bounds = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"
            raise ValueError(f"{value:g} is out of range (expected {bounds})")
    return check


def not_unspecified(value: str) -> None:
    if value == "0.0.0.0":
        raise ValueError("0.0.0.0 is not allowed here: name a real address")


def absolute_uri_path(value: str) -> None:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ValueError(f"bad HTTP path {value!r} (must start with '/', no spaces)")


def no_check(value: Any) -> None:
    return None
