#!/usr/bin/env python3
"""Back-pressure of the back end's relays: a download to a client that reads slowly.

Run by hand as root (not in CI):  python3 bench/relay_slowreader.py [--mb 20] [--rate 4] [--kinds splice,bpf]

In a throw-away network namespace (removed at the end, also on error), as bench/relay.py: each relay joins
two loopback TCP connections, `peer <-> client` (the handed-off client's side) and `app <-> server` (the
application's side). The application (a thread) writes --mb MiB as fast as the relay takes them; the
client (a thread) reads them at --rate MiB/s (64 KiB at a time). Sampled every 50 ms:

- lead: bytes the application has written (its send() returned) minus bytes the client has read: what
  the back end holds on the client's behalf. With back-pressure it is bounded by the sockets' buffers;
- held: the part of the lead that is in no socket buffer: lead minus the four sockets' queues (SIOCOUTQ
  of the application's socket and of the relay's client socket, SIOCINQ of the relay's application socket
  and of the client). For splice it is the relay's pipe; for bpf the sockmap's redirect queue
  (psock->ingress_skb of the client socket), which no socket's memory accounting (sk_rmem_alloc,
  sk_wmem_queued, tcp_mem) counts;
- the peak growth of tcp_memory_allocated (/proc/net/sockstat `mem`: what tcp_mem limits), machine-wide
  (other work moves it too: only large differences count);
- the /proc/stat CPU of the whole machine while the client reads (the bpf backlog worker retries a full
  socket every jiffy).

Every run checks the client got the application's bytes exactly (a SHAKE-256 stream).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import os
import platform
import secrets
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcpha.bpf.relay import BpfRelay  # noqa: E402
from tcpha.relay import SpliceRelay  # noqa: E402
from tcpha.steering.netns import enter_netns  # noqa: E402

READ = 64 * 1024
SAMPLE = 0.05


def pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    outer = socket.create_connection(lsock.getsockname())
    inner, _ = lsock.accept()
    lsock.close()
    return outer, inner


def queue(sock: socket.socket, request: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def tcp_mem_bytes() -> int:
    """tcp_memory_allocated (pages, /proc/net/sockstat, the whole machine): what tcp_mem limits."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def machine_busy() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def one_run(kind: str, nbytes: int, rate: float) -> dict[str, float]:
    peer, client = pair()
    app, server = pair()
    payload = hashlib.shake_256(b"slow reader").digest(nbytes)
    sent = [0]
    got = bytearray()
    reader_done = threading.Event()

    def application() -> None:
        view = memoryview(payload)
        while sent[0] < nbytes:
            sent[0] += server.send(view[sent[0]:sent[0] + 256 * 1024])
        server.shutdown(socket.SHUT_WR)

    def slow_client() -> None:
        start = time.monotonic()
        while True:
            # at most `rate` bytes per second since the start
            due = start + len(got) / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            chunk = peer.recv(READ)
            if not chunk:
                break
            got.extend(chunk)
        reader_done.set()

    samples: list[tuple[float, int, int, bool]] = []   # (time, lead, held, the application is done)
    tcp_mem: list[int] = []                            # growth of tcp_memory_allocated per sample

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        relay_cls = SpliceRelay if kind == "splice" else BpfRelay
        relay = relay_cls(loop, client, app, lambda _r: done.set())
        relay.start()
        threads = [threading.Thread(target=application, daemon=True),
                   threading.Thread(target=slow_client, daemon=True)]
        b0, t0, tcp0 = machine_busy(), time.monotonic(), tcp_mem_bytes()
        for t in threads:
            t.start()
        while not reader_done.is_set():
            lead = sent[0] - len(got)
            buffered = (queue(server, termios.TIOCOUTQ) + queue(app, termios.FIONREAD)
                        + queue(client, termios.TIOCOUTQ) + queue(peer, termios.FIONREAD))
            samples.append((time.monotonic() - t0, lead, max(0, lead - buffered), sent[0] == nbytes))
            tcp_mem.append(tcp_mem_bytes() - tcp0)
            await asyncio.sleep(SAMPLE)
        busy = (machine_busy() - b0) / os.sysconf("SC_CLK_TCK")
        wall = time.monotonic() - t0
        peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(done.wait(), 30)
        for t in threads:
            t.join(5)
        return wall, busy

    try:
        wall, busy = asyncio.run(main())
    finally:
        for s in (peer, client, app, server):
            s.close()
    exact = bytes(got) == payload
    return {"exact": exact, "got": len(got), "wall": wall, "cpu": busy,
            "lead_max": max(s[1] for s in samples), "held_max": max(s[2] for s in samples),
            "all_sent_at": next((s[0] for s in samples if s[3]), wall),
            "tcp_mem_max": max(tcp_mem)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=20, help="MiB downloaded (default 20)")
    ap.add_argument("--rate", type=float, default=4.0, help="client's read rate, MiB/s (default 4)")
    ap.add_argument("--kinds", default="splice,bpf")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/relay_slowreader.py: needs root (network namespace, BPF)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/relay_slowreader.py: terminated"))
    ns = "bnch" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        enter_netns(ns)
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {platform.release()}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.mb} MiB at {args.rate:g} MiB/s")
        print("| relay | byte-exact | max lead (app written - client read) | max held outside socket buffers "
              "| tcp_mem growth | application done after s | client done after s | machine CPU s |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for kind in args.kinds.split(","):
            r = one_run(kind, args.mb << 20, args.rate * (1 << 20))
            print(f"| {kind} | {'yes' if r['exact'] else 'NO (%d bytes)' % r['got']} | "
                  f"{r['lead_max'] / (1 << 20):.1f} MiB | {r['held_max'] / (1 << 20):.1f} MiB | "
                  f"{r['tcp_mem_max'] / (1 << 20):.1f} MiB | "
                  f"{r['all_sent_at']:.1f} | {r['wall']:.1f} | {r['cpu']:.2f} |", flush=True)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
