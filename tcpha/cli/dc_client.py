"""dc_client: the local distcache agent (options and messages of the original 1.4.x).

Single-dash options, as the original.  Extensions: ``-server``/``-connect`` may be repeated
(failover order), IPv6 addresses, ``-dc NAME`` with ``-server ADDR,dc=NAME`` (data centers), TLS to the
servers (``-tls-cafile``, ``-tls-cert``, ``-tls-key``, ``-tls-checkhost``).  See tcpha.distcache.agent for the
behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable

from tcpha.service import (daemonize, drop_privileges, event_loop_factory, raise_nofile_limit,
                           set_socket_attributes)
from tcpha.cli.dcoptions import DAEMON_USAGE, UsageError, octal, strtoul
from tcpha.distcache.address import DC_NAME, AddressError, listen_socket, parse_address, resolve
from tcpha.distcache.agent import Agent
from tcpha.distcache.tls import ClientTls, TlsError, TlsOptions

DEF_LISTEN = "UNIX:/tmp/scache"
DEF_RETRY = 5000
DEF_IDLE = 0
MIN_RETRY, MAX_RETRY = 1, 3600000
MAX_IDLE = 3600000

# The original's usage text, byte for byte (the extensions are in docs/distcache.md).
USAGE = [
    '',
    "Usage: dc_client [options]      where 'options' are from;",
    '  -daemon            (detach and run in the background)',
    "  -listen <addr>     (listen on address 'addr', def: UNIX:/tmp/scache)",
    "  -server <addr>     (connects to a cache server at 'addr')",
    "  -connect <addr>    (alias for '-server')",
    '  -retry <num>       (retry period (msecs) for cache servers, def: 5000)',
    '  -idle <num>        (idle timeout (msecs) for client connections, def: 0)',
    *DAEMON_USAGE,
    '',
    ' Eg. dc_client -listen UNIX:/tmp/scache -server IP:192.168.2.5:9003',
    ' will listen on a unix domain socket at /tmp/scache and will manage',
    ' forwarding requests and responses to and from the cache server.',
    '',
]


@dataclass
class Settings:
    daemon: bool = False
    user: str | None = None
    listen: str = DEF_LISTEN
    sockowner: str | None = None
    sockgroup: str | None = None
    sockperms: int | None = None
    servers: list[str] = field(default_factory=list)
    retry: int = DEF_RETRY
    idle: int = DEF_IDLE
    pidfile: str | None = None
    killable: bool = False
    upstream_timeout: int = 0     # extension; 0: wait for the server as long as the original does
    dc: str | None = None         # extension: our data center
    tls_cafile: str | None = None  # extension: TLS to the servers (tcpha.distcache.tls)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_checkhost: str | None = None


@dataclass(frozen=True)
class Option:
    """One row of the settings table (gunicorn-style): name, whether it takes a value, how it applies."""
    names: tuple[str, ...]
    takes_arg: bool
    apply: Callable[[Settings, str, str], None]
    doc: str


def _set(attr: str, conv=None):
    def apply(s: Settings, opt: str, value: str) -> None:
        setattr(s, attr, conv(value, opt) if conv else value)
    return apply


OPTIONS: list[Option] = [
    Option(("-daemon",), False, lambda s, o, v: setattr(s, "daemon", True), "detach and run in the background"),
    Option(("-user",), True, _set("user"), "switch to this user after the listening socket is made"),
    Option(("-listen",), True, _set("listen"), "local address to accept clients on"),
    Option(("-sockowner",), True, _set("sockowner"), "owner of the UNIX socket file"),
    Option(("-sockgroup",), True, _set("sockgroup"), "group of the UNIX socket file"),
    Option(("-sockperms",), True, _set("sockperms", octal), "permissions (octal) of the UNIX socket file"),
    Option(("-server", "-connect"), True, lambda s, o, v: s.servers.append(v),
           "cache server address (repeat for failover, an extension)"),
    Option(("-retry",), True, _set("retry", lambda v, o: strtoul(v, o, MIN_RETRY, MAX_RETRY)),
           "reconnect period in ms while the server is unreachable (1..3600000)"),
    Option(("-idle",), True, _set("idle", lambda v, o: strtoul(v, o, 0, MAX_IDLE)),
           "close client connections idle this many ms (0 = never)"),
    Option(("-pidfile",), True, _set("pidfile"), "write the process id to this file"),
    Option(("-killable",), False, lambda s, o, v: setattr(s, "killable", True),
           "exit cleanly on SIGUSR1/SIGUSR2"),
    Option(("-upstream-timeout",), True, _set("upstream_timeout", lambda v, o: strtoul(v, o, 0, MAX_IDLE)),
           "extension: drop a server that leaves a request unanswered this many ms (0 = never)"),
    Option(("-dc",), True, _set("dc", lambda v, o: _dc_name(v, o)),
           "extension: our data center; the -server ADDR,dc=NAME of this one are preferred"),
    Option(("-tls-cafile",), True, _set("tls_cafile"),
           "extension: TLS to the servers, whose certificates must chain to these CAs (PEM)"),
    Option(("-tls-cert",), True, _set("tls_cert"), "extension: the client certificate to present (PEM)"),
    Option(("-tls-key",), True, _set("tls_key"), "extension: the private key of -tls-cert (PEM)"),
    Option(("-tls-checkhost",), True, _set("tls_checkhost"),
           "extension: the name the server certificate must carry (default: the address's host)"),
]
_BY_NAME = {name: opt for opt in OPTIONS for name in opt.names}


# A data center given after a server address: "IP:10.0.0.5:9001,dc=east" (a comma is in no host
# name, IP address or port, and a UNIX path ending in ",dc=..." is not worth supporting).
_SERVER_DC = re.compile(r"^(?P<addr>.*),dc=(?P<dc>[^,]*)$")


def _dc_name(text: str, opt: str) -> str:
    if not DC_NAME.fullmatch(text):
        raise UsageError(f"Error, {opt} given an invalid argument")
    return text


def split_server_dc(text: str) -> tuple[str, str | None]:
    """``ADDR,dc=NAME`` -> (ADDR, NAME); ``ADDR`` -> (ADDR, None).  Raises UsageError on a bad NAME."""
    m = _SERVER_DC.match(text)
    if m is None:
        return text, None
    return m.group("addr"), _dc_name(m.group("dc"), "-server")


def parse_args(argv: list[str]) -> Settings | None:
    """Settings, or None when help was asked.  Raises UsageError."""
    s = Settings()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "-help", "-?"):
            return None
        opt = _BY_NAME.get(a)
        if opt is None:
            raise UsageError(f'Error, "{a}" not recognised')
        value = ""
        if opt.takes_arg:
            if i + 1 >= len(argv):
                raise UsageError(f"Error, {a} requires an argument")
            i += 1
            value = argv[i]
        opt.apply(s, a, value)
        i += 1
    return s


def _usage() -> None:
    sys.stderr.write("\n".join(USAGE) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        s = parse_args(args)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        _usage()
        return 1
    if s is None:
        _usage()
        return 0
    if not s.servers:
        sys.stderr.write("Error, no server specified!\n")
        return 1
    try:
        # Files read now: after -user they may be unreadable.
        tls = ClientTls.from_options(TlsOptions(s.tls_cafile, s.tls_cert, s.tls_key, s.tls_checkhost))
    except TlsError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    logging.basicConfig(level=os.environ.get("TCPHA_LOG_LEVEL", "WARNING").upper(),
                        format="dc_client[%(process)d] %(levelname)s %(message)s")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if not s.killable:
        # Rule (original): without -killable, SIGUSR1 and SIGUSR2 are caught and ignored.
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
    log = logging.getLogger("tcpha.distcache.agent")
    # The original's order and lines: the listen address first, then the server address.
    try:
        laddr = parse_address(s.listen)
        if laddr.kind == "fd" and len(laddr.fds) != 1:
            raise AddressError("FD:r:w cannot listen")
        lsock = listen_socket(laddr)
    except AddressError as exc:
        log.debug("%s", exc)
        sys.stderr.write("Error, bad listen address\n")
        return 1
    unix_path = laddr.path if laddr.kind == "unix" else None
    servers = []
    server_dcs = []
    for text in s.servers:
        try:
            text, server_dc = split_server_dc(text)
        except UsageError as exc:
            lsock.close()
            if unix_path:
                _unlink(unix_path)
            sys.stderr.write(f"{exc}\n")
            return 1
        server_dcs.append(server_dc)
        try:
            addr = parse_address(text)
            if addr.kind == "ip" and addr.host is None:
                raise AddressError(f"cannot connect to '{text}': IP:port is a listen-only address")
            if addr.kind == "ip":
                resolve(addr)
        except AddressError as exc:
            log.debug("%s", exc)
            lsock.close()
            if unix_path:
                _unlink(unix_path)
            sys.stderr.write("Error, internal initialisation problems\n")
            return 1
        servers.append(addr)
    if unix_path:
        set_socket_attributes(unix_path, s.sockowner, s.sockgroup, s.sockperms)
    if s.daemon:
        try:
            daemonize()
        except OSError:
            sys.stderr.write("Error, couldn't detach!\n")
            return 1
    if s.pidfile:
        try:
            with open(s.pidfile, "w") as fp:
                fp.write(str(os.getpid()))  # the pid, no newline (as the original)
        except OSError:
            sys.stderr.write(f"Error, couldn't open 'pidfile' at '{s.pidfile}'.\n")
            return 1
    if s.user:
        # Rule: the user switch comes after the listening socket is made (so it can be a
        # privileged port or a root-only directory) and before any server connection.
        try:
            drop_privileges(s.user)
        except (KeyError, OSError) as exc:
            log.debug("%s", exc)
            sys.stderr.write(f"Error, couldn't become user '{s.user}'.\n")
            return 1

    raise_nofile_limit()     # many local clients: as many descriptors as the hard limit permits
    agent = Agent(lsock, servers, retry_ms=s.retry, idle_ms=s.idle, upstream_timeout_ms=s.upstream_timeout,
                  dc=s.dc, server_dcs=server_dcs, tls=tls)

    def show_counters() -> None:
        # Extension: operations forwarded per data center and per server, on SIGHUP and at exit.
        try:
            sys.stderr.write(agent.counters_line() + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        loop.add_signal_handler(signal.SIGHUP, show_counters)
        if s.killable:
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve())
    finally:
        if unix_path:
            _unlink(unix_path)
    show_counters()
    return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
