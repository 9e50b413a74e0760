"""SCM_RIGHTS: an accepted TCP connection handed to another process keeps working there."""

from __future__ import annotations

import os
import socket

import pytest

from tcpha.fdpass import FdPassError, recv_fds, send_fds


def test_accepted_socket_round_trip_to_another_process():
    listener = socket.create_server(("127.0.0.1", 0))
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the "back end": receives the connection and answers on it
        code = 1
        try:
            parent.close()
            data, fds = recv_fds(child, 64, 4)
            conn = socket.socket(fileno=fds[0])
            request = conn.recv(100, socket.MSG_PEEK)  # the bytes the front end peeked are still there
            conn.recv(len(request))
            conn.sendall(b"served by pid %d for %s: %s" % (os.getpid(), data, request))
            conn.close()
            code = 0
        finally:
            os._exit(code)
    child.close()
    client = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        client.sendall(b"GET /x")
        conn, _ = listener.accept()
        assert conn.recv(100, socket.MSG_PEEK) == b"GET /x"
        send_fds(parent, b"conn-1", [conn.fileno()])
        conn.close()  # the front end lets go; the back end's copy keeps the connection open
        reply = b""
        while chunk := client.recv(1000):
            reply += chunk
        assert reply == b"served by pid %d for conn-1: GET /x" % pid
    finally:
        client.close()
        parent.close()
        listener.close()
        assert os.waitpid(pid, 0)[1] == 0


def test_clear_errors():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        with pytest.raises(FdPassError, match="at least one byte"):
            send_fds(a, b"", [r])
        send_fds(a, b"x", [r, w])
        with pytest.raises(FdPassError, match="more than 1 descriptors"):
            recv_fds(b, 10, 1)
        a.close()
        assert recv_fds(b, 10, 1) == (b"", [])
        tcp = socket.socket()
        with pytest.raises(FdPassError, match="Unix socket"):
            send_fds(tcp, b"x", [r])
        tcp.close()
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)
