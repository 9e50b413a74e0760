"""A TCP port of a lab host, reachable from the root namespace (a person's browser, a test's Chromium).

    python -m tcpha.lab.forward NETNS ADDR PORT [--listen ADDR:PORT]

listens in the namespace it is started in (the root one: 127.0.0.1, a free port by default), prints
the port it got on its first line, then moves itself into network namespace NETNS (setns): every
connection accepted on the root-namespace socket is relayed to ADDR:PORT connected from inside NETNS.
Living in the lab's namespace, it is found and stopped by ``tcpha-lab down`` like the lab's daemons;
``expose`` starts one for a NamespaceLab and registers it (down() stops it).
No veth, address or route is added to the root namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import socket
import subprocess
import sys
from typing import Any

from tcpha.lab.netns import LabError, _setns

NETNS_DIR = "/run/netns"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _relay(target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
    except (OSError, asyncio.TimeoutError):
        writer.close()
        return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    up_writer.close()
    writer.close()


async def _serve(listener: socket.socket, target: tuple[str, int]) -> None:
    server = await asyncio.start_server(lambda r, w: _relay(target, r, w), sock=listener)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tcpha.lab.forward")
    p.add_argument("netns")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--listen", default="127.0.0.1:0", help="ADDR:PORT in the starting namespace")
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, int(port)))
        listener.listen(64)
        fd = os.open(os.path.join(NETNS_DIR, a.netns), os.O_RDONLY | os.O_CLOEXEC)
        _setns(fd)             # single-threaded here: the whole process moves; the listener stays behind
        os.close(fd)
    except OSError as e:
        print(f"forward: {e}", file=sys.stderr, flush=True)
        return 1
    print(listener.getsockname()[1], flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1, 2):        # the starter stops reading; never write into a closed pipe
        os.dup2(devnull, n)
    listener.setblocking(False)
    asyncio.run(_serve(listener, (a.addr, a.port)))
    return 0


def expose(lab: Any, host: str, addr: str, port: int, listen: str = "127.0.0.1:0",
           timeout: float = 10.0) -> tuple[subprocess.Popen, int]:
    """Start a forwarder to addr:port inside lab host `host`; (process, port in the root namespace).
    Registered with the lab: down() stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "tcpha.lab.forward", lab.netns(host), addr, str(port),
                             "--listen", listen], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    lab.add_cleanup(lambda: lab.stop(proc, grace=2))
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.isdigit():
        err = proc.stderr.read() if proc.poll() is not None else "no port reported"
        lab.stop(proc, grace=1)
        raise LabError(f"forwarder to {host} {addr}:{port}: {err.strip() or 'failed'}")
    proc.stdout.close()
    proc.stderr.close()
    return proc, int(line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
