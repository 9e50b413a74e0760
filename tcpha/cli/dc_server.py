"""dc_server: the distcache session cache server (options and messages of the original 1.4.x).

Single-dash options, as the original.  Extensions: ``-sessions`` above 60000,
``-backend URL`` (memory or Redis), ``-persist FILE`` and ``-persist-interval MS``,
``-stall MS``, IPv6 listen addresses, ``-dc NAME`` (data center, shown in the progress line;
SIGHUP prints the progress line at once), ``-check-placement`` with ``-dc-map`` (Redis Cluster:
every primary must have a replica in another data center), ``-tls-cert/-tls-key/-tls-cafile`` (TLS).
See docs/distcache.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from tcpha.service import (daemonize, drop_privileges, event_loop_factory, raise_nofile_limit,
                           set_socket_attributes)
from tcpha.cli.dcoptions import DAEMON_USAGE, UsageError, invalid, octal, strtoul
from tcpha.distcache.address import DC_NAME, AddressError, listen_socket, parse_address
from tcpha.distcache.persist import PersistentStore
from tcpha.distcache.server import DistcacheServer
from tcpha.distcache.store import DEFAULT_SESSIONS, SessionStore
from tcpha.distcache.tls import TlsError, TlsOptions, server_context
from tcpha.distcache.placement import PlacementError, check_cluster_placement, parse_dc_map

# Imported at start, not when -backend is read: after -user the interpreter's files may be unreadable.
try:
    from tcpha.distcache.redis_store import open_store as open_redis_store
except ImportError as exc:  # redis-py missing: only -backend redis... needs it
    open_redis_store = None
    _REDIS_IMPORT_ERROR = str(exc)

MIN_SESSIONS = 64
ORIG_MAX_SESSIONS = 60000          # the original's limit; above it is our extension
MAX_SESSIONS = 100_000_000
MAX_PROGRESS = 1000000
DEF_PERSIST_INTERVAL = 1000
DEF_STALL = 30000

# The original's usage text, byte for byte (the extensions are in docs/distcache.md).
USAGE = [
    '',
    "Usage: dc_server [options]     where 'options' are from;",
    '  -daemon            (detach and run in the background)',
    "  -listen <addr>     (act as a server listening on address 'addr')",
    "  -sessions <num>    (make the cache hold a maximum of 'num' sessions)",
    "  -progress <num>    (report cache progress at least every 'num' operations)",
    *DAEMON_USAGE,
    '',
    '',
    'Eg. dc_server -listen IP:9001',
    '  will start a session cache server listening on port 9001 for all TCP/IP',
    '  interfaces.',
    '',
]


@dataclass
class Settings:
    listen: str | None = None
    sessions: int = DEFAULT_SESSIONS
    progress: int = 0
    daemon: bool = False
    user: str | None = None
    sockowner: str | None = None
    sockgroup: str | None = None
    sockperms: int | None = None
    pidfile: str | None = None
    killable: bool = False
    backend: str = "memory"
    persist: str | None = None
    persist_interval: int = DEF_PERSIST_INTERVAL
    stall: int = DEF_STALL
    dc: str | None = None
    check_placement: bool = False
    dc_map: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_cafile: str | None = None


def _atoi(text: str) -> int:
    """C atoi(): optional blanks and sign, leading digits, the rest ignored; 0 if none."""
    s = text.lstrip(" \t\n\r\f\v")
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    digits = ""
    for ch in s:
        if "0" <= ch <= "9":
            digits += ch
        else:
            break
    return sign * int(digits) if digits else 0


def _sessions(text: str, opt: str) -> int:
    # Original: (unsigned int)atoi(); the range is checked after all options (check_sessions).
    return _atoi(text) & 0xFFFFFFFF


def _progress(text: str, opt: str) -> int:
    # Original: (unsigned long)atoi(), > 1000000 is an error (a negative wraps to huge).
    value = _atoi(text) & 0xFFFFFFFFFFFFFFFF
    if value > MAX_PROGRESS:
        raise invalid(opt)
    return value


def _dc_name(text: str, opt: str) -> str:
    if not DC_NAME.fullmatch(text):
        raise invalid(opt)
    return text


def _strtoul(lo: int, hi: int) -> Callable[[str, str], int]:
    return lambda text, opt: strtoul(text, opt, lo, hi)


@dataclass(frozen=True)
class Option:
    """One row of the settings table (gunicorn-style)."""
    name: str
    attr: str
    takes_arg: bool
    conv: Callable[[str, str], object] | None
    default: object
    doc: str
    extension: bool = False


OPTIONS: list[Option] = [
    Option("-listen", "listen", True, None, None, "address to listen on (required)"),
    Option("-sessions", "sessions", True, _sessions, DEFAULT_SESSIONS,
           "maximum number of sessions held (64..60000 in the original; more is an extension)"),
    Option("-progress", "progress", True, _progress, 0,
           "also print the progress line every N operations (0..1000000; 0 = only once a second on change)"),
    Option("-daemon", "daemon", False, None, False, "detach and run in the background (cwd /, stdio /dev/null)"),
    Option("-user", "user", True, None, None, "switch to this user after listening, detaching and the pidfile"),
    Option("-sockowner", "sockowner", True, None, None, "owner of the UNIX socket file (failure only warns)"),
    Option("-sockgroup", "sockgroup", True, None, None, "group of the UNIX socket file (failure only warns)"),
    Option("-sockperms", "sockperms", True, octal, None, "permissions (octal) of the UNIX socket file"),
    Option("-pidfile", "pidfile", True, None, None, "write the process id (no newline) to this file"),
    Option("-killable", "killable", False, None, False, "exit cleanly on SIGUSR1/SIGUSR2"),
    Option("-backend", "backend", True, None, "memory",
           "memory, or a redis:// rediss:// redis-cluster:// URL", extension=True),
    Option("-persist", "persist", True, None, None,
           "keep sessions in this file across restarts and kill -9 (memory backend)", extension=True),
    Option("-persist-interval", "persist_interval", True, _strtoul(1, 3600000), DEF_PERSIST_INTERVAL,
           "ms between writes (and fdatasync) of the persist file", extension=True),
    Option("-stall", "stall", True, _strtoul(1, 3600000), DEF_STALL,
           "ms after which a connection holding part of a message and sending nothing is closed",
           extension=True),
    Option("-dc", "dc", True, _dc_name, None,
           "our data center: shown in the progress line (SIGHUP prints it at once)", extension=True),
    Option("-check-placement", "check_placement", False, None, False,
           "with -backend redis-cluster://... and -dc-map: report every primary whose replicas are all "
           "in its own data center, exit 1 if any (no -listen needed)", extension=True),
    Option("-dc-map", "dc_map", True, None, None,
           "data centers of the Redis nodes: host:port=DC,... or @FILE (one host:port=DC a line)",
           extension=True),
    # TLS (stunnel's words, see tcpha.distcache.tls): -tls-cert turns it on for the listener.
    Option("-tls-cert", "tls_cert", True, None, None,
           "listen with TLS only, with this certificate (PEM; may hold the key too)", extension=True),
    Option("-tls-key", "tls_key", True, None, None, "the private key of -tls-cert (PEM)", extension=True),
    Option("-tls-cafile", "tls_cafile", True, None, None,
           "require client certificates signed by these CAs (PEM)", extension=True),
]
_BY_NAME = {opt.name: opt for opt in OPTIONS}


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
        if opt.takes_arg:
            # The original prints "-%s" of the option's own name: "Error, --listen requires ...".
            if i + 1 >= len(argv):
                raise UsageError(f"Error, -{a} requires an argument")
            i += 1
            value: object = argv[i]
            if opt.conv is not None:
                value = opt.conv(argv[i], "-" + a)
        else:
            value = True
        setattr(s, opt.attr, value)
        i += 1
    return s


def _usage() -> None:
    sys.stderr.write("\n".join(USAGE) + "\n")


def _err(line: str) -> int:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return 1


def _open_backend(s: Settings):
    """The store for -backend; raises UsageError-like one-line errors as ValueError."""
    url = s.backend
    if url == "memory":
        return SessionStore(s.sessions)
    if url.split("://", 1)[0] in ("redis", "rediss", "redis-cluster", "rediss-cluster") and "://" in url:
        if open_redis_store is None:
            raise ValueError(f"Error, -backend {url}: Redis support is not available ({_REDIS_IMPORT_ERROR})")
        try:
            return open_redis_store(url, s.sessions)
        except ValueError as exc:
            raise ValueError(f"Error, -backend: {exc}") from None
    raise ValueError(f"Error, -backend given an invalid argument ('{url}': expected memory, "
                     "redis://, rediss://, redis-cluster:// or rediss-cluster://)")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        s = parse_args(args)
    except UsageError as exc:
        _err(str(exc))
        _usage()
        return 1
    if s is None:
        _usage()
        return 0
    if s.check_placement:
        return _check_placement(s)
    if s.dc_map is not None:
        return _err("Error, -dc-map is used with -check-placement only")
    if s.listen is None:
        return _err("Error, must provide -listen")
    if not 1 <= s.sessions <= MAX_SESSIONS:
        _err("Error, --sessions given an invalid argument")
        _usage()
        return 1
    if s.sessions < MIN_SESSIONS:
        # The original's cache refuses fewer than 64 sessions with this line (and exit 0: we exit 1).
        return _err("Error, malloc/initialisation failure")
    if s.persist is not None and s.backend != "memory":
        return _err("Error, -persist works with -backend memory only")
    try:
        # Files read now: after -user the key may be unreadable.
        tls = server_context(TlsOptions(s.tls_cafile, s.tls_cert, s.tls_key))
    except TlsError as exc:
        return _err(str(exc))
    logging.basicConfig(level=os.environ.get("TCPHA_LOG_LEVEL", "INFO").upper(), format="%(message)s", stream=sys.stderr)
    # Until the event loop takes them over, these signals stop us cleanly (exit 0) too.
    early = [signal.SIGTERM] + ([signal.SIGUSR1, signal.SIGUSR2] if s.killable else [])
    for sig in early:
        signal.signal(sig, _early_stop)
    if not s.killable:
        # Rule (original): without -killable, SIGUSR1 and SIGUSR2 are caught and ignored.
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
    try:
        addr = parse_address(s.listen)
        sock = listen_socket(addr)
    except AddressError as exc:
        # The original's line, without a reason (set TCPHA_LOG_LEVEL=DEBUG for it); the
        # original then exits 0 (1 with -killable), we always exit 1.
        logging.getLogger("tcpha.distcache.server").debug("%s", exc)
        return _err(f"Error, can't listen on '{s.listen}'")
    raise_nofile_limit()
    if addr.kind == "unix":
        set_socket_attributes(addr.path, s.sockowner, s.sockgroup, s.sockperms)
    # Files named relative to where we were started, even after -daemon's chdir("/").
    pidfile = os.path.abspath(s.pidfile) if s.pidfile else None
    unix_path = os.path.abspath(addr.path) if addr.kind == "unix" else None
    persist_path = os.path.abspath(s.persist) if s.persist else None
    if s.daemon:
        try:
            daemonize()
        except OSError:
            return _err("Error, couldn't detach!")
    if pidfile:
        try:
            with open(pidfile, "w") as fp:
                fp.write(str(os.getpid()))
        except OSError:
            return _err(f"Error, couldn't open 'pidfile' at '{s.pidfile}'.")
    if s.user:
        try:
            drop_privileges(s.user)
        except (KeyError, OSError) as exc:
            logging.getLogger("tcpha.distcache.server").debug("%s", exc)
            return _err(f"Error, couldn't become user '{s.user}'.")
    try:
        store = _open_backend(s)
    except ValueError as exc:
        return _err(str(exc))
    persist = None
    if persist_path:
        try:
            persist = PersistentStore(store, persist_path, interval_ms=s.persist_interval)
        except OSError as exc:
            return _err(f"Error, cannot use persist file '{s.persist}': {exc.strerror or exc}")
        store = persist
    server = DistcacheServer(store, progress=s.progress, stall_timeout=s.stall / 1000.0,
                             persist=persist, persist_interval_ms=s.persist_interval, dc=s.dc)
    try:
        _run(server, sock, s, tls)
    except KeyboardInterrupt:
        pass
    finally:
        if unix_path:
            try:
                os.unlink(unix_path)
            except OSError:
                pass
    return 0


def _check_placement(s: Settings) -> int:
    """dc_server -backend redis-cluster://... -check-placement -dc-map MAP: one line per primary,
    exit 0 when every primary has a replica in another data center, 1 otherwise (or on an error)."""
    try:
        if s.dc_map is None:
            raise PlacementError("-check-placement needs -dc-map host:port=DC,... (or -dc-map @FILE)")
        dc_map = parse_dc_map(s.dc_map)
        report = check_cluster_placement(s.backend, dc_map)
    except PlacementError as exc:
        return _err(f"Error, {exc}")
    for line in report.lines():
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0 if report.ok else 1


def _early_stop(signum, frame) -> None:
    raise SystemExit(0)


REPORT_RETRY_FIRST, REPORT_RETRY_MAX = 1.0, 10.0     # seconds between tries of the backend's report


async def _report_backend(describe, backend: str) -> None:
    """The backend's one-line report (what it is: standalone or cluster, primaries, replicas). A backend
    that does not answer at start (still starting, or slow on a busy machine) gets one warning, and the
    report as soon as it answers: tried again after 1 s, backing off to every 10 s."""
    log = logging.getLogger("tcpha.distcache.server")
    wait, warned = REPORT_RETRY_FIRST, False
    while True:
        try:
            line = await describe()
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet": the report is informational
            if not warned:
                log.warning("Warning, backend %s not answering yet: %s", backend, exc)
                warned = True
            await asyncio.sleep(wait)
            wait = min(wait * 2, REPORT_RETRY_MAX)
            continue
        log.info("%s", line)
        return


def _run(server: DistcacheServer, sock, s: Settings, tls=None) -> None:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_serve(server, sock, s, tls))


async def _serve(server: DistcacheServer, sock, s: Settings, tls=None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sigs = [signal.SIGTERM, signal.SIGINT]
    if s.killable:
        sigs += [signal.SIGUSR1, signal.SIGUSR2]
    for sig in sigs:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.emit_now()))
    await server.start(sock, tls)
    describe = getattr(server.store, "describe", None)
    report = None
    if describe is not None and server.is_async:
        report = loop.create_task(_report_backend(describe, s.backend))
    await stop.wait()
    if report is not None:
        report.cancel()
    await server.stop()
    close = getattr(server.store, "close", None)
    if close is not None and server.is_async:
        try:
            await close()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
