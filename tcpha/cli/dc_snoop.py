"""dc_snoop: transparent distcache proxy printing one line per frame (see tcpha.distcache.snoop).

Extensions: ``-decode``; ``-tls-cafile F [-tls-cert F -tls-key F] [-tls-checkhost N]``: TLS to the
server (the clients still connect in plaintext; the trace shows what goes inside TLS)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from tcpha.service import event_loop_factory
from tcpha.distcache.address import AddressError, listen_socket, parse_address, resolve
from tcpha.distcache.snoop import Snooper
from tcpha.distcache.tls import CLIENT_OPTIONS as TLS_OPTIONS, ClientTls, TlsError, TlsOptions

# The original's usage text, byte for byte (the -decode extension is in docs/distcache.md).
USAGE = [
    '',
    "Usage: dc_snoop [options]     where 'options' are from;",
    "  -listen <addr>   (accept incoming connections on address 'addr')",
    "  -server <addr>   (proxy incoming connections to server at address 'addr')",
    "  -connect <addr>  (alias for '-server')",
    '  -<h|help|?>      (display this usage message)',
    '',
]


def _usage() -> int:
    sys.stderr.write("\n".join(USAGE) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    listen = connect = None
    decode = False
    tls_files: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "-help", "-?"):
            return _usage()
        if a == "-decode":
            decode = True
        elif a in ("-connect", "-server", "-listen", *TLS_OPTIONS):
            if i + 1 >= len(args):
                # The original prints "-%s" with the option's own dash: "Error, --listen ...".
                sys.stderr.write(f"Error, -{a} requires an argument\n")
                _usage()
                return 1
            i += 1
            if a in TLS_OPTIONS:
                tls_files[TLS_OPTIONS[a]] = args[i]
            elif a == "-listen":
                listen = args[i]
            else:
                connect = args[i]
        else:
            sys.stderr.write(f'Error, "{a}" not recognised\n')
            _usage()
            return 1
        i += 1
    if not connect or not listen:
        sys.stderr.write("Error, must provide -listen and -server\n")
        return 1
    logging.basicConfig(level=os.environ.get("TCPHA_LOG_LEVEL", "WARNING").upper(),
                        format="dc_snoop[%(process)d] %(levelname)s %(message)s", stream=sys.stderr)
    try:
        server = parse_address(connect)
        if server.kind == "ip" and server.host is None:
            raise AddressError(f"cannot connect to '{connect}': IP:port is a listen-only address")
        if server.kind == "ip":
            resolve(server)
        laddr = parse_address(listen)
        lsock = listen_socket(laddr)
    except AddressError as exc:
        # The original exits 1 silently here; we say why (docs/distcache.md).
        sys.stderr.write(f"Error, {exc}\n")
        return 1
    try:
        tls = ClientTls.from_options(TlsOptions(**tls_files))
    except TlsError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    snooper = Snooper(lsock, server, decode=decode, tls=tls)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, snooper.stop)
        await snooper.run()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve())
    finally:
        if laddr.kind == "unix":
            try:
                os.unlink(laddr.path)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
