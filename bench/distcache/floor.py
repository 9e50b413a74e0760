#!/usr/bin/env python3
"""The floor of a Python dc_server: server CPU per operation of a loop that does nothing but
``epoll.poll`` + ``recv`` + ``send`` of a fixed 15-byte answer per 17-byte request (no parsing, no
store), ping-pong with one client on a UNIX socket, as dc_test -persistent drives a server.

    python3 bench/distcache/floor.py [--ops N] [--rounds R]

Prints the median server µs per operation (user+sys of the serving process, from getrusage) of
that bare loop; versus_original.py reports it next to the C server's and ours, as the cost no
Python server of this shape (one epoll_wait, one recv, one send per request) can go under.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import statistics
import sys

REQUEST = bytes.fromhex("00110000 00 00000001 00 03 01 0003 616263".replace(" ", ""))
ANSWER = bytes.fromhex("00110000 01 00000001 00 03 01 0001 01".replace(" ", ""))


def bare_loop(sock: socket.socket, ops: int) -> float:
    """Serve `ops` requests on `sock`; return the CPU seconds spent (user+sys)."""
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    recv = sock.recv
    send = sock.send
    poll = ep.poll
    flags = socket.MSG_DONTWAIT
    before = resource.getrusage(resource.RUSAGE_SELF)
    done = 0
    while done < ops:
        for _fd, _ev in poll():
            if recv(65536, flags):
                send(ANSWER, flags)
                done += 1
    after = resource.getrusage(resource.RUSAGE_SELF)
    ep.close()
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_round(ops: int) -> float:
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:                       # the client: blocking send, blocking recv, as dc_test does
        server_end.close()
        try:
            for _ in range(ops):
                client_end.sendall(REQUEST)
                client_end.recv(64)
        finally:
            os._exit(0)
    client_end.close()
    cpu = bare_loop(server_end, ops)
    os.waitpid(pid, 0)
    server_end.close()
    return cpu / ops * 1e6


def measure(ops: int = 100_000, rounds: int = 3) -> float:
    """Median server µs per operation of the bare loop."""
    return statistics.median(one_round(ops) for _ in range(rounds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"bare epoll+recv+send loop: {measure(args.ops, args.rounds):.2f} µs of server CPU per operation "
          f"(load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
